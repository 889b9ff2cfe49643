//! KAIR's U-Net as DRUNet and FBCNN build it (`__arch_helpers/dpir_basic_block.py` and
//! FBCNN's copy of it): a 3×3 head; three levels of residual blocks (a 3×3 convolution,
//! ReLU, a 3×3 convolution, plus the input), each closed by a ×2 downsampler; the lowest
//! level's blocks (each network's own); three levels opened by a ×2 upsampler over the sum
//! with the encoder's output at that size; a 3×3 tail over the sum with the head's. And
//! the noise-level map spandrel's call adds to DnCNN's and DRUNet's input.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::upscale::layout::{KairDownsample, KairUnet, KairUpsample};
use crate::engine::upscale::patch_conv::PatchConv;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The encoder's levels, top down.
const DOWN: [&str; 3] = ["m_down1", "m_down2", "m_down3"];
/// The decoder's levels, bottom up.
const UP: [&str; 3] = ["m_up3", "m_up2", "m_up1"];

/// The noise level spandrel's call gives FDnCNN and DRUNet ("default from repo").
pub const NOISE_LEVEL: f64 = 15.0 / 255.0;

/// `image` with the constant noise-level map as one more channel.
pub fn with_noise_map(image: &Tensor) -> Tensor {
    let size = image.size();
    let map = Tensor::full(
        [size[0], 1, size[2], size[3]],
        NOISE_LEVEL,
        (image.kind(), image.device()),
    );
    Tensor::cat(&[image, &map], 1)
}

/// `ResBlock` (and FBCNN's `QFAttention`, which scales and shifts the residual).
pub struct ResBlock {
    first: SameConv,
    second: SameConv,
}

impl ResBlock {
    /// The block under `vp` (its convolutions at `res.0` and `res.2`).
    pub fn load(vp: &VarPath, width: i64, bias: bool) -> Result<Self> {
        let res = vp.pp("res");
        Ok(Self {
            first: SameConv::load(&res.pp(0), [width, width], 3, 1, bias)?,
            second: SameConv::load(&res.pp(2), [width, width], 3, 1, bias)?,
        })
    }

    fn residual(&self, x: &Tensor) -> Tensor {
        let mut y = self.first.forward(x);
        let _ = y.relu_();
        self.second.forward(&y)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = self.residual(x);
        let _ = y.g_add_(x);
        y
    }

    /// `QFAttention`: the residual times `gamma` plus `beta` ([N, C, 1, 1] each).
    fn modulated(&self, x: &Tensor, [gamma, beta]: &[Tensor; 2]) -> Tensor {
        let mut y = self.residual(x);
        let _ = y.g_mul_(gamma).g_add_(beta).g_add_(x);
        y
    }
}

/// `blocks` in turn from `x`, `between` asked before each.
pub fn through(blocks: &[ResBlock], x: Tensor, between: &mut Between<'_>) -> Result<Tensor> {
    in_turn(x, blocks, between, ResBlock::forward)
}

/// The residual blocks numbered `first..first + count` under `vp`.
pub fn blocks(
    vp: &VarPath,
    first: i64,
    count: i64,
    width: i64,
    bias: bool,
) -> Result<Vec<ResBlock>> {
    (first..first + count)
        .map(|b| ResBlock::load(&vp.pp(b), width, bias))
        .collect()
}

/// A ×2 downsampler.
enum Downsample {
    /// A 2×2 convolution of stride 2.
    Strided(PatchConv),
    /// A 2×2 average pool, then the 3×3 convolution.
    Pooled(SameConv),
}

impl Downsample {
    /// The downsampler after `blocks` blocks in the level under `vp`.
    fn load(
        vp: &VarPath,
        blocks: i64,
        mode: KairDownsample,
        widths: [i64; 2],
        bias: bool,
    ) -> Result<Self> {
        Ok(match mode {
            KairDownsample::StrideConv => {
                Downsample::Strided(PatchConv::down(&vp.pp(blocks), widths, bias)?)
            }
            // The pool is entry `blocks`, its convolution the next.
            KairDownsample::AvgPool => {
                Downsample::Pooled(SameConv::load(&vp.pp(blocks + 1), widths, 3, 1, bias)?)
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Downsample::Strided(conv) => conv.forward(x),
            Downsample::Pooled(conv) => {
                conv.forward(&x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None))
            }
        }
    }
}

/// A ×2 upsampler.
enum Upsample {
    /// A 2×2 transposed convolution of stride 2.
    Transposed(PatchConv),
    /// The 3×3 convolution to four times the width, then the shuffle.
    Shuffled(SameConv),
    /// The nearest ×2 enlargement, then the 3×3 convolution.
    Enlarged(SameConv),
}

impl Upsample {
    /// The upsampler whose one convolution is under `vp`.
    fn load(
        vp: &VarPath,
        mode: KairUpsample,
        [input, output]: [i64; 2],
        bias: bool,
    ) -> Result<Self> {
        Ok(match mode {
            KairUpsample::ConvTranspose => {
                Upsample::Transposed(PatchConv::up(vp, [input, output], bias)?)
            }
            KairUpsample::PixelShuffle => {
                Upsample::Shuffled(SameConv::load(vp, [input, 4 * output], 3, 1, bias)?)
            }
            KairUpsample::UpConv => {
                Upsample::Enlarged(SameConv::load(vp, [input, output], 3, 1, bias)?)
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Upsample::Transposed(conv) => conv.forward(x),
            Upsample::Shuffled(conv) => conv.forward(x).pixel_shuffle(2),
            Upsample::Enlarged(conv) => {
                let size = x.size();
                conv.forward(&x.upsample_nearest2d([2 * size[2], 2 * size[3]], 2.0, 2.0))
            }
        }
    }
}

/// How a decoder level stores its upsampler: flattened into the level's sequence with its
/// blocks (DRUNet), or as the first entry of a list (FBCNN, whose blocks are modulated).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UpLevels {
    Flattened,
    Listed,
}

impl UpLevels {
    /// The upsampler's convolution under the level `vp`, and the index of its first block.
    fn upsampler<'a>(self, vp: &VarPath<'a>, mode: KairUpsample) -> (VarPath<'a>, i64) {
        match (self, mode) {
            (UpLevels::Flattened, KairUpsample::ConvTranspose) => (vp.pp(0), 1),
            (UpLevels::Flattened, KairUpsample::PixelShuffle) => (vp.pp(0), 2),
            (UpLevels::Flattened, KairUpsample::UpConv) => (vp.pp(1), 2),
            (UpLevels::Listed, KairUpsample::ConvTranspose) => (vp.pp(0), 1),
            (UpLevels::Listed, KairUpsample::PixelShuffle) => (vp.pp(0).pp(0), 1),
            (UpLevels::Listed, KairUpsample::UpConv) => (vp.pp(0).pp(1), 1),
        }
    }
}

/// The U-Net around the lowest level, which each network runs itself.
pub struct Unet {
    head: SameConv,
    down: Vec<(Vec<ResBlock>, Downsample)>,
    up: Vec<(Upsample, Vec<ResBlock>)>,
    tail: SameConv,
}

impl Unet {
    /// The U-Net `unet` from `input` channels to `channels`, its convolutions with biases
    /// where `bias`.
    pub fn load(
        vp: &VarPath,
        [input, channels]: [i64; 2],
        unet: KairUnet,
        bias: bool,
        levels: UpLevels,
    ) -> Result<Self> {
        let (widths, count) = (unet.widths, unet.blocks);
        let down = (0..3)
            .map(|l| {
                let level = vp.pp(DOWN[l]);
                let pair = [widths[l], widths[l + 1]];
                Ok((
                    blocks(&level, 0, count, widths[l], bias)?,
                    Downsample::load(&level, count, unet.downsample, pair, bias)?,
                ))
            })
            .collect::<Result<_>>()?;
        let up = (0..3)
            .map(|l| {
                let level = vp.pp(UP[l]);
                let (conv, first) = levels.upsampler(&level, unet.upsample);
                let [input, output] = [widths[3 - l], widths[2 - l]];
                Ok((
                    Upsample::load(&conv, unet.upsample, [input, output], bias)?,
                    blocks(&level, first, count, output, bias)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            head: SameConv::load(&vp.pp("m_head"), [input, widths[0]], 3, 1, bias)?,
            down,
            up,
            tail: SameConv::load(&vp.pp("m_tail"), [widths[0], channels], 3, 1, bias)?,
        })
    }

    /// The head's output and each encoder level's, the last the lowest level's input.
    pub fn encode(&self, x: &Tensor, between: &mut Between<'_>) -> Result<[Tensor; 4]> {
        let mut level = |l: usize, x: &Tensor| -> Result<Tensor> {
            let (blocks, down) = &self.down[l];
            Ok(down.forward(&through(blocks, x.shallow_clone(), between)?))
        };
        let x1 = self.head.forward(x);
        let x2 = level(0, &x1)?;
        let x3 = level(1, &x2)?;
        let x4 = level(2, &x3)?;
        Ok([x1, x2, x3, x4])
    }

    /// The decoder from the lowest level's output `x` and the encoder's `skips`; each
    /// level's blocks scaled and shifted by its pair of `modulation` where there is one
    /// (in the decoder's order: the lowest level first).
    pub fn decode(
        &self,
        x: Tensor,
        skips: &[Tensor; 4],
        modulation: Option<&[[Tensor; 2]; 3]>,
        between: &mut Between<'_>,
    ) -> Result<Tensor> {
        let mut x = x;
        for (l, (upsample, level)) in self.up.iter().enumerate() {
            let up = upsample.forward(&(x + &skips[3 - l]));
            x = match modulation {
                Some(pairs) => in_turn(up, level, between, |b, x| b.modulated(x, &pairs[l]))?,
                None => through(level, up, between)?,
            };
        }
        Ok(self.tail.forward(&(x + &skips[0])))
    }
}
