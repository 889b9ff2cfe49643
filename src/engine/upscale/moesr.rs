//! MoESR (MambaOut excitation super-resolution), as spandrel runs it
//! (`MoESR/__arch/MoESR.py`): the image reflected to even sides, a 3×3 convolution to
//! the features, groups of gated CNN blocks (`gated_cnn.rs`, with the inception depthwise
//! convolution and a learned scale) each ending with the multi-scale gate (a convolution
//! to a quarter of the width, a ×2 pixel unshuffle, three gated blocks at half the size,
//! a convolution and ×2 pixel shuffle back, plus its input); the groups' sum with their
//! input through one of `UniUpsample`'s upsamplers, cropped to the image's sides.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::gated_cnn::GatedCnnBlock;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::uni_upsample::{Upsample, UpsampleSpec};
use crate::engine::weights::VarPath;

/// The multi-scale gate's LeakyReLU slope.
const GATE_SLOPE: f64 = 0.1;
/// Its gated blocks.
const GATE_BLOCKS: i64 = 3;

/// `MSG`: the multi-scale gate.
struct MultiScaleGate {
    down: Conv2d,
    gated: Vec<GatedCnnBlock>,
    up: Conv2d,
}

impl MultiScaleGate {
    fn load(vp: &VarPath, dim: i64, hidden: i64) -> Result<Self> {
        Ok(Self {
            down: Conv2d::load(&vp.pp("down").pp(0), dim, dim / 4, 3, 1, 1)?,
            gated: (0..GATE_BLOCKS)
                .map(|b| GatedCnnBlock::moesr(&vp.pp("gated").pp(b), [dim, hidden]))
                .collect::<Result<_>>()?,
            up: Conv2d::load(&vp.pp("up").pp(0), dim, 4 * dim, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let down = leaky_in_place(self.down.forward(x).pixel_unshuffle(2), GATE_SLOPE);
        let gated = self.gated.iter().fold(down, |y, block| block.forward(&y));
        leaky_in_place(self.up.forward(&gated).pixel_shuffle(2), GATE_SLOPE) + x
    }
}

/// One of `blocks`: its gated blocks, then the gate.
struct Group {
    blocks: Vec<GatedCnnBlock>,
    gate: MultiScaleGate,
}

/// MoESR.
pub struct MoEsr {
    first: Conv2d,
    groups: Vec<Group>,
    upsample: Upsample,
    scale: i64,
}

impl MoEsr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::MoEsr {
            channels,
            features: dim,
            groups,
            blocks,
            hidden,
            msg_hidden,
            upsampler,
            upsample_features,
            scale,
        } = architecture
        else {
            unreachable!("a MoESR architecture");
        };
        let groups = (0..groups)
            .map(|g| {
                let group = vp.pp("blocks").pp(g);
                Ok(Group {
                    blocks: (0..blocks)
                        .map(|b| GatedCnnBlock::moesr(&group.pp("blocks").pp(b), [dim, hidden]))
                        .collect::<Result<_>>()?,
                    gate: MultiScaleGate::load(&group.pp("msg"), dim, msg_hidden)?,
                })
            })
            .collect::<Result<_>>()?;
        let spec = UpsampleSpec {
            upsampler,
            features: dim,
            inner: upsample_features,
            channels,
            scale,
            version_three: false,
        };
        Ok(Self {
            first: Conv2d::load(&vp.pp("in_to_dim"), channels, dim, 3, 1, 1)?,
            groups,
            upsample: Upsample::load(&vp.pp("upscale"), &spec)?,
            scale,
        })
    }

    /// `image` of sides of at least 2 (the size requirement), so that an odd side
    /// reflects.
    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let padded = match (height % 2, width % 2) {
            (0, 0) => image.shallow_clone(),
            (h, w) => image.reflection_pad2d([0, w, 0, h]),
        };
        let features = self.first.forward(&padded);
        let body = in_turn(
            features.shallow_clone(),
            &self.groups,
            between,
            |group, x| {
                let y = group
                    .blocks
                    .iter()
                    .fold(x.shallow_clone(), |y, b| b.forward(&y));
                group.gate.forward(&y)
            },
        )?;
        let out = self.upsample.forward(&(body + features));
        Ok(out
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}
