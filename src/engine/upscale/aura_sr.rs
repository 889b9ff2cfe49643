//! AuraSR, GigaGAN's upsampler as spandrel runs it (`AuraSR/__arch/aura_sr.py`): the
//! image plus a thousandth of normal noise, clamped; a style drawn from normal noise
//! through an MLP and projected to every convolution's modulation; a U-Net whose
//! residual blocks are two convolutions that each mix their kernels by a softmax of the
//! style, modulate the kernel's input channels by it and demodulate (StyleGAN2), then
//! SiLU. Down levels keep their six block outputs for the up levels, which join them
//! (scaled by 0.4) onto their blocks' inputs; transformers (RMS norms, attention over
//! every pixel, a GELU feed-forward) on the levels that have them and in the middle; the
//! up path has more levels than the down path, which is the enlargement.
//!
//! The noise is drawn by the caller's generator, in the reference's order: the input's
//! noise (in NCHW order, as `randn_like` fills a contiguous input), then the style's.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, Linear};
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::layout::aura_sr::{AuraShape, BLOCKS, HEADS, LEVELS};
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The scale of the noise added to the input (`noise_scale`).
const INPUT_NOISE: f64 = 0.001;
/// The factor on skipped features (spandrel's `skip_connect_scale`).
const SKIP_SCALE: f64 = 0.4;
/// The style network's learning-rate multiplier (`lr_mul`), applied to its weights.
const STYLE_LR: f64 = 0.1;
/// The style network's LeakyReLU slope.
const STYLE_SLOPE: f64 = 0.2;
/// The demodulation's floor on the squared norm.
const DEMOD_EPS: f64 = 1e-8;
/// `F.normalize`'s floor on the norm.
const NORMALIZE_EPS: f64 = 1e-12;
/// The feed-forward's width over the level's.
const FF_MULT: i64 = 4;

/// Draws normal samples of a shape from the caller's generator.
pub type Draw<'a> = dyn FnMut(&[i64]) -> Tensor + 'a;

/// `x / max(‖x‖, eps)` along `dim` (`F.normalize`).
fn normalize(x: &Tensor, dim: i64) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2, [dim], true)
        .clamp_min(NORMALIZE_EPS);
    x / norm
}

/// A 3×3 convolution whose kernel mixes `kernels` by a softmax of its kernel modulation,
/// scales its input channels by one plus its modulation, and is demodulated.
struct ModulatedConv {
    /// [kernels, out, in, 3, 3].
    weights: Tensor,
    kernels: i64,
    input: i64,
}

impl ModulatedConv {
    fn load(vp: &VarPath, input: i64, out: i64, kernels: i64) -> Result<Self> {
        Ok(Self {
            weights: vp.get("weights", &[kernels, out, input, 3, 3])?,
            kernels,
            input,
        })
    }

    /// `x` [1, in, H, W] under `modulation` [1, in] and `kernel_modulation` [1, kernels].
    fn forward(&self, x: &Tensor, modulation: &Tensor, kernel_modulation: &Tensor) -> Tensor {
        // Products summed over the kernels, as the reference reduces them (a matrix
        // product would round differently).
        let mix =
            kernel_modulation
                .softmax(-1, self.weights.kind())
                .view([self.kernels, 1, 1, 1, 1]);
        let weight =
            (&self.weights * mix).sum_dim_intlist([0i64].as_slice(), false, self.weights.kind());
        let weight = weight * (modulation.view([1, self.input, 1, 1]) + 1.0);
        let norm = weight
            .square()
            .sum_dim_intlist([1i64, 2, 3].as_slice(), true, weight.kind())
            .clamp_min(DEMOD_EPS)
            .rsqrt();
        x.conv2d::<&Tensor>(&(weight * norm), None, [1, 1], [1, 1], [1, 1], 1)
    }
}

/// Two modulated convolutions, each through SiLU, plus the input (through a 1×1
/// convolution where the width changes).
struct ResnetBlock {
    convs: [ModulatedConv; 2],
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(vp: &VarPath, input: i64, out: i64, kernels: i64) -> Result<Self> {
        Ok(Self {
            convs: [
                ModulatedConv::load(&vp.pp("block1").pp("proj"), input, out, kernels)?,
                ModulatedConv::load(&vp.pp("block2").pp("proj"), out, out, kernels)?,
            ],
            shortcut: (input != out)
                .then(|| Conv2d::load(&vp.pp("res_conv"), input, out, 1, 1, 0))
                .transpose()?,
        })
    }

    /// The widths of its modulations, in the order the style's projection gives them.
    fn modulation_widths(&self) -> [i64; 4] {
        let [first, second] = &self.convs;
        [first.input, first.kernels, second.input, second.kernels]
    }

    fn forward(&self, x: &Tensor, modulations: &mut impl Iterator<Item = Tensor>) -> Tensor {
        let mut h = x.shallow_clone();
        for conv in &self.convs {
            let (modulation, kernel) = (next(modulations), next(modulations));
            h = conv.forward(&h, &modulation, &kernel).silu();
        }
        match &self.shortcut {
            Some(conv) => h + conv.forward(x),
            None => h + x,
        }
    }
}

/// The next modulation; the projection gives exactly as many as the blocks take.
fn next(modulations: &mut impl Iterator<Item = Tensor>) -> Tensor {
    modulations
        .next()
        .expect("one modulation per convolution, split at load")
}

/// `F.normalize` over the channels times a gain and the square root of the width.
struct RmsNorm {
    gain: Tensor,
    root: f64,
}

impl RmsNorm {
    fn load(vp: &VarPath, width: i64) -> Result<Self> {
        Ok(Self {
            gain: vp.get("g", &[1, width, 1, 1])?,
            root: (width as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        normalize(x, 1) * &self.gain * self.root
    }
}

/// A transformer layer: attention over every pixel, then a feed-forward, each normed
/// first and added to its input.
struct TransformerLayer {
    attention_norm: RmsNorm,
    qkv: SameConv,
    out: Conv2d,
    ff_norm: RmsNorm,
    ff_in: Conv2d,
    ff_out: Conv2d,
    hidden: i64,
}

impl TransformerLayer {
    fn load(vp: &VarPath, width: i64, head_width: i64) -> Result<Self> {
        let (attention, ff) = (vp.pp(0), vp.pp(1));
        let hidden = head_width * HEADS;
        Ok(Self {
            attention_norm: RmsNorm::load(&attention.pp("norm"), width)?,
            qkv: SameConv::load(&attention.pp("to_qkv"), [width, 3 * hidden], 1, 1, false)?,
            out: Conv2d::load(&attention.pp("to_out"), hidden, width, 1, 1, 0)?,
            ff_norm: RmsNorm::load(&ff.pp(0), width)?,
            ff_in: Conv2d::load(&ff.pp(1), width, FF_MULT * width, 1, 1, 0)?,
            ff_out: Conv2d::load(&ff.pp(3), FF_MULT * width, width, 1, 1, 0)?,
            hidden,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, h, w) = (size[0], size[2], size[3]);
        let qkv = self
            .qkv
            .forward(&self.attention_norm.forward(x))
            .view([b, 3, HEADS, self.hidden / HEADS, h * w])
            .transpose(3, 4);
        // Contiguous, as the reference hands them over.
        let part = |i: i64| qkv.select(1, i).contiguous();
        let attended = Tensor::scaled_dot_product_attention::<&Tensor>(
            &part(0),
            &part(1),
            &part(2),
            None,
            0.0,
            false,
            None,
            false,
        );
        let attended = attended.transpose(2, 3).reshape([b, self.hidden, h, w]);
        let x = self.out.forward(&attended) + x;
        let ff = self.ff_in.forward(&self.ff_norm.forward(&x)).gelu("none");
        self.ff_out.forward(&ff) + x
    }
}

/// Transformer layers in turn.
struct Transformer(Vec<TransformerLayer>);

impl Transformer {
    fn load(vp: &VarPath, width: i64, depth: i64, head_width: i64) -> Result<Self> {
        let layers = vp.pp("layers");
        (0..depth)
            .map(|i| TransformerLayer::load(&layers.pp(i), width, head_width))
            .collect::<Result<_>>()
            .map(Self)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.0.iter().fold(x.shallow_clone(), |x, l| l.forward(&x))
    }
}

/// The style MLP: the noise normalised, then linear layers (their weights times the
/// learning-rate multiplier) each through LeakyReLU.
struct StyleNetwork(Vec<(Tensor, Tensor)>);

impl StyleNetwork {
    fn load(vp: &VarPath, shape: &AuraShape) -> Result<Self> {
        (0..shape.style_depth)
            .map(|i| {
                let layer = vp.pp(2 * i);
                let input = if i == 0 {
                    shape.style_in
                } else {
                    shape.style_out
                };
                let weight = layer.get("weight", &[shape.style_out, input])? * STYLE_LR;
                let bias = layer.get("bias", &[shape.style_out])? * STYLE_LR;
                Ok((weight, bias))
            })
            .collect::<Result<_>>()
            .map(Self)
    }

    fn forward(&self, noise: &Tensor) -> Tensor {
        self.0
            .iter()
            .fold(normalize(noise, 1), |x, (weight, bias)| {
                leaky_in_place(x.linear(weight, Some(bias)), STYLE_SLOPE)
            })
    }
}

/// A down level: its blocks, a transformer where it has one, a strided convolution.
struct DownLevel {
    blocks: Vec<ResnetBlock>,
    attention: Option<Transformer>,
    downsample: Conv2d,
}

/// An up level: nearest ×2 and a convolution, its blocks (joining skipped features), a
/// transformer where it has one.
struct UpLevel {
    upsample: Conv2d,
    blocks: Vec<ResnetBlock>,
    attention: Option<Transformer>,
}

/// AuraSR.
pub struct AuraSr {
    shape: AuraShape,
    style: StyleNetwork,
    to_modulations: Linear,
    modulation_widths: Vec<i64>,
    init: Conv2d,
    downs: Vec<DownLevel>,
    mid: (ResnetBlock, Transformer, ResnetBlock),
    ups: Vec<UpLevel>,
    last_block: ResnetBlock,
    to_rgb: Conv2d,
}

impl AuraSr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::AuraSr(shape) = architecture else {
            unreachable!("an AuraSR architecture");
        };
        let block = |vp: &VarPath, input, out| ResnetBlock::load(vp, input, out, shape.kernels);
        let downs = (0..shape.downs)
            .map(|i| Self::load_down(vp, &shape, i))
            .collect::<Result<Vec<_>>>()?;
        let mid_width = shape.up_widths()[LEVELS];
        let mid = (
            block(&vp.pp("mid_block1"), mid_width, mid_width)?,
            Transformer::load(
                &vp.pp("mid_attn"),
                mid_width,
                shape.mid_depth,
                shape.head_width,
            )?,
            block(&vp.pp("mid_block2"), mid_width, mid_width)?,
        );
        let ups = (0..LEVELS)
            .map(|j| Self::load_up(vp, &shape, j))
            .collect::<Result<Vec<_>>>()?;
        let last_block = block(&vp.pp("final_res_block"), shape.dim, shape.dim)?;
        let all_blocks = downs
            .iter()
            .flat_map(|d| &d.blocks)
            .chain([&mid.0, &mid.2])
            .chain(ups.iter().flat_map(|u| &u.blocks))
            .chain([&last_block]);
        let modulation_widths: Vec<i64> = all_blocks
            .flat_map(ResnetBlock::modulation_widths)
            .collect();
        let total = modulation_widths.iter().sum();
        let first_width = shape.down_widths()[0];
        Ok(Self {
            style: StyleNetwork::load(&vp.pp("style_network").pp("net"), &shape)?,
            to_modulations: Linear::load(
                &vp.pp("style_to_conv_modulations"),
                shape.style_out,
                total,
                true,
            )?,
            modulation_widths,
            init: Conv2d::load(&vp.pp("init_conv"), shape.channels, first_width, 7, 1, 3)?,
            downs,
            mid,
            ups,
            last_block,
            to_rgb: Conv2d::load(&vp.pp("final_to_rgb"), shape.dim, shape.channels, 1, 1, 0)?,
            shape,
        })
    }

    /// Down level `i` (from the finest), stored as `downs.i`.
    fn load_down(vp: &VarPath, shape: &AuraShape, i: usize) -> Result<DownLevel> {
        let level = vp.pp("downs").pp(i as i64);
        let widths = shape.down_widths();
        let (width, next) = (widths[i], widths[i + 1]);
        let blocks = (0..BLOCKS as i64)
            .map(|b| ResnetBlock::load(&level.pp(0).pp(b), width, width, shape.kernels))
            .collect::<Result<_>>()?;
        let attention = shape.attention[i]
            .then(|| {
                let depth = shape.attention_depths[i];
                Transformer::load(&level.pp(1).pp(0), width, depth, shape.head_width)
            })
            .transpose()?;
        Ok(DownLevel {
            blocks,
            attention,
            downsample: Conv2d::load(&level.pp(1).pp(1), width, next, 3, 2, 1)?,
        })
    }

    /// Up level `j` (from the coarsest), stored as `ups.j`.
    fn load_up(vp: &VarPath, shape: &AuraShape, j: usize) -> Result<UpLevel> {
        let level = vp.pp("ups").pp(j as i64);
        let up_widths = shape.up_widths();
        let (width, below) = (up_widths[LEVELS - 1 - j], up_widths[LEVELS - j]);
        // The levels joining a down level's outputs take twice their width in.
        let input = if j < shape.downs { 2 * width } else { width };
        let blocks = (0..BLOCKS as i64)
            .map(|b| ResnetBlock::load(&level.pp(0).pp(b), input, width, shape.kernels))
            .collect::<Result<_>>()?;
        let finest_first = LEVELS - 1 - j;
        let attention = shape.attention[finest_first]
            .then(|| {
                let depth = shape.attention_depths[finest_first];
                Transformer::load(&level.pp(1).pp(1), width, depth, shape.head_width)
            })
            .transpose()?;
        Ok(UpLevel {
            upsample: Conv2d::load(&level.pp(1).pp(0).pp("conv"), below, width, 3, 1, 1)?,
            blocks,
            attention,
        })
    }

    /// The network on `image` [1, C, H, W] in [0, 1] (sides the size requirements
    /// allow), its noise from `draw`; `between` is asked between its blocks.
    pub fn forward(
        &self,
        image: &Tensor,
        draw: &mut Draw<'_>,
        between: &mut Between<'_>,
    ) -> Result<Tensor> {
        let (kind, device) = (image.kind(), image.device());
        let size = image.size();
        let input_noise = draw(&size).to_device(device).to_kind(kind);
        let x = (image + input_noise * INPUT_NOISE).clamp(0.0, 1.0);
        let style_noise = draw(&[size[0], self.shape.style_in]);
        let style = self
            .style
            .forward(&style_noise.to_device(device).to_kind(kind));
        let modulations = self.to_modulations.forward(&style);
        let mut modulations = modulations
            .split_with_sizes(&self.modulation_widths, -1)
            .into_iter();
        let mods = &mut modulations;
        let mut x = self.init.forward(&x);
        let mut skips = Vec::with_capacity(BLOCKS * self.downs.len());
        for level in &self.downs {
            for block in &level.blocks {
                between()?;
                x = block.forward(&x, mods);
                skips.push(x.shallow_clone());
            }
            if let Some(attention) = &level.attention {
                x = attention.forward(&x);
            }
            x = level.downsample.forward(&x);
        }
        between()?;
        x = self.mid.0.forward(&x, mods);
        x = self.mid.1.forward(&x);
        x = self.mid.2.forward(&x, mods);
        for level in &self.ups {
            let size = x.size();
            let doubled = x.upsample_nearest2d([size[2] * 2, size[3] * 2], 2.0, 2.0);
            x = level.upsample.forward(&doubled);
            for block in &level.blocks {
                between()?;
                if let Some(skip) = skips.pop() {
                    x = Tensor::cat(&[&x, &(skip * SKIP_SCALE)], 1);
                }
                x = block.forward(&x, mods);
            }
            if let Some(attention) = &level.attention {
                x = attention.forward(&x);
            }
        }
        x = self.last_block.forward(&x, mods);
        Ok(self.to_rgb.forward(&x))
    }
}
