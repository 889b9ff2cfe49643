//! `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py` and `vae.py` in diffusers):
//! the encoder for image-to-image and the decoder that turns latents into pixels.

use std::convert::Infallible;
use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use crate::engine::config_check::{read_config, CheckedConfig, ConfigCheck};
use crate::engine::device::Placement;
use crate::engine::error::Result;
use crate::engine::models::attention::Attention;
use crate::engine::models::bands;
use crate::engine::models::nn::{is_channels_last, Conv2d, GroupNorm};
use crate::engine::models::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::engine::models::seamless;
use crate::engine::weights::VarPath;

/// Mirrors diffusers' `AutoencoderKL` config (`vae/config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Image side the VAE was trained at: the tile size of tiled decoding.
    #[serde(default)]
    pub sample_size: Option<i64>,
    /// Image channels.
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: i64,
    /// Channels per level; the scale factor is 2^(levels - 1).
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder level (decoder levels have one more).
    #[serde(default = "one")]
    pub layers_per_block: i64,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: i64,
    /// Group norm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: i64,
    /// Latents are divided by this before decoding (0.13025 for SDXL).
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    /// Optional shift subtracted before scaling (not used by SDXL).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics (some VAEs).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent statistics (some VAEs).
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Decode in float32 when the rest runs in float16 (the stock SDXL VAE overflows).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Whether quant_conv exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether post_quant_conv exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}
fn four() -> i64 {
    4
}
fn thirty_two() -> i64 {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// stabilityai/stable-diffusion-xl-base-1.0's `vae/config.json`.
    pub fn sdxl() -> Self {
        Self {
            sample_size: Some(1024),
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.13025,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().clamp(1, MAX_LEVELS) - 1)
    }
}

/// The most levels a VAE may have (a scale factor of 128; SDXL's has 4 levels, 8×).
const MAX_LEVELS: usize = 8;

impl CheckedConfig for VaeConfig {
    const FIXED: &'static [(&'static str, &'static [&'static str])] = &[
        ("act_fn", &["\"silu\""]),
        ("down_block_types", &["\"DownEncoderBlock2D\""]),
        ("up_block_types", &["\"UpDecoderBlock2D\""]),
        ("mid_block_type", &["\"UNetMidBlock2D\"", "null"]),
    ];

    fn check(&self, check: &mut ConfigCheck) {
        check.positive("in_channels", self.in_channels);
        check.positive("out_channels", self.out_channels);
        check.positive("latent_channels", self.latent_channels);
        check.positive("layers_per_block", self.layers_per_block);
        check.positive("norm_num_groups", self.norm_num_groups);
        let levels = self.block_out_channels.len();
        if levels == 0 || levels > MAX_LEVELS {
            check.problem(
                "block_out_channels",
                format_args!("has {levels} levels; sdxld takes 1 to {MAX_LEVELS}"),
            );
        }
        check.all_positive("block_out_channels", &self.block_out_channels);
        for &width in &self.block_out_channels {
            check.divisible(
                "block_out_channels",
                width,
                "norm_num_groups",
                self.norm_num_groups,
            );
        }
        check.positive_number("scaling_factor", self.scaling_factor);
        if let Some(shift) = self.shift_factor {
            check.finite("shift_factor", shift);
        }
        if let Some(size) = self.sample_size {
            check.positive("sample_size", size);
        }
        let channels = self.latent_channels.max(0) as usize;
        if let Some(mean) = &self.latents_mean {
            check.length("latents_mean", mean.len(), channels, "latent_channels");
            mean.iter().for_each(|&m| check.finite("latents_mean", m));
        }
        if let Some(std) = &self.latents_std {
            check.length("latents_std", std.len(), channels, "latent_channels");
            std.iter()
                .for_each(|&s| check.positive_number("latents_std", s));
        }
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
struct VaeMidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<(GroupNorm, Attention)>,
    resnet1: ResnetBlock2D,
}

impl VaeMidBlock {
    fn load(vp: &VarPath, channels: i64, groups: i64, attention: bool) -> Result<Self> {
        let rc = ResnetConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: 1e-6,
        };
        let attention = if attention {
            let ap = vp.pp("attentions").pp(0);
            Some((
                GroupNorm::load(&ap.pp("group_norm"), groups, channels, 1e-6)?,
                Attention::load(&ap, channels, channels, 1, channels, true)?,
            ))
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock2D::load(&vp.pp("resnets").pp(0), rc)?,
            attention,
            resnet1: ResnetBlock2D::load(&vp.pp("resnets").pp(1), rc)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnet0.forward(x, None);
        if let Some((norm, attn)) = &self.attention {
            let size = h.size();
            let (b, c, height, width) = (size[0], size[1], size[2], size[3]);
            let tokens = norm
                .forward(&h)
                .reshape([b, c, height * width])
                .transpose(1, 2);
            let out = attn
                .forward(&tokens, None)
                .transpose(1, 2)
                .reshape([b, c, height, width]);
            h = out + h;
        }
        self.resnet1.forward(&h, None)
    }
}

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// The SDXL variational autoencoder.
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads a diffusers `vae/` folder.
    pub fn load_dir(dir: &Path, placement: Placement) -> Result<Self> {
        let config: VaeConfig = read_config(&dir.join("config.json"))?;
        let weights = placement.open_component(dir, "diffusion_pytorch_model")?;
        let model = Self::load(&weights.root(), config)?;
        weights.check_all_used(|_| false)?;
        Ok(model)
    }

    /// Builds the model from weights at `vp` (diffusers keys).
    pub fn load(vp: &VarPath, config: VaeConfig) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let groups = c.norm_num_groups;
        let rc = |i: i64, o: i64| ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: None,
            groups,
            eps: 1e-6,
        };
        let latent2 = 2 * c.latent_channels;

        let ep = vp.pp("encoder");
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &level_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = level_ch;
            let bp = ep.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &bp.pp("resnets").pp(j),
                        rc(if j == 0 { in_ch } else { out_ch }, out_ch),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                Some(Downsample2D::load(&bp.pp("downsamplers").pp(0), out_ch, 0)?)
            } else {
                None
            };
            down_blocks.push((resnets, down));
        }
        let encoder = Encoder {
            conv_in: Conv2d::load(&ep.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::load(
                &ep.pp("mid_block"),
                ch[n - 1],
                groups,
                c.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::load(&ep.pp("conv_norm_out"), groups, ch[n - 1], 1e-6)?,
            conv_out: Conv2d::load(&ep.pp("conv_out"), ch[n - 1], latent2, 3, 1, 1)?,
        };

        let dp = vp.pp("decoder");
        let reversed: Vec<i64> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = reversed[0];
        for (i, &level_ch) in reversed.iter().enumerate() {
            let prev = out_ch;
            out_ch = level_ch;
            let bp = dp.pp("up_blocks").pp(i);
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &bp.pp("resnets").pp(j),
                        rc(if j == 0 { prev } else { out_ch }, out_ch),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Upsample2D::load(&bp.pp("upsamplers").pp(0), out_ch)?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
        }
        let decoder = Decoder {
            conv_in: Conv2d::load(&dp.pp("conv_in"), c.latent_channels, ch[n - 1], 3, 1, 1)?,
            mid_block: VaeMidBlock::load(
                &dp.pp("mid_block"),
                ch[n - 1],
                groups,
                c.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&dp.pp("conv_norm_out"), groups, ch[0], 1e-6)?,
            conv_out: Conv2d::load(&dp.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
        };

        let quant_conv = if c.use_quant_conv {
            Some(Conv2d::load(
                &vp.pp("quant_conv"),
                latent2,
                latent2,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv2d::load(
                &vp.pp("post_quant_conv"),
                c.latent_channels,
                c.latent_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Whether its convolutions hold their weights channels-last.
    pub fn is_channels_last(&self) -> bool {
        is_channels_last(self.decoder.conv_in.weight())
    }

    /// Encodes images in [-1, 1] (NCHW) into the latent distribution's mean and log-variance
    /// (unscaled, as `AutoencoderKL.encode(...).latent_dist`).
    pub fn encode(&self, image: &Tensor) -> (Tensor, Tensor) {
        let _seamless = seamless::model();
        let e = &self.encoder;
        let mut h = e.conv_in.forward(image);
        for (resnets, down) in &e.down_blocks {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(d) = down {
                h = d.forward(&h);
            }
        }
        h = e.mid_block.forward(&h);
        h = e.conv_out.forward(&e.conv_norm_out.forward(&h).silu());
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h);
        }
        // Contiguous whatever the convolutions' memory format (channels-last weights).
        let parts = h.chunk(2, 1);
        let logvar = parts[1].clamp(-30.0, 20.0).contiguous();
        (parts[0].contiguous(), logvar)
    }

    /// Decodes unscaled latents into images in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        self.decode_in_bands(latents, None)
    }

    /// [`Self::decode`], with the layers working on more than `band_rows` rows run that
    /// many rows at a time (the same image up to rounding, fewer full-size temporaries:
    /// see [`crate::engine::models::bands`]).
    pub fn decode_in_bands(&self, latents: &Tensor, band_rows: Option<i64>) -> Tensor {
        let Ok(image) =
            self.decode_in_bands_between(latents, band_rows, &mut || Ok::<(), Infallible>(()));
        image
    }

    /// [`Self::decode_in_bands`], `between` asked before the decoder's mid block and
    /// each of its resnets and upsamplers; its error ends the decode.
    pub fn decode_in_bands_between<E>(
        &self,
        latents: &Tensor,
        band_rows: Option<i64>,
        between: &mut dyn FnMut() -> std::result::Result<(), E>,
    ) -> std::result::Result<Tensor, E> {
        let _seamless = seamless::model();
        // Bands pad their rows with zeros at the image's edges: an image that tiles is
        // decoded whole.
        let band_rows = band_rows.filter(|_| seamless::requested().is_none());
        let d = &self.decoder;
        let mut z = latents.shallow_clone();
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(&z);
        }
        let mut h = d.conv_in.forward(&z);
        between()?;
        h = d.mid_block.forward(&h);
        // Rows of the tensor a layer works on, when it is banded.
        let banded = |rows_out: i64| band_rows.filter(|&rows| rows_out > rows);
        for (resnets, up) in &d.up_blocks {
            for r in resnets {
                between()?;
                h = match banded(h.size()[2]) {
                    Some(rows) => r.forward_in_bands(&h, rows),
                    None => r.forward(&h, None),
                };
            }
            if let Some(u) = up {
                between()?;
                h = match banded(2 * h.size()[2]) {
                    Some(rows) => u.forward_in_bands(&h, rows),
                    None => u.forward(&h, None),
                };
            }
        }
        let out = match banded(h.size()[2]) {
            Some(rows) => bands::norm_silu_conv(&d.conv_norm_out, &d.conv_out, &h, rows),
            None => d.conv_out.forward(&d.conv_norm_out.forward(&h).silu()),
        };
        Ok(out.contiguous())
    }

    /// The latent tile size [`Self::decode_tiled`] decodes `h`×`w` latents in, or None
    /// where it decodes them whole (they fit one tile, or the VAE has no sample size).
    pub fn tile_if_tiled(&self, h: i64, w: i64) -> Option<i64> {
        // Tiles decoded apart would not wrap around the image's edges.
        if seamless::requested().is_some() {
            return None;
        }
        let sample = self.config.sample_size.filter(|s| *s > 0)?;
        let levels = self.config.block_out_channels.len().clamp(1, 16) as u32;
        let tile = sample / 2i64.pow(levels - 1);
        (tile > 0 && (h > tile || w > tile)).then_some(tile)
    }

    /// Decodes unscaled latents tile by tile when they are larger than one tile, as
    /// diffusers' `AutoencoderKL.tiled_decode` does (tiles of the VAE's sample size,
    /// overlapping by a quarter, blended linearly): peak memory stays that of one tile.
    pub fn decode_tiled(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_tiled_in_bands(latents, None, &mut || Ok(()))
    }

    /// [`Self::decode_tiled`], each tile decoded as [`Self::decode_in_bands_between`]
    /// does; `between` runs before each tile and between each tile's blocks, and stops
    /// the decode with its error.
    pub fn decode_tiled_in_bands(
        &self,
        latents: &Tensor,
        band_rows: Option<i64>,
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let size = latents.size();
        let (h, w) = (size[2], size[3]);
        let (Some(sample), Some(tile)) = (self.config.sample_size, self.tile_if_tiled(h, w)) else {
            return self.decode_in_bands_between(latents, band_rows, between);
        };
        let overlap = ((tile as f64 * 0.75) as i64).max(1);
        let blend = (sample as f64 * 0.25) as i64;
        let row_limit = sample - blend;
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(overlap as usize) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap as usize) {
                between()?;
                let part = latents
                    .narrow(2, i, tile.min(h - i))
                    .narrow(3, j, tile.min(w - j));
                row.push(self.decode_in_bands_between(&part, band_rows, between)?);
            }
            rows.push(row);
        }
        // Blend each tile with the (already blended) tiles above and to its left, in place.
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                let current = rows[i][j].shallow_clone();
                if i > 0 {
                    blend_into(&rows[i - 1][j], &current, blend, 2);
                }
                if j > 0 {
                    blend_into(&rows[i][j - 1], &current, blend, 3);
                }
            }
        }
        let crop = |t: &Tensor| {
            let s = t.size();
            t.narrow(2, 0, row_limit.min(s[2]))
                .narrow(3, 0, row_limit.min(s[3]))
        };
        let result_rows: Vec<Tensor> = rows
            .iter()
            .map(|row| Tensor::cat(&row.iter().map(crop).collect::<Vec<_>>(), 3))
            .collect();
        Ok(Tensor::cat(&result_rows, 2))
    }

    /// Maps encoder samples to the denoiser's latent space (the inverse of
    /// [`AutoencoderKL::unscale_latents`]), as the image-to-image pipelines do.
    pub fn scale_latents(&self, sample: &Tensor) -> Tensor {
        let c = &self.config;
        if let (Some(mean), Some(std)) = (&c.latents_mean, &c.latents_std) {
            let view = |v: &Vec<f64>| {
                Tensor::from_slice(v)
                    .to_kind(sample.kind())
                    .to_device(sample.device())
                    .view([1, -1, 1, 1])
            };
            return (sample - view(mean)) * c.scaling_factor / view(std);
        }
        match c.shift_factor {
            Some(shift) => (sample - shift) * c.scaling_factor,
            None => sample * c.scaling_factor,
        }
    }

    /// Maps denoised latents to the VAE's input space, as the SDXL pipeline does before
    /// decoding (latents_mean/std where configured, otherwise 1/scaling_factor and shift).
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        let c = &self.config;
        if let (Some(mean), Some(std)) = (&c.latents_mean, &c.latents_std) {
            let view = |v: &Vec<f64>| {
                Tensor::from_slice(v)
                    .to_kind(latents.kind())
                    .to_device(latents.device())
                    .view([1, -1, 1, 1])
            };
            return latents * view(std) / c.scaling_factor + view(mean);
        }
        let mut z = latents / c.scaling_factor;
        if let Some(shift) = c.shift_factor {
            z += shift;
        }
        z
    }
}

/// diffusers' `blend_v` (dim 2) and `blend_h` (dim 3): the first `extent` rows (columns)
/// of `b` become a linear mix of the last ones of `a` and their own, in place.
fn blend_into(a: &Tensor, b: &Tensor, extent: i64, dim: i64) {
    let extent = extent
        .min(a.size()[dim as usize])
        .min(b.size()[dim as usize]);
    if extent <= 0 {
        return;
    }
    // The weights are computed in double precision and rounded once, as Python does.
    let mut shape = vec![1i64; 4];
    shape[dim as usize] = extent;
    let weights = |f: &dyn Fn(f64) -> f64| {
        let values: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        Tensor::from_slice(&values)
            .view(shape.as_slice())
            .to_kind(b.kind())
            .to_device(b.device())
    };
    let (keep_a, keep_b) = (weights(&|t| 1.0 - t), weights(&|t| t));
    let a_len = a.size()[dim as usize];
    let from_a = a.narrow(dim, a_len - extent, extent);
    let mut head = b.narrow(dim, 0, extent);
    let mixed = &from_a * &keep_a + &head * &keep_b;
    head.copy_(&mixed);
}
