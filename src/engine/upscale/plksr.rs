//! PLKSR and RealPLKSR (partial large kernel CNNs), as spandrel runs them
//! (`PLKSR/__arch/PLKSR.py` and `RealPLKSR.py`, in eval mode, pixel-shuffle output):
//! blocks of a convolutional channel mixer, a large-kernel layer over the first channels,
//! element-wise attention and a 1×1 refinement, each added to its input (RealPLKSR's
//! with a group norm after, or a channel layer norm before); the output plus the input
//! repeated per sub-pixel, pixel-shuffled or sampled by DySample.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, GroupNorm};
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::dysample::DySample;
use crate::engine::upscale::layout::{dysample_groups, Architecture, LargeKernel};
use crate::engine::weights::VarPath;

/// RealPLKSR's fixed group count (not in the file).
const NORM_GROUPS: i64 = 4;
/// `nn.GroupNorm`'s epsilon.
const GROUP_NORM_EPS: f64 = 1e-5;
/// A sparse large-kernel layer's kernels and dilations (spandrel's defaults: the file
/// cannot tell the dilations).
const SPARSE_KERNEL: i64 = 5;
const SPARSE_DILATIONS: [i64; 4] = [1, 2, 3, 4];

/// A size-keeping convolution of any kernel shape and dilation (the large kernels).
struct KernelConv {
    weight: Tensor,
    bias: Tensor,
    padding: [i64; 2],
    dilation: i64,
}

impl KernelConv {
    fn load(vp: &VarPath, channels: i64, [rows, columns]: [i64; 2], dilation: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[channels, channels, rows, columns])?,
            bias: vp.get("bias", &[channels])?,
            padding: [rows / 2 * dilation, columns / 2 * dilation],
            dilation,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dilation = [self.dilation, self.dilation];
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [1, 1],
            self.padding,
            dilation,
            1,
        )
    }
}

/// The activation between the channel mixer's convolutions.
#[derive(Clone, Copy)]
enum MixerActivation {
    Gelu,
    Mish,
}

/// One PLKBlock of either network.
struct Block {
    layer_norm: Option<ChannelNorm>,
    mixer: [Conv2d; 2],
    activation: MixerActivation,
    /// The large-kernel layer's convolutions, summed over the first `split` channels.
    large_kernel: Vec<KernelConv>,
    split: i64,
    attention: Option<Conv2d>,
    refine: Conv2d,
    norm: Option<GroupNorm>,
}

impl Block {
    /// A PLKSR block (its mixer stored as `channe_mixer`, as the reference names it).
    fn load_original(vp: &VarPath, architecture: &Architecture) -> Result<Self> {
        let Architecture::Plksr {
            features: dim,
            kernel,
            split,
            attention,
            mixer,
            large_kernel,
            ..
        } = *architecture
        else {
            unreachable!("a PLKSR architecture");
        };
        let lk = vp.pp("lk");
        let large_kernel = match large_kernel {
            LargeKernel::Plain => vec![KernelConv::load(&lk.pp("conv"), split, [kernel; 2], 1)?],
            LargeKernel::Sparse => SPARSE_DILATIONS
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    KernelConv::load(&lk.pp("convs").pp(i), split, [SPARSE_KERNEL; 2], d)
                })
                .collect::<Result<_>>()?,
            LargeKernel::Rectangular => {
                let (long, short) = (kernel, kernel / 3);
                vec![
                    KernelConv::load(&lk.pp("mn_conv"), split, [long, short], 1)?,
                    KernelConv::load(&lk.pp("nm_conv"), split, [short, long], 1)?,
                    KernelConv::load(&lk.pp("nn_conv"), split, [short, short], 1)?,
                ]
            }
        };
        Ok(Self {
            layer_norm: None,
            mixer: load_mixer(&vp.pp("channe_mixer"), dim, mixer.kernels())?,
            activation: MixerActivation::Gelu,
            large_kernel,
            split,
            attention: load_attention(vp, dim, attention)?,
            refine: Conv2d::load(&vp.pp("refine"), dim, dim, 1, 1, 0)?,
            norm: None,
        })
    }

    /// A RealPLKSR block.
    fn load_real(vp: &VarPath, architecture: &Architecture) -> Result<Self> {
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
        let (layer_norm, norm) = if layer_norm {
            let norm = ChannelNorm::load(&vp.pp("layer_norm"), dim)?;
            (Some(norm), None)
        } else {
            let norm = GroupNorm::load(&vp.pp("norm"), NORM_GROUPS, dim, GROUP_NORM_EPS)?;
            (None, Some(norm))
        };
        Ok(Self {
            layer_norm,
            mixer: load_mixer(&vp.pp("channel_mixer"), dim, [3, 3])?,
            activation: MixerActivation::Mish,
            large_kernel: vec![KernelConv::load(
                &vp.pp("lk").pp("conv"),
                split,
                [kernel; 2],
                1,
            )?],
            split,
            attention: load_attention(vp, dim, attention)?,
            refine: Conv2d::load(&vp.pp("refine"), dim, dim, 1, 1, 0)?,
            norm,
        })
    }

    fn forward(&self, skip: &Tensor) -> Tensor {
        let x = match &self.layer_norm {
            Some(norm) => norm.forward(skip),
            None => skip.shallow_clone(),
        };
        let mixed = self.mixer[0].forward(&x);
        let mixed = match self.activation {
            MixerActivation::Gelu => mixed.gelu("none"),
            MixerActivation::Mish => mixed.mish(),
        };
        let x = self.mixer[1].forward(&mixed);
        // The large kernel rewrites the first channels in place, as the reference does
        // in eval mode.
        let mut first = x.narrow(1, 0, self.split);
        let convolved = self.large_kernel[1..]
            .iter()
            .fold(self.large_kernel[0].forward(&first), |sum, conv| {
                sum + conv.forward(&first)
            });
        first.copy_(&convolved);
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

/// The channel mixer's two convolutions through twice the width, of `kernels` sides.
fn load_mixer(vp: &VarPath, dim: i64, kernels: [i64; 2]) -> Result<[Conv2d; 2]> {
    let [a, b] = kernels;
    Ok([
        Conv2d::load(&vp.pp(0), dim, 2 * dim, a, 1, a / 2)?,
        Conv2d::load(&vp.pp(2), 2 * dim, dim, b, 1, b / 2)?,
    ])
}

/// The element-wise attention's 3×3 convolution, where the blocks have one.
fn load_attention(vp: &VarPath, dim: i64, attention: bool) -> Result<Option<Conv2d>> {
    attention
        .then(|| Conv2d::load(&vp.pp("attn").pp("f").pp(0), dim, dim, 3, 1, 1))
        .transpose()
}

/// PLKSR or RealPLKSR.
pub struct Plksr {
    first: Conv2d,
    blocks: Vec<Block>,
    last: Conv2d,
    /// RealPLKSR's DySample in place of the pixel shuffle.
    dysample: Option<DySample>,
    scale: i64,
}

impl Plksr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        // RealPLKSR keeps a dropout between the blocks and the last convolution.
        let (features, blocks, last, block): (_, _, _, BlockLoader) = match architecture {
            Architecture::Plksr {
                features, blocks, ..
            } => (features, blocks, blocks + 1, Block::load_original),
            Architecture::RealPlksr {
                features, blocks, ..
            } => (features, blocks, blocks + 2, Block::load_real),
            _ => unreachable!("a PLKSR architecture"),
        };
        let (channels, scale) = (architecture.channels(), architecture.scale());
        let feats = vp.pp("feats");
        let shuffled = channels * scale * scale;
        let dysample = match architecture {
            Architecture::RealPlksr { dysample: true, .. } => Some(DySample::load(
                &vp.pp("to_img"),
                [shuffled, channels],
                dysample_groups(scale),
                scale,
                scale != 1,
            )?),
            _ => None,
        };
        Ok(Self {
            first: Conv2d::load(&feats.pp(0), channels, features, 3, 1, 1)?,
            blocks: (1..=blocks)
                .map(|b| block(&feats.pp(b), &architecture))
                .collect::<Result<_>>()?,
            last: Conv2d::load(&feats.pp(last), features, shuffled, 3, 1, 1)?,
            dysample,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let features = in_turn(
            self.first.forward(image),
            &self.blocks,
            between,
            |block, x| block.forward(x),
        )?;
        let repeats = self.scale * self.scale;
        let repeated = image.repeat_interleave_self_int(repeats, 1, None);
        let shuffled = self.last.forward(&features) + repeated;
        Ok(match &self.dysample {
            Some(dysample) => dysample.forward(&shuffled),
            None => shuffled.pixel_shuffle(self.scale),
        })
    }
}

/// Loads one block of an architecture.
type BlockLoader = fn(&VarPath, &Architecture) -> Result<Block>;
