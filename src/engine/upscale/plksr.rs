//! RealPLKSR (partial large kernel CNN), as spandrel runs it
//! (`PLKSR/__arch/RealPLKSR.py`, in eval mode, pixel-shuffle output): blocks of a doubled
//! convolutional channel mixer, a large-kernel convolution over the first channels,
//! element-wise attention, a 1×1 refinement and a group norm (or a channel layer norm
//! first), each added to its input; the output plus the input repeated per sub-pixel.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, GroupNorm};
use crate::engine::upscale::layout::Architecture;
use crate::engine::weights::VarPath;

/// RealPLKSR's fixed group count (not in the file).
const NORM_GROUPS: i64 = 4;
/// `nn.GroupNorm`'s epsilon.
const GROUP_NORM_EPS: f64 = 1e-5;
/// Its own channel layer norm's epsilon.
const LAYER_NORM_EPS: f64 = 1e-6;

/// The channel layer norm RealPLKSR defines (over dim 1, biased variance).
struct ChannelNorm {
    weight: Tensor,
    bias: Tensor,
}

impl ChannelNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mean = x.mean_dim(1, true, None);
        let centred = x - mean;
        let variance = centred.square().mean_dim(1, true, None);
        let normalised = centred / (variance + LAYER_NORM_EPS).sqrt();
        let per_channel = |t: &Tensor| t.view([1, -1, 1, 1]);
        normalised * per_channel(&self.weight) + per_channel(&self.bias)
    }
}

/// One PLKBlock.
struct Block {
    layer_norm: Option<ChannelNorm>,
    mixer: [Conv2d; 2],
    large_kernel: Conv2d,
    split: i64,
    attention: Option<Conv2d>,
    refine: Conv2d,
    norm: Option<GroupNorm>,
}

impl Block {
    fn load(vp: &VarPath, architecture: &Architecture) -> Result<Self> {
        let Architecture::RealPlksr {
            features: dim,
            kernel,
            split,
            attention,
            layer_norm,
            ..
        } = *architecture
        else {
            unreachable!("a RealPLKSR architecture");
        };
        let layer_norm = if layer_norm {
            let ln = vp.pp("layer_norm");
            Some(ChannelNorm {
                weight: ln.get("weight", &[dim])?,
                bias: ln.get("bias", &[dim])?,
            })
        } else {
            None
        };
        let mixer = vp.pp("channel_mixer");
        Ok(Self {
            norm: match layer_norm {
                Some(_) => None,
                None => Some(GroupNorm::load(
                    &vp.pp("norm"),
                    NORM_GROUPS,
                    dim,
                    GROUP_NORM_EPS,
                )?),
            },
            layer_norm,
            mixer: [
                Conv2d::load(&mixer.pp(0), dim, 2 * dim, 3, 1, 1)?,
                Conv2d::load(&mixer.pp(2), 2 * dim, dim, 3, 1, 1)?,
            ],
            large_kernel: Conv2d::load(
                &vp.pp("lk").pp("conv"),
                split,
                split,
                kernel,
                1,
                kernel / 2,
            )?,
            split,
            attention: match attention {
                true => Some(Conv2d::load(
                    &vp.pp("attn").pp("f").pp(0),
                    dim,
                    dim,
                    3,
                    1,
                    1,
                )?),
                false => None,
            },
            refine: Conv2d::load(&vp.pp("refine"), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, skip: &Tensor) -> Tensor {
        let x = match &self.layer_norm {
            Some(norm) => norm.forward(skip),
            None => skip.shallow_clone(),
        };
        let x = self.mixer[1].forward(&self.mixer[0].forward(&x).mish());
        // The large kernel rewrites the first channels in place, as the reference does
        // in eval mode.
        let mut first = x.narrow(1, 0, self.split);
        first.copy_(&self.large_kernel.forward(&first));
        let x = match &self.attention {
            Some(f) => &x * f.forward(&x).sigmoid(),
            None => x,
        };
        let x = self.refine.forward(&x);
        let x = match &self.norm {
            Some(norm) => norm.forward(&x),
            None => x,
        };
        x + skip
    }
}

/// RealPLKSR.
pub struct RealPlksr {
    first: Conv2d,
    blocks: Vec<Block>,
    last: Conv2d,
    scale: i64,
}

impl RealPlksr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::RealPlksr {
            channels,
            features,
            blocks,
            scale,
            ..
        } = architecture
        else {
            unreachable!("a RealPLKSR architecture");
        };
        let feats = vp.pp("feats");
        Ok(Self {
            first: Conv2d::load(&feats.pp(0), channels, features, 3, 1, 1)?,
            blocks: (1..=blocks)
                .map(|b| Block::load(&feats.pp(b), &architecture))
                .collect::<Result<_>>()?,
            last: Conv2d::load(
                &feats.pp(blocks + 2),
                features,
                channels * scale * scale,
                3,
                1,
                1,
            )?,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor) -> Tensor {
        let features = self
            .blocks
            .iter()
            .fold(self.first.forward(image), |x, block| block.forward(&x));
        let repeats = self.scale * self.scale;
        let repeated = image.repeat_interleave_self_int(repeats, 1, None);
        (self.last.forward(&features) + repeated).pixel_shuffle(self.scale)
    }
}
