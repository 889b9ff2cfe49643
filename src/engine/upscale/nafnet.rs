//! NAFNet, as spandrel runs it (`NAFNet/__arch/NAFNet_arch.py`): the input padded with
//! zeros to a multiple of 2 per level; a 3×3 convolution to the width; encoder levels of
//! NAF blocks, each closed by a 2×2 convolution of stride 2 to twice the width; the
//! middle blocks; decoder levels opened by a 1×1 convolution and a ×2 pixel shuffle to
//! half the width plus the encoder's output at that size; a 3×3 convolution to the image
//! plus the input (restoration at the input's size).
//!
//! A NAF block: a channel layer norm, a 1×1 convolution to twice the width, a depthwise
//! 3×3 one, the simple gate (one half times the other), the simplified channel attention
//! (times a 1×1 convolution of its global average), a 1×1 convolution, scaled per channel
//! (`beta`) onto the input; then the norm, a 1×1 convolution to twice the width, the
//! gate, a 1×1 convolution, scaled (`gamma`) onto that.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::patch_conv::PatchConv;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The simple gate: the first half of the channels times the second.
fn gate(x: &Tensor) -> Tensor {
    let half = x.size()[1] / 2;
    x.narrow(1, 0, half) * x.narrow(1, half, half)
}

/// `NAFBlock` (its expansions 2).
struct NafBlock {
    norms: [ChannelNorm; 2],
    expand: SameConv,
    depthwise: SameConv,
    attention: SameConv,
    project: SameConv,
    beta: Tensor,
    ffn: [SameConv; 2],
    gamma: Tensor,
}

impl NafBlock {
    fn load(vp: &VarPath, width: i64) -> Result<Self> {
        let conv = |name: &str, widths: [i64; 2]| SameConv::load(&vp.pp(name), widths, 1, 1, true);
        let scale = |name: &str| vp.get(name, &[1, width, 1, 1]);
        Ok(Self {
            norms: [
                ChannelNorm::load(&vp.pp("norm1"), width)?,
                ChannelNorm::load(&vp.pp("norm2"), width)?,
            ],
            expand: conv("conv1", [width, 2 * width])?,
            depthwise: SameConv::depthwise(&vp.pp("conv2"), 2 * width, 3, true)?,
            attention: SameConv::load(&vp.pp("sca").pp(1), [width, width], 1, 1, true)?,
            project: conv("conv3", [width, width])?,
            beta: scale("beta")?,
            ffn: [
                conv("conv4", [width, 2 * width])?,
                conv("conv5", [width, width])?,
            ],
            gamma: scale("gamma")?,
        })
    }

    fn forward(&self, input: &Tensor) -> Tensor {
        let x = gate(
            &self
                .depthwise
                .forward(&self.expand.forward(&self.norms[0].forward(input))),
        );
        let pooled = x.mean_dim([2, 3].as_slice(), true, None);
        let x = self.project.forward(&(self.attention.forward(&pooled) * x));
        let y = x * &self.beta + input;
        let x = gate(&self.ffn[0].forward(&self.norms[1].forward(&y)));
        self.ffn[1].forward(&x) * &self.gamma + y
    }
}

/// The blocks numbered under `vp`, `count` of them, `width` wide.
fn blocks(vp: &VarPath, count: i64, width: i64) -> Result<Vec<NafBlock>> {
    (0..count)
        .map(|b| NafBlock::load(&vp.pp(b), width))
        .collect()
}

/// The blocks in turn from `x`, `between` asked before each.
fn through(blocks: &[NafBlock], x: Tensor, between: &mut Between<'_>) -> Result<Tensor> {
    in_turn(x, blocks, between, NafBlock::forward)
}

/// An encoder level: its blocks, then the strided convolution.
struct Encoder {
    blocks: Vec<NafBlock>,
    down: PatchConv,
}

/// A decoder level: the 1×1 convolution before the shuffle, then its blocks.
struct Decoder {
    up: SameConv,
    blocks: Vec<NafBlock>,
}

/// NAFNet.
pub struct NafNet {
    intro: SameConv,
    encoders: Vec<Encoder>,
    middle: Vec<NafBlock>,
    decoders: Vec<Decoder>,
    ending: SameConv,
}

impl NafNet {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::NafNet {
            channels,
            features,
            levels,
            encoders,
            decoders,
            middle,
        } = architecture
        else {
            unreachable!("a NAFNet architecture");
        };
        let width = |level: i64| features << level;
        let encoders = (0..levels)
            .map(|l| {
                let w = width(l);
                Ok(Encoder {
                    blocks: blocks(&vp.pp("encoders").pp(l), encoders[l as usize], w)?,
                    down: PatchConv::down(&vp.pp("downs").pp(l), [w, 2 * w], true)?,
                })
            })
            .collect::<Result<_>>()?;
        let decoders = (0..levels)
            .map(|l| {
                let w = width(levels - 1 - l);
                Ok(Decoder {
                    up: SameConv::load(&vp.pp("ups").pp(l).pp(0), [2 * w, 4 * w], 1, 1, false)?,
                    blocks: blocks(&vp.pp("decoders").pp(l), decoders[l as usize], w)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            intro: SameConv::load(&vp.pp("intro"), [channels, features], 3, 1, true)?,
            encoders,
            middle: blocks(&vp.pp("middle_blks"), middle, width(levels))?,
            decoders,
            ending: SameConv::load(&vp.pp("ending"), [features, channels], 3, 1, true)?,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let multiple = 1 << self.encoders.len();
        let pad = |side: i64| (multiple - side % multiple) % multiple;
        let input = image.constant_pad_nd([0, pad(width), 0, pad(height)]);
        let mut x = self.intro.forward(&input);
        let mut skips = Vec::with_capacity(self.encoders.len());
        for encoder in &self.encoders {
            x = through(&encoder.blocks, x, between)?;
            let down = encoder.down.forward(&x);
            skips.push(x);
            x = down;
        }
        x = through(&self.middle, x, between)?;
        for (decoder, skip) in self.decoders.iter().zip(skips.iter().rev()) {
            let up = decoder.up.forward(&x).pixel_shuffle(2);
            x = through(&decoder.blocks, up + skip, between)?;
        }
        let restored = self.ending.forward(&x) + input;
        Ok(restored.narrow(2, 0, height).narrow(3, 0, width))
    }
}
