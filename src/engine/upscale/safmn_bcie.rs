//! SAFMN-BCIE, as spandrel runs it (`SAFMNBCIE/__arch/safmn_bcie.py`): a pixel unshuffle
//! and a 3×3 convolution to the features, groups of SAFMN's blocks (`safmn.rs`) each
//! closed by a 3×3 convolution plus the group's input, the groups' sum with their input,
//! a convolution and pixel shuffle back to the input's size, a 3×3 convolution to the
//! image: restoration at the input's size.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::safmn::Block;
use crate::engine::weights::VarPath;

/// `BasicLayer`: SAFMN's blocks, a convolution, plus the input.
struct Group {
    blocks: Vec<Block>,
    conv: Conv2d,
}

/// SAFMN-BCIE.
pub struct SafmnBcie {
    first: Conv2d,
    groups: Vec<Group>,
    /// The convolution before the shuffle, the one after it.
    last: [Conv2d; 2],
    unshuffle: i64,
}

impl SafmnBcie {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::SafmnBcie {
            channels,
            features: dim,
            groups,
            blocks,
            ffn_hidden,
            unshuffle,
        } = architecture
        else {
            unreachable!("a SAFMN-BCIE architecture");
        };
        let squared = unshuffle * unshuffle;
        let groups = (0..groups)
            .map(|g| {
                let group = vp.pp("feats").pp(g);
                Ok(Group {
                    blocks: (0..blocks)
                        .map(|b| Block::load(&group.pp("layers").pp(b), dim, ffn_hidden))
                        .collect::<Result<_>>()?,
                    conv: Conv2d::load(&group.pp("conv"), dim, dim, 3, 1, 1)?,
                })
            })
            .collect::<Result<_>>()?;
        let to_img = vp.pp("to_img");
        Ok(Self {
            first: Conv2d::load(&vp.pp("to_feat").pp(1), channels * squared, dim, 3, 1, 1)?,
            groups,
            last: [
                Conv2d::load(&to_img.pp(0), dim, dim * squared, 3, 1, 1)?,
                Conv2d::load(&to_img.pp(2), dim, channels, 3, 1, 1)?,
            ],
            unshuffle,
        })
    }

    /// `image` of sides the size requirement gives (multiples of the unshuffle).
    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let features = self.first.forward(&image.pixel_unshuffle(self.unshuffle));
        let body = in_turn(
            features.shallow_clone(),
            &self.groups,
            between,
            |group, x| {
                let y = group
                    .blocks
                    .iter()
                    .fold(x.shallow_clone(), |y, b| b.forward(&y));
                group.conv.forward(&y) + x
            },
        )?;
        let [widen, to_image] = &self.last;
        let shuffled = widen
            .forward(&(body + features))
            .pixel_shuffle(self.unshuffle);
        Ok(to_image.forward(&shuffled))
    }
}
