//! RCAN (residual channel attention network), as spandrel runs it
//! (`RCAN/__arch/rcan_arch.py`): the image (scaled to 0–255 and shifted by the stored
//! mean where the file has one; pixel-unshuffled after a reflection padding to whole
//! cells where the head asks) through a convolution, residual groups of residual blocks
//! with channel attention, a convolution and the long skip, pixel-shuffle rounds and a
//! last convolution.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::channel_attention::ChannelAttention;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::swin::pad_to_windows;
use crate::engine::weights::VarPath;

/// The mean-shifted networks' value range (`rgb_range`, which the file does not tell:
/// spandrel's 255).
const MEAN_SHIFT_RANGE: f64 = 255.0;

/// A `kernel`-sided convolution padded to keep the size (`default_conv`).
fn same_conv(vp: &VarPath, input: i64, output: i64, kernel: i64) -> Result<Conv2d> {
    Conv2d::load(vp, input, output, kernel, 1, kernel / 2)
}

/// The residual channel attention block (`RCAB`): two convolutions with a ReLU between,
/// channel attention, the input added.
struct Block {
    first: Conv2d,
    second: Conv2d,
    attention: ChannelAttention,
}

impl Block {
    fn load(vp: &VarPath, features: i64, kernel: i64, squeezed: i64) -> Result<Self> {
        let body = vp.pp("body");
        let attention = body.pp(3).pp("conv_du");
        Ok(Self {
            first: same_conv(&body.pp(0), features, features, kernel)?,
            second: same_conv(&body.pp(2), features, features, kernel)?,
            attention: ChannelAttention::load(
                &attention.pp(0),
                &attention.pp(2),
                features,
                squeezed,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.first.forward(x).relu_();
        let mut y = self.attention.forward(self.second.forward(&y));
        let _ = y.g_add_(x);
        y
    }
}

/// A residual group: its blocks, a convolution, the group's input added.
struct Group {
    blocks: Vec<Block>,
    conv: Conv2d,
}

impl Group {
    fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let y = in_turn(x.shallow_clone(), &self.blocks, between, |block, y| {
            block.forward(y)
        })?;
        let mut y = self.conv.forward(&y);
        let _ = y.g_add_(x);
        Ok(y)
    }
}

/// The image's 1×1 mean shifts (`sub_mean`, `add_mean`) as stored.
struct MeanShift {
    subtract: Conv2d,
    add: Conv2d,
}

/// RCAN.
pub struct Rcan {
    mean_shift: Option<MeanShift>,
    head: Conv2d,
    groups: Vec<Group>,
    body_end: Conv2d,
    /// The upsampler's rounds: a 3×3 convolution, then a pixel shuffle by the factor.
    rounds: Vec<(Conv2d, i64)>,
    last: Conv2d,
    unshuffle: i64,
    scale: i64,
}

impl Rcan {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Rcan {
            channels,
            features,
            groups,
            blocks,
            kernel,
            squeezed,
            scale,
            unshuffle,
            mean_shift,
        } = architecture
        else {
            unreachable!("an RCAN architecture");
        };
        let body = vp.pp("body");
        let groups = (0..groups)
            .map(|g| {
                let group = body.pp(g).pp("body");
                Ok(Group {
                    blocks: (0..blocks)
                        .map(|b| Block::load(&group.pp(b), features, kernel, squeezed))
                        .collect::<Result<_>>()?,
                    conv: same_conv(&group.pp(blocks), features, features, kernel)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = match unshuffle {
            1 => same_conv(&vp.pp("head").pp(0), channels, features, kernel)?,
            d => same_conv(&vp.pp("head").pp(1), channels * d * d, features, kernel)?,
        };
        let mean_shift = mean_shift
            .then(|| {
                Ok::<_, EngineError>(MeanShift {
                    subtract: Conv2d::load(&vp.pp("sub_mean"), channels, channels, 1, 1, 0)?,
                    add: Conv2d::load(&vp.pp("add_mean"), channels, channels, 1, 1, 0)?,
                })
            })
            .transpose()?;
        Ok(Self {
            mean_shift,
            head,
            body_end: same_conv(&body.pp(groups.len() as i64), features, features, kernel)?,
            groups,
            rounds: upsampling_rounds(&vp.pp("tail").pp(0), features, scale * unshuffle)?,
            last: same_conv(&vp.pp("tail").pp(1), features, channels, kernel)?,
            unshuffle,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let mut x = match self.unshuffle {
            1 => image.shallow_clone(),
            d => pad_to_windows(image, d),
        };
        if let Some(shift) = &self.mean_shift {
            x = shift.subtract.forward(&(x * MEAN_SHIFT_RANGE));
        }
        if self.unshuffle > 1 {
            x = x.pixel_unshuffle(self.unshuffle);
        }
        let features = self.head.forward(&x);
        let trunk = self
            .groups
            .iter()
            .try_fold(features.shallow_clone(), |y, group| {
                group.forward(&y, between)
            })?;
        let mut y = self.body_end.forward(&trunk);
        let _ = y.g_add_(&features);
        for (conv, factor) in &self.rounds {
            y = conv.forward(&y).pixel_shuffle(*factor);
        }
        let mut y = self.last.forward(&y);
        if let Some(shift) = &self.mean_shift {
            y = shift.add.forward(&y) / MEAN_SHIFT_RANGE;
        }
        Ok(y.narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}

/// `Upsampler`: ×2 rounds for a power of two, one ×3 round for 3.
fn upsampling_rounds(vp: &VarPath, features: i64, scale: i64) -> Result<Vec<(Conv2d, i64)>> {
    let factors = match scale {
        3 => vec![3],
        s => vec![2; s.max(1).ilog2() as usize],
    };
    factors
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let conv = Conv2d::load(&vp.pp(2 * i as i64), features, f * f * features, 3, 1, 1)?;
            Ok((conv, f))
        })
        .collect()
}
