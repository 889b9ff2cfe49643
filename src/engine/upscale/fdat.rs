//! FDAT (fast dual aggregation transformer), as spandrel runs it (`FDAT/__arch/fdat.py`,
//! in eval mode): a first convolution (after a pixel unshuffle of the reflection-padded
//! image in the x1 and x2 "unshuffle" files), residual groups of simplified DAT blocks
//! and a closing convolution, each group's blocks alternating
//! - window attention: the normed tokens zero-padded to whole windows, attention within
//!   each window with a learned bias per head and pair of positions (through torch's
//!   fused attention, the bias as its additive mask);
//! - channel attention across the whole image, q and k normalised over the pixels,
//!   scaled by each head's temperature;
//!
//! each beside a depthwise convolution branch mixed in by the simplified interaction
//! module (the window block gates the attention per channel by the branch's means, the
//! channel block gates the branch per pixel by the attention), then a feed-forward
//! network with a depthwise convolution inside. The features plus the first
//! convolution's go through one of the upsamplers in [`super::uni_upsample`].

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::layout::fdat::PATTERN;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{attend, embed, pad_to_windows, unembed};
use crate::engine::upscale::uni_upsample::{Upsample, UpsampleSpec};
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// `nn.LayerNorm`'s epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

/// `FastSpatialWindowAttention`.
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    /// [heads, window², window²].
    bias: Tensor,
    heads: i64,
    window: i64,
}

impl WindowAttention {
    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor, height: i64, width: i64) -> Tensor {
        let size = x.size();
        let (b, c, ws) = (size[0], size[2], self.window);
        let more = |n: i64| (ws - n % ws) % ws;
        let (padded_h, padded_w) = (height + more(height), width + more(width));
        let grid =
            x.view([b, height, width, c])
                .constant_pad_nd([0, 0, 0, more(width), 0, more(height)]);
        let (rows, columns) = (padded_h / ws, padded_w / ws);
        let windows = grid
            .view([b, rows, ws, columns, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .contiguous()
            .view([-1, ws * ws, c]);
        let qkv = self
            .qkv
            .forward(&windows)
            .view([-1, ws * ws, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let attended = attend(&qkv.get(0), &qkv.get(1), &qkv.get(2), &self.bias, None);
        self.proj
            .forward(&attended)
            .view([b, rows, columns, ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .contiguous()
            .view([b, padded_h, padded_w, c])
            .narrow(1, 0, height)
            .narrow(2, 0, width)
            .reshape([b, height * width, c])
    }
}

/// `FastChannelAttention`.
struct ChannelAttention {
    qkv: Linear,
    proj: Linear,
    /// [heads, 1, 1].
    temperature: Tensor,
    heads: i64,
}

impl ChannelAttention {
    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let qkv = self
            .qkv
            .forward(x)
            .view([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let (q, k) = (
            unit_norm(&q.transpose(-2, -1)),
            unit_norm(&k.transpose(-2, -1)),
        );
        let scores = q.matmul(&k.transpose(-2, -1)) * &self.temperature;
        let attended = scores
            .softmax(-1, None)
            .matmul(&v.transpose(-2, -1))
            .permute([0, 3, 1, 2])
            .reshape([b, n, c]);
        self.proj.forward(&attended)
    }
}

/// A block's attention and the gate its interaction module mixes the convolution
/// branch in by.
enum Mixer {
    /// The window attention, gated per channel by a sigmoid of the branch's means
    /// through two 1×1 convolutions (to the narrow width, GELU, back); plus the branch.
    Window {
        attention: WindowAttention,
        gate: [SameConv; 2],
    },
    /// The channel attention, plus the branch gated per pixel by a sigmoid of the
    /// attention's 1×1 convolution to one channel.
    Channel {
        attention: ChannelAttention,
        gate: SameConv,
    },
}

/// `SimplifiedFFN`: a linear layer, GELU, a depthwise 3×3 convolution, a linear layer
/// (no biases).
struct FeedForward {
    fc1: Linear,
    mix: SameConv,
    fc2: Linear,
}

/// `SimplifiedDATBlock`.
struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    mixer: Mixer,
    /// The depthwise 3×3 convolution branch (no bias; GELU after).
    conv: SameConv,
    ffn: FeedForward,
}

impl Block {
    fn load(vp: &VarPath, index: i64, architecture: &Architecture) -> Result<Self> {
        let Architecture::Fdat {
            features: dim,
            heads,
            window,
            ffn_hidden,
            aim_reduced,
            ..
        } = *architecture
        else {
            unreachable!("an FDAT architecture");
        };
        let (attn, inter) = (vp.pp("attn"), vp.pp("inter"));
        let qkv = Linear::load(&attn.pp("qkv"), dim, 3 * dim, false)?;
        let proj = Linear::load(&attn.pp("proj"), dim, dim, true)?;
        // Every block stores both gates and uses its type's: the other is read (and its
        // shape checked) and dropped.
        let channel_gate = [
            SameConv::load(&inter.pp("cg").pp(1), [dim, aim_reduced], 1, 1, false)?,
            SameConv::load(&inter.pp("cg").pp(3), [aim_reduced, dim], 1, 1, false)?,
        ];
        let spatial_gate = SameConv::load(&inter.pp("sg").pp(0), [dim, 1], 1, 1, false)?;
        let mixer = if index % PATTERN == 0 {
            Mixer::Window {
                attention: WindowAttention {
                    qkv,
                    proj,
                    bias: attn.get("bias", &[heads, window * window, window * window])?,
                    heads,
                    window,
                },
                gate: channel_gate,
            }
        } else {
            Mixer::Channel {
                attention: ChannelAttention {
                    qkv,
                    proj,
                    temperature: attn.get("temp", &[heads, 1, 1])?,
                    heads,
                },
                gate: spatial_gate,
            }
        };
        let ffn = vp.pp("ffn");
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("n1"), dim, LAYER_NORM_EPS)?,
            norm2: LayerNorm::load(&vp.pp("n2"), dim, LAYER_NORM_EPS)?,
            mixer,
            conv: SameConv::depthwise(&vp.pp("conv").pp(0), dim, 3, false)?,
            ffn: FeedForward {
                fc1: Linear::load(&ffn.pp("fc1"), dim, ffn_hidden, false)?,
                mix: SameConv::depthwise(&ffn.pp("smix"), ffn_hidden, 3, false)?,
                fc2: Linear::load(&ffn.pp("fc2"), ffn_hidden, dim, false)?,
            },
        })
    }

    /// On [B, H·W, C] tokens.
    fn forward(&self, x: &Tensor, height: i64, width: i64) -> Tensor {
        let normed = self.norm1.forward(x);
        let branch = self
            .conv
            .forward(&unembed(&normed, height, width))
            .gelu("none");
        let fused = match &self.mixer {
            Mixer::Window { attention, gate } => {
                let means = branch.mean_dim([2i64, 3].as_slice(), true, None);
                let channel = gate[1].forward(&gate[0].forward(&means).gelu("none"));
                let weights = embed(&channel.sigmoid());
                attention.forward(&normed, height, width) * weights + embed(&branch)
            }
            Mixer::Channel { attention, gate } => {
                let attended = attention.forward(&normed);
                let spatial = gate.forward(&unembed(&attended, height, width)).sigmoid();
                attended + embed(&(branch * spatial))
            }
        };
        let x = x + fused;
        let hidden = self.ffn.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        let mixed = embed(&self.ffn.mix.forward(&unembed(&hidden, height, width)));
        x + self.ffn.fc2.forward(&mixed)
    }
}

/// `SimplifiedResidualGroup`: the blocks, then a 3×3 convolution (no bias) plus the
/// group's input.
struct Group {
    blocks: Vec<Block>,
    conv: SameConv,
}

impl Group {
    fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = x.size();
        let (height, width) = (size[2], size[3]);
        let mut tokens = embed(x);
        for block in &self.blocks {
            between()?;
            tokens = block.forward(&tokens, height, width);
        }
        Ok(self.conv.forward(&unembed(&tokens, height, width)) + x)
    }
}

/// FDAT.
pub struct Fdat {
    first: Conv2d,
    groups: Vec<Group>,
    /// `conv_after`: 3×3, no bias.
    after: SameConv,
    upsample: Upsample,
    unshuffle: i64,
    scale: i64,
}

impl Fdat {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Fdat {
            channels,
            features,
            groups,
            blocks,
            unshuffle,
            scale,
            upsampler,
            upsample_features,
            ..
        } = architecture
        else {
            unreachable!("an FDAT architecture");
        };
        // After a pixel unshuffle the upsampler enlarges by 4.
        let spec = UpsampleSpec {
            upsampler,
            features,
            inner: upsample_features,
            channels,
            scale: scale * unshuffle,
            version_three: true,
        };
        let first = match unshuffle {
            1 => vp.pp("conv_first"),
            _ => vp.pp("conv_first").pp(1),
        };
        let in_channels = channels * unshuffle * unshuffle;
        let groups = (0..groups)
            .map(|g| {
                let group = vp.pp("groups").pp(g);
                Ok(Group {
                    blocks: (0..blocks)
                        .map(|i| Block::load(&group.pp("blocks").pp(i), i, &architecture))
                        .collect::<Result<_>>()?,
                    conv: SameConv::load(&group.pp("conv"), [features, features], 3, 1, false)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            first: Conv2d::load(&first, in_channels, features, 3, 1, 1)?,
            groups,
            after: SameConv::load(&vp.pp("conv_after"), [features, features], 3, 1, false)?,
            upsample: Upsample::load(&vp.pp("upsampler"), &spec)?,
            unshuffle,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let x = match self.unshuffle {
            1 => image.shallow_clone(),
            u => pad_to_windows(image, u).pixel_unshuffle(u),
        };
        let shallow = self.first.forward(&x);
        let deep = self
            .groups
            .iter()
            .try_fold(shallow.shallow_clone(), |x, group| {
                group.forward(&x, between)
            })?;
        between()?;
        let output = self
            .upsample
            .forward(&(self.after.forward(&deep) + shallow));
        Ok(output
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}
