//! CRAFT (Cross-Refinement Adaptive Fusion Transformer), as spandrel runs it
//! (`CRAFT/__arch/CRAFT.py`): the image mirrored to a whole multiple of 16 and more, its
//! mean subtracted, a first convolution, then residual groups of cross-refinement
//! blocks, each of which
//! - runs two window blocks on the tokens: half the channels attend within
//!   `[rows, columns]` windows and half within the transposed ones, with DAT's position
//!   bias MLP; every second block rolls its windows by half with no mask; a depthwise
//!   convolution of the values beside the attention, then an MLP;
//! - runs a high-frequency enhancement block on the block's input: a 3×3 convolution on
//!   half the channels, a 3×3 max pool and a 1×1 convolution on the other half;
//! - fuses them: the window blocks' output attends across channels (Restormer's
//!   transposed attention: q from the enhanced map, k and v from the normed windows'
//!   output, each after a 1×1 and a depthwise 3×3 convolution, L2-normalised over the
//!   pixels, scaled by a learned temperature), then Restormer's gated feed-forward;
//!
//! a channel norm, the body's convolution with the long skip, a pixel shuffle, the mean
//! added back, the output cropped to the image.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::gated_dconv::GatedDconvFeedForward;
use crate::engine::upscale::layout::craft::PAD_MULTIPLE;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::rwin::{Geometry, WindowPair};
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{embed, unembed, LAYER_NORM_EPS};
use crate::engine::upscale::swinir::image_mean;
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// Restormer's `WithBias_LayerNorm` epsilon.
const CHANNEL_NORM_EPS: f64 = 1e-5;
/// The fusion blocks' feed-forward expansion (`ffn_expansion_factor`, fixed in the
/// reference).
const FFN_EXPANSION: f64 = 2.66;

/// The shape every block is built from.
struct CraftShape {
    features: i64,
    split: [i64; 2],
    mlp_hidden: i64,
    qkv_bias: bool,
}

/// One shifted or plain rectangle-window block (`SRWAB`).
struct RectangleWindowBlock {
    norm1: LayerNorm,
    qkv: Linear,
    pair: WindowPair,
    /// The locality complementary module: a depthwise 3×3 convolution of the values.
    locality: SameConv,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl RectangleWindowBlock {
    fn load(vp: &VarPath, heads: i64, shifted: bool, shape: &CraftShape) -> Result<Self> {
        let dim = shape.features;
        let mlp = vp.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("norm1"), dim, LAYER_NORM_EPS)?,
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, shape.qkv_bias)?,
            pair: WindowPair::load(&vp.pp("attns"), heads, shape.split, shifted)?,
            locality: SameConv::depthwise(&vp.pp("get_v"), dim, 3, true)?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            norm2: LayerNorm::load(&vp.pp("norm2"), dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(&mlp.pp("fc1"), dim, shape.mlp_hidden, true)?,
            fc2: Linear::load(&mlp.pp("fc2"), shape.mlp_hidden, dim, true)?,
        })
    }

    /// On [B, H·W, C] tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let normed = self.norm1.forward(x);
        let (attended, values) = self.pair.project_and_attend(&self.qkv, &normed, geometry);
        let attended = attended + embed(&self.locality.forward(&values));
        let x = x + self.proj.forward(&attended);
        let hidden = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        self.fc2.forward(&hidden) + x
    }
}

/// The high-frequency enhancement residual block (`HFERB`).
struct Enhancement {
    /// The local branch's 3×3 convolution on the first half of the channels.
    local: Conv2d,
    /// The high-frequency branch's 1×1 convolution after a 3×3 max pool of the second.
    high: Conv2d,
    last: Conv2d,
    half: i64,
}

impl Enhancement {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        let half = dim / 2;
        Ok(Self {
            local: Conv2d::load(&vp.pp("conv"), half, half, 3, 1, 1)?,
            high: Conv2d::load(&vp.pp("fc"), half, half, 1, 1, 0)?,
            last: Conv2d::load(&vp.pp("last_fc"), dim, dim, 1, 1, 0)?,
            half,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let half = self.half;
        let local = self.local.forward(&x.narrow(1, 0, half)).gelu("none");
        let pooled = x
            .narrow(1, half, half)
            .max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false);
        let high = self.high.forward(&pooled).gelu("none");
        self.last.forward(&Tensor::cat(&[local, high], 1)) + x
    }
}

/// The fusion block's attention (`Attention`): each head's channels of the enhanced map
/// (queries) attend to those of the windows' output (keys and values) over the whole
/// image.
struct CrossChannelAttention {
    q: SameConv,
    q_depthwise: SameConv,
    kv: SameConv,
    kv_depthwise: SameConv,
    project_out: SameConv,
    /// [heads, 1, 1].
    temperature: Tensor,
    heads: i64,
}

impl CrossChannelAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64) -> Result<Self> {
        Ok(Self {
            q: SameConv::load(&vp.pp("q"), [dim, dim], 1, 1, false)?,
            q_depthwise: SameConv::depthwise(&vp.pp("q_dwconv"), dim, 3, false)?,
            kv: SameConv::load(&vp.pp("kv"), [dim, 2 * dim], 1, 1, false)?,
            kv_depthwise: SameConv::depthwise(&vp.pp("kv_dwconv"), 2 * dim, 3, false)?,
            project_out: SameConv::load(&vp.pp("project_out"), [dim, dim], 1, 1, false)?,
            temperature: vp.get("temperature", &[heads, 1, 1])?,
            heads,
        })
    }

    /// The attention of [B, C, H, W] `low` (normed) queried by `high`.
    fn forward(&self, low: &Tensor, high: &Tensor) -> Tensor {
        let size = low.size();
        let (b, c) = (size[0], size[1]);
        let per_head = |t: &Tensor| t.reshape([b, self.heads, c / self.heads, -1]);
        let q = per_head(&self.q_depthwise.forward(&self.q.forward(high)));
        let kv = self.kv_depthwise.forward(&self.kv.forward(low));
        let halves = kv.chunk(2, 1);
        let (k, v) = (per_head(&halves[0]), per_head(&halves[1]));
        let scores = unit_norm(&q).matmul(&unit_norm(&k).transpose(-2, -1)) * &self.temperature;
        let attended = scores.softmax(-1, None).matmul(&v).reshape(size.as_slice());
        self.project_out.forward(&attended)
    }
}

/// The hybrid fusion block (`HFB`).
struct Fusion {
    norm1: ChannelNorm,
    attention: CrossChannelAttention,
    norm2: ChannelNorm,
    ffn: GatedDconvFeedForward,
}

impl Fusion {
    fn load(vp: &VarPath, dim: i64, heads: i64) -> Result<Self> {
        let hidden = (dim as f64 * FFN_EXPANSION) as i64;
        Ok(Self {
            norm1: ChannelNorm::with_eps(&vp.pp("norm1").pp("body"), dim, CHANNEL_NORM_EPS)?,
            attention: CrossChannelAttention::load(&vp.pp("attn"), dim, heads)?,
            norm2: ChannelNorm::with_eps(&vp.pp("norm2").pp("body"), dim, CHANNEL_NORM_EPS)?,
            ffn: GatedDconvFeedForward::load(&vp.pp("ffn"), dim, hidden, false)?,
        })
    }

    fn forward(&self, low: &Tensor, high: &Tensor) -> Tensor {
        let x = self.attention.forward(&self.norm1.forward(low), high) + low;
        self.ffn.forward(&self.norm2.forward(&x)) + x
    }
}

/// One cross-refinement step of a group (`CRFB`'s loop body): a plain and a shifted
/// window block, the enhancement block, the fusion of their outputs.
struct Refinement {
    windows: [RectangleWindowBlock; 2],
    enhancement: Enhancement,
    fusion: Fusion,
}

impl Refinement {
    /// On a [B, C, H, W] feature map.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let tokens = self
            .windows
            .iter()
            .fold(embed(x), |t, block| block.forward(&t, geometry));
        let low = unembed(&tokens, geometry.height, geometry.width);
        self.fusion.forward(&low, &self.enhancement.forward(x))
    }
}

/// A residual group (`RCRFG`): its refinement steps, a closing 3×3 convolution, the
/// group's input added.
struct Group {
    steps: Vec<Refinement>,
    conv: Conv2d,
}

impl Group {
    fn load(vp: &VarPath, shape: &CraftShape) -> Result<Self> {
        let blocks = vp.pp("residual_group");
        let fusions = blocks.pp("hf_blocks");
        let depth = (0..)
            .take_while(|i| fusions.pp(i).contains("attn.temperature"))
            .count() as i64;
        let heads = fusions
            .pp(0)
            .pp("attn")
            .shape("temperature")
            .and_then(|s| s.first().copied())
            .unwrap_or(2);
        let dim = shape.features;
        let windows = blocks.pp("srwa_blocks");
        let steps = (0..depth)
            .map(|i| {
                Ok(Refinement {
                    windows: [
                        RectangleWindowBlock::load(&windows.pp(2 * i), heads, false, shape)?,
                        RectangleWindowBlock::load(&windows.pp(2 * i + 1), heads, true, shape)?,
                    ],
                    enhancement: Enhancement::load(&blocks.pp("hfer_blocks").pp(i), dim)?,
                    fusion: Fusion::load(&fusions.pp(i), dim, heads)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            steps,
            conv: Conv2d::load(&vp.pp("conv"), dim, dim, 3, 1, 1)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        geometry: &Geometry,
        between: &mut Between<'_>,
    ) -> Result<Tensor> {
        let y = in_turn(x.shallow_clone(), &self.steps, between, |step, y| {
            step.forward(y, geometry)
        })?;
        Ok(self.conv.forward(&y) + x)
    }
}

/// CRAFT.
pub struct Craft {
    first: Conv2d,
    groups: Vec<Group>,
    norm: ChannelNorm,
    /// The body's closing convolution (`1conv`; the identity otherwise).
    after_body: Option<Conv2d>,
    upsample: Conv2d,
    mean: Tensor,
    split: [i64; 2],
    scale: i64,
}

impl Craft {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Craft {
            channels,
            features,
            groups,
            split,
            mlp_hidden,
            qkv_bias,
            scale,
            body_conv,
            ..
        } = architecture
        else {
            unreachable!("a CRAFT architecture");
        };
        let shape = CraftShape {
            features,
            split,
            mlp_hidden,
            qkv_bias,
        };
        let after_body = body_conv
            .then(|| Conv2d::load(&vp.pp("conv_after_body"), features, features, 3, 1, 1))
            .transpose()?;
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            groups: (0..groups)
                .map(|g| Group::load(&vp.pp("layers").pp(g), &shape))
                .collect::<Result<_>>()?,
            norm: ChannelNorm::with_eps(&vp.pp("norm").pp("body"), features, CHANNEL_NORM_EPS)?,
            after_body,
            upsample: Conv2d::load(
                &vp.pp("upsample.0"),
                features,
                scale * scale * channels,
                3,
                1,
                1,
            )?,
            mean: image_mean(channels, vp),
            split,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let input = mirror_past_multiple(image) - &self.mean;
        let first = self.first.forward(&input);
        let geometry = Geometry::unmasked(&first, self.split);
        let features = self
            .groups
            .iter()
            .try_fold(first.shallow_clone(), |x, group| {
                group.forward(&x, &geometry, between)
            })?;
        let normed = self.norm.forward(&features);
        let body = match &self.after_body {
            Some(conv) => conv.forward(&normed),
            None => normed,
        } + &first;
        let output = self.upsample.forward(&body).pixel_shuffle(self.scale) + &self.mean;
        Ok(output
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}

/// The reference's padding: each side grown to the next multiple of 16 above it (a
/// whole 16 more where it is one already) by the image's mirror, its edge row repeated.
fn mirror_past_multiple(image: &Tensor) -> Tensor {
    let size = image.size();
    let (height, width) = (size[2], size[3]);
    let past = |n: i64| (n / PAD_MULTIPLE + 1) * PAD_MULTIPLE;
    let rows = Tensor::cat(&[image, &image.flip([2])], 2).narrow(2, 0, past(height));
    Tensor::cat(&[&rows, &rows.flip([3])], 3).narrow(3, 0, past(width))
}
