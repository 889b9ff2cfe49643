//! SAFMN (spatially-adaptive feature modulation), as spandrel runs it
//! (`SAFMN/__arch/safmn.py`): blocks of a channel layer norm, the feature modulation (the
//! channels in four levels, each but the first max-pooled to 1/2, 1/4 and 1/8 of the
//! size, a depthwise 3×3 convolution, nearest upsampling back; mixed by a 1×1
//! convolution, GELU, times the normed input) and the convolutional channel mixer, each
//! added to its input; the blocks' sum with their input, a pixel shuffle.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::layout::safmn::LEVELS;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The spatially-adaptive feature modulation (`SAFM`).
struct Modulation {
    levels: Vec<SameConv>,
    aggregate: Conv2d,
}

impl Modulation {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        let chunk = dim / LEVELS;
        Ok(Self {
            levels: (0..LEVELS)
                .map(|i| SameConv::depthwise(&vp.pp("mfr").pp(i), chunk, 3, true))
                .collect::<Result<_>>()?,
            aggregate: Conv2d::load(&vp.pp("aggr"), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (height, width) = (size[2], size[3]);
        let chunks = x.chunk(LEVELS, 1);
        let levels: Vec<Tensor> = self
            .levels
            .iter()
            .zip(&chunks)
            .enumerate()
            .map(|(i, (conv, chunk))| {
                if i == 0 {
                    return conv.forward(chunk);
                }
                let pooled_size = [height >> i, width >> i];
                let (pooled, _) = chunk.adaptive_max_pool2d(pooled_size);
                conv.forward(&pooled)
                    .upsample_nearest2d([height, width], None, None)
            })
            .collect();
        let mixed = self.aggregate.forward(&Tensor::cat(&levels, 1));
        mixed.gelu("none") * x
    }
}

/// One `AttBlock` (SAFMN-BCIE's too).
pub(super) struct Block {
    norm1: ChannelNorm,
    modulation: Modulation,
    norm2: ChannelNorm,
    mixer: [Conv2d; 2],
}

impl Block {
    pub(super) fn load(vp: &VarPath, dim: i64, hidden: i64) -> Result<Self> {
        let ccm = vp.pp("ccm").pp("ccm");
        Ok(Self {
            norm1: ChannelNorm::load(&vp.pp("norm1"), dim)?,
            modulation: Modulation::load(&vp.pp("safm"), dim)?,
            norm2: ChannelNorm::load(&vp.pp("norm2"), dim)?,
            mixer: [
                Conv2d::load(&ccm.pp(0), dim, hidden, 3, 1, 1)?,
                Conv2d::load(&ccm.pp(2), hidden, dim, 1, 1, 0)?,
            ],
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.modulation.forward(&self.norm1.forward(x)) + x;
        let hidden = self.mixer[0].forward(&self.norm2.forward(&x)).gelu("none");
        self.mixer[1].forward(&hidden) + x
    }
}

/// SAFMN.
pub struct Safmn {
    first: Conv2d,
    blocks: Vec<Block>,
    last: Conv2d,
    scale: i64,
}

impl Safmn {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Safmn {
            channels,
            features,
            blocks,
            ffn_hidden,
            scale,
        } = architecture
        else {
            unreachable!("a SAFMN architecture");
        };
        let shuffled = channels * scale * scale;
        Ok(Self {
            first: Conv2d::load(&vp.pp("to_feat"), channels, features, 3, 1, 1)?,
            blocks: (0..blocks)
                .map(|b| Block::load(&vp.pp("feats").pp(b), features, ffn_hidden))
                .collect::<Result<_>>()?,
            last: Conv2d::load(&vp.pp("to_img").pp(0), features, shuffled, 3, 1, 1)?,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let features = self.first.forward(image);
        let body = in_turn(
            features.shallow_clone(),
            &self.blocks,
            between,
            |block, x| block.forward(x),
        )?;
        Ok(self
            .last
            .forward(&(body + features))
            .pixel_shuffle(self.scale))
    }
}
