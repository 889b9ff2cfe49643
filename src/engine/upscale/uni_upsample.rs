//! The upsamplers of spandrel's `UniUpsample` (MoESR) and `UniUpsampleV3` (FDAT), as
//! spandrel builds them: a sequence of layers whose positions name the stored tensors,
//! one sequence per upsampler (at scale 1 every upsampler is one 3×3 convolution).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::deformable_upsample::DeformableUpsample;
use crate::engine::upscale::dysample::DySample;
use crate::engine::upscale::layout::uni_upsample::{UniUpsampler, DYSAMPLE_GROUPS};
use crate::engine::weights::VarPath;

/// `nn.LeakyReLU()`'s default slope, and the one the nearest and pixel-attention
/// upsamplers give theirs.
const DEFAULT_SLOPE: f64 = 0.01;
const STEEP_SLOPE: f64 = 0.2;

/// One layer of the sequence.
enum Layer {
    Conv(Conv2d),
    Leaky(f64),
    Shuffle(i64),
    Nearest(i64),
    Gelu,
    /// A transposed convolution's weight [in, out, k, k], bias, stride and padding.
    Transposed(Tensor, Tensor, i64, i64),
    /// `PA`: the input times the sigmoid of its 1×1 convolution.
    PixelAttention(Conv2d),
    DySample(DySample),
    Deformable(DeformableUpsample),
}

impl Layer {
    fn forward(&self, x: Tensor) -> Tensor {
        match self {
            Layer::Conv(conv) => conv.forward(&x),
            Layer::Leaky(slope) => leaky_in_place(x, *slope),
            Layer::Shuffle(factor) => x.pixel_shuffle(*factor),
            Layer::Nearest(factor) => {
                let size = x.size();
                let f = *factor as f64;
                x.upsample_nearest2d([size[2] * factor, size[3] * factor], f, f)
            }
            Layer::Gelu => x.gelu("none"),
            Layer::Transposed(weight, bias, stride, padding) => x.conv_transpose2d(
                weight,
                Some(bias),
                [*stride, *stride],
                [*padding, *padding],
                [0, 0],
                1,
                [1, 1],
            ),
            Layer::PixelAttention(conv) => {
                let gate = conv.forward(&x).sigmoid();
                x * gate
            }
            Layer::DySample(dysample) => dysample.forward(&x),
            Layer::Deformable(deformable) => deformable.forward(&x),
        }
    }
}

/// The sequence under construction: each layer takes the next position.
struct Sequence<'a> {
    vp: &'a VarPath<'a>,
    layers: Vec<Layer>,
}

impl Sequence<'_> {
    fn next(&self) -> VarPath<'_> {
        self.vp.pp(self.layers.len() as i64)
    }

    /// A `kernel`×`kernel` convolution, padded to keep the size.
    fn conv(&mut self, input: i64, output: i64, kernel: i64) -> Result<()> {
        let conv = Conv2d::load(&self.next(), input, output, kernel, 1, kernel / 2)?;
        self.layers.push(Layer::Conv(conv));
        Ok(())
    }

    fn push(&mut self, layer: Layer) {
        self.layers.push(layer);
    }

    fn transposed(&mut self, [input, output]: [i64; 2], kernel: i64, stride: i64) -> Result<()> {
        let vp = self.next();
        let weight = vp.get("weight", &[input, output, kernel, kernel])?;
        let bias = vp.get("bias", &[output])?;
        let padding = if kernel == stride { 0 } else { 1 };
        self.layers
            .push(Layer::Transposed(weight, bias, stride, padding));
        Ok(())
    }
    /// `pixelshuffle`: a convolution to the inner width, LeakyReLU, the shuffle rounds,
    /// a convolution to the image.
    fn pixel_shuffle(&mut self, [dim, mid, out]: [i64; 3], scale: i64) -> Result<()> {
        self.conv(dim, mid, 3)?;
        self.push(Layer::Leaky(DEFAULT_SLOPE));
        for factor in rounds(scale) {
            self.conv(mid, factor * factor * mid, 3)?;
            self.push(Layer::Shuffle(factor));
        }
        self.conv(mid, out, 3)
    }

    /// `nearest+conv`: a convolution, nearest enlargement and LeakyReLU per round, a
    /// convolution and LeakyReLU, a convolution to the image.
    fn nearest(&mut self, [dim, out]: [i64; 2], scale: i64) -> Result<()> {
        for factor in rounds(scale) {
            self.conv(dim, dim, 3)?;
            self.push(Layer::Nearest(factor));
            self.push(Layer::Leaky(STEEP_SLOPE));
        }
        self.conv(dim, dim, 3)?;
        self.push(Layer::Leaky(STEEP_SLOPE));
        self.conv(dim, out, 3)
    }

    /// `dysample` and `lda`: a convolution to the inner width and LeakyReLU where it
    /// differs (the V3 upsampler's), then DySample (ending at the image) or the
    /// deformable attention and a convolution to the image.
    fn sampled(&mut self, spec: &UpsampleSpec) -> Result<()> {
        let [dim, mid, out] = [spec.features, spec.inner, spec.channels];
        let (kind, scale) = (spec.upsampler, spec.scale);
        let mid = if spec.version_three { mid } else { dim };
        if mid != dim {
            self.conv(dim, mid, 3)?;
            self.push(Layer::Leaky(DEFAULT_SLOPE));
        }
        let vp = self.next();
        if kind == UniUpsampler::DySample {
            let dysample = DySample::load(&vp, [mid, out], DYSAMPLE_GROUPS, scale, true)?;
            self.push(Layer::DySample(dysample));
            return Ok(());
        }
        self.push(Layer::Deformable(DeformableUpsample::load(
            &vp, mid, scale,
        )?));
        self.conv(mid, out, 3)
    }

    /// `transpose+conv`: one transposed convolution (x2, x3) or two with GELU between
    /// (x4), then a 3×3 convolution.
    fn transposed_rounds(&mut self, [dim, out]: [i64; 2], scale: i64) -> Result<()> {
        match scale {
            2 => self.transposed([dim, out], 4, 2)?,
            3 => self.transposed([dim, out], 3, 3)?,
            _ => {
                self.transposed([dim, dim], 4, 2)?;
                self.push(Layer::Gelu);
                self.transposed([dim, out], 4, 2)?;
            }
        }
        self.conv(out, out, 3)
    }

    /// `pa_up`: per round a nearest enlargement, a convolution to the inner width, pixel
    /// attention, LeakyReLU, a convolution, LeakyReLU; then a convolution to the image.
    fn pixel_attention(&mut self, [dim, mid, out]: [i64; 3], scale: i64) -> Result<()> {
        let mut input = dim;
        for factor in rounds(scale) {
            self.push(Layer::Nearest(factor));
            self.conv(input, mid, 3)?;
            let attention = Conv2d::load(&self.next().pp("conv").pp(0), mid, mid, 1, 1, 0)?;
            self.push(Layer::PixelAttention(attention));
            self.push(Layer::Leaky(STEEP_SLOPE));
            self.conv(mid, mid, 3)?;
            self.push(Layer::Leaky(STEEP_SLOPE));
            input = mid;
        }
        self.conv(mid, out, 3)
    }
}

/// The ×2 rounds of a power of two, or one ×3 round.
fn rounds(scale: i64) -> Vec<i64> {
    match scale {
        3 => vec![3],
        s => vec![2; s.max(1).ilog2() as usize],
    }
}

/// Which upsampler to build, and its widths.
pub struct UpsampleSpec {
    pub upsampler: UniUpsampler,
    /// The features' width (`in_dim`).
    pub features: i64,
    /// The inner width (`mid_dim`).
    pub inner: i64,
    /// The image channels it ends at.
    pub channels: i64,
    /// The factor it enlarges the features by.
    pub scale: i64,
    /// Whether it is FDAT's `UniUpsampleV3` (DySample after a convolution to the inner
    /// width) rather than MoESR's `UniUpsample` (DySample on the features).
    pub version_three: bool,
}

/// A loaded upsampler.
pub struct Upsample {
    layers: Vec<Layer>,
}

impl Upsample {
    /// The upsampler `spec` names, under `vp`.
    pub fn load(vp: &VarPath, spec: &UpsampleSpec) -> Result<Self> {
        let (upsampler, scale) = (spec.upsampler, spec.scale);
        let [dim, mid, out] = [spec.features, spec.inner, spec.channels];
        let mut s = Sequence {
            vp,
            layers: Vec::new(),
        };
        if scale == 1 || upsampler == UniUpsampler::Conv {
            s.conv(dim, out, 3)?;
            return Ok(Self { layers: s.layers });
        }
        match upsampler {
            UniUpsampler::Conv => {}
            UniUpsampler::PixelShuffleDirect => {
                s.conv(dim, out * scale * scale, 3)?;
                s.push(Layer::Shuffle(scale));
            }
            UniUpsampler::PixelShuffle => s.pixel_shuffle([dim, mid, out], scale)?,
            UniUpsampler::NearestConv => s.nearest([dim, out], scale)?,
            UniUpsampler::DySample | UniUpsampler::Lda => s.sampled(spec)?,
            UniUpsampler::TransposeConv => s.transposed_rounds([dim, out], scale)?,
            UniUpsampler::PixelAttention => s.pixel_attention([dim, mid, out], scale)?,
        }
        Ok(Self { layers: s.layers })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.layers
            .iter()
            .fold(x.shallow_clone(), |x, layer| layer.forward(x))
    }
}
