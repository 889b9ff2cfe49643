//! DITN (the deployment-friendly inception-like transformer), as spandrel runs it
//! (`DITN/__arch/DITN_Real.py`): a first convolution, units of
//! - local blocks on the image cut into 8-pixel patches: channel attention within each
//!   patch (one head: q and k normalised over the patch's pixels, scaled by a learned
//!   temperature), then a gated feed-forward network;
//! - global blocks on the whole image: a depthwise 5×5 and a 7×7 dilated-by-3 depthwise
//!   convolution and a 1×1 one modulate the other half of a 1×1 projection, scaled per
//!   channel, then the feed-forward network;
//!
//! each block's parts taking the tanh of their input through a 1×1 convolution and
//! adding to it; a closing convolution plus the first's output, then a pixel shuffle to
//! RGB.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, Linear};
use crate::engine::upscale::gated_dconv::GatedDconvFeedForward;
use crate::engine::upscale::layout::ditn::PATCH;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// The global blocks' dilated convolution: 7×7, dilated by 3.
const DILATED_KERNEL: i64 = 7;
const DILATION: i64 = 3;

/// `ISA`: one head of channel attention over the pixels of each patch.
struct ChannelAttention {
    /// [1, 1, 1].
    temperature: Tensor,
    qkv: Linear,
    project_out: SameConv,
}

impl ChannelAttention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[1]);
        let tokens = x.view([b, c, -1]).transpose(-1, -2);
        let parts = self.qkv.forward(&tokens).chunk(3, -1);
        let q = unit_norm(&parts[0].transpose(-1, -2));
        let k = unit_norm(&parts[1].transpose(-1, -2));
        let scores = q.matmul(&k.transpose(-2, -1)) * &self.temperature;
        let attended = scores
            .softmax(-1, None)
            .matmul(&parts[2].transpose(-1, -2))
            .view(size.as_slice());
        self.project_out.forward(&attended)
    }
}

/// `SDA`: half of a 1×1 projection modulates the other half through a depthwise 5×5, a
/// depthwise 7×7 dilated by 3 and a 1×1 convolution; a 1×1 projection, scaled per
/// channel.
struct Modulation {
    first: Conv2d,
    depthwise: SameConv,
    /// The dilated depthwise convolution's weight [C, 1, 7, 7] and bias.
    dilated: (Tensor, Tensor),
    pointwise: Conv2d,
    last: Conv2d,
    /// [1, C, 1, 1].
    scale: Tensor,
}

impl Modulation {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        let convs = vp.pp("DConvs");
        let dilated = convs.pp(1);
        let kernel = DILATED_KERNEL;
        Ok(Self {
            first: Conv2d::load(&vp.pp("proj_first").pp(0), dim, 2 * dim, 1, 1, 0)?,
            depthwise: SameConv::depthwise(&convs.pp(0), dim, 5, true)?,
            dilated: (
                dilated.get("weight", &[dim, 1, kernel, kernel])?,
                dilated.get("bias", &[dim])?,
            ),
            pointwise: Conv2d::load(&convs.pp(2), dim, dim, 1, 1, 0)?,
            last: Conv2d::load(&vp.pp("proj_last").pp(0), dim, dim, 1, 1, 0)?,
            scale: vp.get("scale", &[1, dim, 1, 1])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let parts = self.first.forward(x).chunk(2, 1);
        let (weight, bias) = &self.dilated;
        let padding = (DILATED_KERNEL / 2) * DILATION;
        let groups = weight.size()[0];
        let dilated = self.depthwise.forward(&parts[0]).conv2d(
            weight,
            Some(bias),
            [1, 1],
            [padding, padding],
            [DILATION, DILATION],
            groups,
        );
        let modulator = self.pointwise.forward(&dilated);
        self.last.forward(&(&parts[1] * modulator)) * &self.scale
    }
}

/// A block's first part.
enum Mixer {
    Local(ChannelAttention),
    Global(Modulation),
}

/// `ITL` or `SAL`: the mixer and the feed-forward network, each on a 1×1 convolution
/// of the tanh of the block's running input, added to it.
struct Block {
    mixer: Mixer,
    conv1: Conv2d,
    conv2: Conv2d,
    ffn: GatedDconvFeedForward,
}

impl Block {
    fn load(vp: &VarPath, local: bool, architecture: &Architecture) -> Result<Self> {
        let Architecture::Ditn {
            features: dim,
            ffn_hidden,
            bias,
            ..
        } = *architecture
        else {
            unreachable!("a DITN architecture");
        };
        let mixer = if local {
            let attn = vp.pp("attn");
            Mixer::Local(ChannelAttention {
                temperature: attn.get("temperature", &[1, 1, 1])?,
                qkv: Linear::load(&attn.pp("qkv"), dim, 3 * dim, true)?,
                project_out: SameConv::load(&attn.pp("project_out"), [dim, dim], 1, 1, bias)?,
            })
        } else {
            Mixer::Global(Modulation::load(&vp.pp("SDA"), dim)?)
        };
        Ok(Self {
            mixer,
            conv1: Conv2d::load(&vp.pp("conv1"), dim, dim, 1, 1, 0)?,
            conv2: Conv2d::load(&vp.pp("conv2"), dim, dim, 1, 1, 0)?,
            ffn: GatedDconvFeedForward::load(&vp.pp("ffn"), dim, ffn_hidden, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let input = self.conv1.forward(&x.tanh());
        let mixed = match &self.mixer {
            Mixer::Local(attention) => attention.forward(&input),
            Mixer::Global(modulation) => modulation.forward(&input),
        };
        let x = x + mixed;
        let fed = self.ffn.forward(&self.conv2.forward(&x.tanh()));
        x + fed
    }
}

/// `UFONE`: the local blocks on the image's patches as a batch, then the global blocks
/// on the whole image.
struct Unit {
    local: Vec<Block>,
    global: Vec<Block>,
}

impl Unit {
    fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        let (rows, columns) = (h / PATCH, w / PATCH);
        let mut patches = x
            .view([b, c, rows, PATCH, columns, PATCH])
            .permute([0, 2, 4, 1, 3, 5])
            .contiguous()
            .view([-1, c, PATCH, PATCH]);
        for block in &self.local {
            between()?;
            patches = block.forward(&patches);
        }
        let mut image = patches
            .view([b, rows, columns, c, PATCH, PATCH])
            .permute([0, 3, 1, 4, 2, 5])
            .contiguous()
            .view([b, c, h, w]);
        for block in &self.global {
            between()?;
            image = block.forward(&image);
        }
        Ok(image)
    }
}

/// DITN.
pub struct Ditn {
    first: Conv2d,
    units: Vec<Unit>,
    after: Conv2d,
    upsample: Conv2d,
    scale: i64,
}

impl Ditn {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Ditn {
            channels,
            features,
            units,
            local_blocks,
            global_blocks,
            scale,
            ..
        } = architecture
        else {
            unreachable!("a DITN architecture");
        };
        let blocks = |unit: &VarPath, name: &str, count: i64, local: bool| {
            (0..count)
                .map(|i| Block::load(&unit.pp(name).pp(i), local, &architecture))
                .collect::<Result<Vec<_>>>()
        };
        let units = (0..units)
            .map(|u| {
                let unit = vp.pp("UFONE").pp(u);
                Ok(Unit {
                    local: blocks(&unit, "ITLs", local_blocks, true)?,
                    global: blocks(&unit, "SALs", global_blocks, false)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            first: Conv2d::load(&vp.pp("sft"), channels, features, 3, 1, 1)?,
            units,
            after: Conv2d::load(&vp.pp("conv_after_body"), features, features, 3, 1, 1)?,
            upsample: Conv2d::load(
                &vp.pp("upsample").pp(0),
                features,
                3 * scale * scale,
                3,
                1,
                1,
            )?,
            scale,
        })
    }

    /// On an image whose sides are whole patches (the descriptor's size requirement).
    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let shallow = self.first.forward(image);
        let deep = self
            .units
            .iter()
            .try_fold(shallow.shallow_clone(), |x, unit| unit.forward(&x, between))?;
        let features = self.after.forward(&deep) + shallow;
        Ok(self.upsample.forward(&features).pixel_shuffle(self.scale))
    }
}
