//! MoSR (MambaOut super-resolution), as spandrel runs it (`MoSR/__arch/mosr_arch.py`, in
//! eval mode): gated CNN blocks (`gated_cnn.rs`, with a square depthwise convolution, the
//! input less 0.5 added), a convolutional tail, a convolutional shortcut from the image
//! less 0.5, then a pixel shuffle, the geometric ensemble pixel shuffle (eight
//! predictions averaged) or DySample.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::dysample::DySample;
use crate::engine::upscale::gated_cnn::GatedCnnBlock;
use crate::engine::upscale::layout::mosr::{DYSAMPLE_GROUPS, ENSEMBLE};
use crate::engine::upscale::layout::{Architecture, MoSrUpsampler};
use crate::engine::weights::VarPath;

/// The offset every residual in MoSR subtracts.
const RESIDUAL_OFFSET: f64 = 0.5;

/// How the features become the image.
enum Upsampler {
    /// A 3×3 convolution and a pixel shuffle.
    PixelShuffle(Conv2d),
    /// `GPS`: a 3×3 convolution to eight predictions of each sub-pixel, averaged, then a
    /// pixel shuffle.
    GeometricEnsemble(Conv2d),
    /// DySample's learned sampling.
    DySample(DySample),
}

/// MoSR.
pub struct MoSr {
    first: Conv2d,
    blocks: Vec<GatedCnnBlock>,
    /// The tail: a 3×3 convolution to twice the width, Mish, one back, Mish, a 1×1.
    tail: [Conv2d; 3],
    /// The shortcut's two Mish-activated 3×3 convolutions and its 1×1 one.
    shortcut: [Conv2d; 3],
    upsampler: Upsampler,
    scale: i64,
}

impl MoSr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::MoSr {
            channels,
            features: dim,
            blocks,
            scale,
            upsampler: kind,
            hidden,
            conv_channels,
            kernel,
        } = architecture
        else {
            unreachable!("a MoSR architecture");
        };
        let gblocks = vp.pp("gblocks");
        let tail = blocks + 1;
        let shortcut = vp.pp("shortcut");
        let shuffled = channels * scale * scale;
        let upsampler = vp.pp("upsampler");
        Ok(Self {
            first: Conv2d::load(&gblocks.pp(0), channels, dim, 3, 1, 1)?,
            blocks: (1..=blocks)
                .map(|b| {
                    let vp = gblocks.pp(b);
                    let widths = [dim, hidden];
                    GatedCnnBlock::mosr(&vp, widths, conv_channels, kernel, RESIDUAL_OFFSET)
                })
                .collect::<Result<_>>()?,
            tail: [
                Conv2d::load(&gblocks.pp(tail), dim, 2 * dim, 3, 1, 1)?,
                Conv2d::load(&gblocks.pp(tail + 2), 2 * dim, dim, 3, 1, 1)?,
                Conv2d::load(&gblocks.pp(tail + 4), dim, dim, 1, 1, 0)?,
            ],
            shortcut: [
                Conv2d::load(&shortcut.pp("block").pp(0), channels, dim, 3, 1, 1)?,
                Conv2d::load(&shortcut.pp("block").pp(2), dim, dim, 3, 1, 1)?,
                Conv2d::load(&shortcut.pp("conv11"), channels, dim, 1, 1, 0)?,
            ],
            upsampler: match kind {
                MoSrUpsampler::GeometricEnsemble => Upsampler::GeometricEnsemble(Conv2d::load(
                    &upsampler.pp("in_to_k"),
                    dim,
                    ENSEMBLE * shuffled,
                    3,
                    1,
                    1,
                )?),
                MoSrUpsampler::PixelShuffle => {
                    Upsampler::PixelShuffle(Conv2d::load(&upsampler.pp(0), dim, shuffled, 3, 1, 1)?)
                }
                MoSrUpsampler::DySample => Upsampler::DySample(DySample::load(
                    &upsampler,
                    [dim, channels],
                    DYSAMPLE_GROUPS,
                    scale,
                    true,
                )?),
            },
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let x = in_turn(
            self.first.forward(image),
            &self.blocks,
            between,
            |block, x| block.forward(x),
        )?;
        let [widen, narrow, project] = &self.tail;
        let x = project.forward(&narrow.forward(&widen.forward(&x).mish()).mish());
        let [first, second, direct] = &self.shortcut;
        let shortcut = second.forward(&first.forward(image).mish()).mish() + direct.forward(image);
        let features = x + (shortcut - RESIDUAL_OFFSET);
        let shuffled = match &self.upsampler {
            Upsampler::DySample(dysample) => return Ok(dysample.forward(&features)),
            Upsampler::PixelShuffle(conv) => conv.forward(&features),
            Upsampler::GeometricEnsemble(conv) => {
                let predictions = conv.forward(&features);
                let size = predictions.size();
                predictions
                    .reshape([size[0], ENSEMBLE, -1, size[2], size[3]])
                    .mean_dim(1, false, None)
            }
        };
        Ok(shuffled.pixel_shuffle(self.scale))
    }
}
