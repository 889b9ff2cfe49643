//! A VAE at its placement: images to denoiser latents and back, as diffusers' SDXL
//! pipelines use it (the model's own VAE or one chosen per request).

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::files::read_json;
use crate::engine::models::vae::{AutoencoderKL, VaeConfig};
use crate::engine::noise::NoiseStream;
use crate::engine::profile;

/// A decoded image.
pub struct Decoded {
    /// [H, W, 3] uint8 on the CPU.
    pub image: Tensor,
    /// The half-precision decode was not finite and was redone in float32.
    pub redone_in_float32: bool,
}

/// Where a VAE's weights come from (a float32 copy is reloaded from there when needed).
#[derive(Debug, Clone)]
pub enum VaeSource {
    /// A diffusers AutoencoderKL folder.
    Folder(PathBuf),
    /// The VAE inside a single-file checkpoint.
    SingleFile {
        /// The checkpoint.
        file: PathBuf,
        /// Its component configs.
        configs: Box<crate::engine::loading::single_file::Configs>,
    },
}

impl VaeSource {
    fn path(&self) -> &Path {
        match self {
            VaeSource::Folder(dir) => dir,
            VaeSource::SingleFile { file, .. } => file,
        }
    }

    fn config(&self) -> Result<VaeConfig> {
        match self {
            VaeSource::Folder(dir) => read_json(&dir.join("config.json")),
            VaeSource::SingleFile { configs, .. } => Ok(configs.vae.clone()),
        }
    }

    fn load(&self, placement: Placement) -> Result<AutoencoderKL> {
        match self {
            VaeSource::Folder(dir) => AutoencoderKL::load_dir(dir, placement),
            VaeSource::SingleFile { file, configs } => {
                crate::engine::loading::single_file::load_vae(file, configs, placement)
            }
        }
    }
}

/// A loaded VAE.
pub struct VaeCodec {
    source: VaeSource,
    model: AutoencoderKL,
    /// float32 when the placement is float16 and the VAE's config forces upcasting
    /// (the stock SDXL VAE overflows in float16).
    kind: Kind,
    device: Device,
    placement: Placement,
    /// A float32 copy, loaded the first time a half-precision decode is not finite.
    float32: OnceCell<AutoencoderKL>,
}

impl VaeCodec {
    /// Loads a diffusers AutoencoderKL folder.
    pub fn load(dir: &Path, placement: Placement) -> Result<Self> {
        Self::from_source(VaeSource::Folder(dir.to_path_buf()), placement)
    }

    /// Loads a VAE from `source`.
    pub fn from_source(source: VaeSource, placement: Placement) -> Result<Self> {
        let config = source.config()?;
        let kind = if placement.kind == Kind::Half && config.force_upcast {
            Kind::Float
        } else {
            placement.kind
        };
        Ok(Self {
            model: source.load(Placement { kind, ..placement })?,
            source,
            kind,
            device: placement.device,
            placement,
            float32: OnceCell::new(),
        })
    }

    /// The folder or file it was loaded from.
    pub fn dir(&self) -> &Path {
        self.source.path()
    }

    /// The model.
    pub fn model(&self) -> &AutoencoderKL {
        &self.model
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> i64 {
        self.model.config().scale_factor()
    }

    /// Latent channels.
    pub fn latent_channels(&self) -> i64 {
        self.model.config().latent_channels
    }

    /// A sample of `image` ([1, 3, H, W] in [-1, 1]) in the denoiser's latent space,
    /// float32, drawing its noise from the generator.
    pub fn encode_sample(&self, image: &Tensor, noise: &mut NoiseStream) -> Tensor {
        let image = image.to_device(self.device).to_kind(self.kind);
        let (mean, logvar) = self.model.encode(&image);
        let eps = noise.randn(mean.size().as_slice()).to_device(self.device);
        let sample = mean.to_kind(Kind::Float) + (logvar.to_kind(Kind::Float) * 0.5).exp() * eps;
        self.model.scale_latents(&sample)
    }

    /// Decodes one image's denoiser latents [C, h, w]. A non-finite half-precision decode
    /// is redone in float32; a non-finite image is never returned.
    pub fn decode(&self, latents: &Tensor) -> Result<Decoded> {
        self.decode_with(latents, false, &mut || Ok(()))
    }

    /// Whether a tiled decode of `latents` [C, h, w] runs tile by tile (rather than whole,
    /// as it does for latents that fit one tile).
    pub fn tiles(&self, latents: &Tensor) -> bool {
        let size = latents.size();
        size.len() == 3 && self.model.tile_if_tiled(size[1], size[2]).is_some()
    }

    /// [`Self::decode`], tile by tile when `tiled` (diffusers' `enable_tiling()`): the
    /// memory of one tile, for images larger than the VAE's sample size; `between` runs
    /// before each tile and between the decoder's blocks, and stops the decode with its
    /// error.
    pub fn decode_with(
        &self,
        latents: &Tensor,
        tiled: bool,
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Decoded> {
        let _no_grad = tch::no_grad_guard();
        let _stage = profile::span("vae_decode");
        let mut run = |model: &AutoencoderKL, kind: Kind| -> Result<Tensor> {
            let z = latents.unsqueeze(0).to_device(self.device).to_kind(kind);
            let z = model.unscale_latents(&z);
            let bands = self.placement.vae_band_rows;
            let decoded = if tiled {
                model.decode_tiled_in_bands(&z, bands, between)?
            } else {
                model.decode_in_bands_between(&z, bands, between)?
            };
            Ok(decoded.to_kind(Kind::Float).to_device(Device::Cpu))
        };
        let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) != 0;
        let mut decoded = run(&self.model, self.kind)?;
        let mut redone_in_float32 = false;
        if !finite(&decoded) && self.kind != Kind::Float {
            let float32 = match self.float32.get() {
                Some(model) => model,
                None => {
                    let float32 = Placement {
                        kind: Kind::Float,
                        ..self.placement
                    };
                    let model = self.source.load(float32)?;
                    self.float32.get_or_init(|| model)
                }
            };
            decoded = run(float32, Kind::Float)?;
            redone_in_float32 = true;
        }
        if !finite(&decoded) {
            return Err(EngineError::NonFinite(format!(
                "the VAE `{}` decoded non-finite pixels",
                self.dir().display()
            )));
        }
        Ok(Decoded {
            image: to_uint8(&decoded).get(0),
            redone_in_float32,
        })
    }
}

/// VAE output in [-1, 1] (NCHW, float) to NHWC uint8, as diffusers' image processor:
/// `(x / 2 + 0.5).clamp(0, 1)`, then `(x * 255).round()`.
pub fn to_uint8(decoded: &Tensor) -> Tensor {
    (decoded / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1])
        .g_mul_scalar(255.0)
        .round()
        .to_kind(Kind::Uint8)
}
