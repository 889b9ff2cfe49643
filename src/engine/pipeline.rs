//! The SDXL text-to-image pipeline, following diffusers'
//! `StableDiffusionXLPipeline.__call__` step by step.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::codec::VaeCodec;
use crate::engine::components::{shared, ComponentFiles, ComponentStore, Fresh};
use crate::engine::error::{read_json, EngineError, Result};
use crate::engine::models::clip::ClipTextModel;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::models::unet::{AddedCond, UNet2DConditionModel};
use crate::engine::models::vae::AutoencoderKL;
use crate::engine::noise::NoiseStream;
use crate::engine::schedulers::{Scheduler, SchedulerConfig};

pub use crate::engine::request::{
    Entry, GenerateOutput, GenerateParams, InitImage, Progress, RefinerMode, RefinerParams,
    SchedulerOverrides,
};

/// Where and in which precision the models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The device.
    pub device: Device,
    /// The floating-point kind of the weights and activations.
    pub kind: Kind,
}

impl Placement {
    /// CPU, float32: the configuration that matches diffusers bit for bit (nearly).
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
        }
    }

    /// Parses `auto`, `cpu`, `cuda` or `cuda:N` and `float32`, `float16` or `bfloat16`.
    pub fn parse(device: &str, dtype: &str) -> Result<Self> {
        let device = match device {
            "auto" => Device::cuda_if_available(),
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Device::Cuda(index),
                _ => {
                    return Err(EngineError::Device(format!(
                        "unknown device `{other}` (auto, cpu, cuda or cuda:N)"
                    )))
                }
            },
        };
        if let Device::Cuda(index) = device {
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                return Err(EngineError::Device(format!(
                    "cuda:{index} is not available ({count} CUDA devices)"
                )));
            }
        }
        let kind = match dtype {
            "float32" | "fp32" => Kind::Float,
            "float16" | "fp16" | "half" => Kind::Half,
            "bfloat16" | "bf16" => Kind::BFloat16,
            other => {
                return Err(EngineError::Device(format!(
                    "unknown dtype `{other}` (float32, float16 or bfloat16)"
                )))
            }
        };
        if device == Device::Cpu && kind != Kind::Float {
            return Err(EngineError::Device(
                "half precision needs a CUDA device; use float32 on the CPU".into(),
            ));
        }
        Ok(Self { device, kind })
    }
}

/// `model_index.json` of a diffusers pipeline folder (the parts sdxld reads).
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(default = "yes")]
    force_zeros_for_empty_prompt: bool,
    #[serde(default)]
    requires_aesthetics_score: bool,
}

fn yes() -> bool {
    true
}

/// What the inpainting loop needs besides the latents.
struct Inpaint {
    /// The UNet takes [latents, mask, masked image latents].
    nine_channels: bool,
    /// [1, 1, h, w] at latent resolution, 1 = repaint.
    mask: Tensor,
    /// Latents of the image with the repainted area blacked out.
    masked_latents: Tensor,
    /// Latents of the image (4-channel blending).
    image_latents: Tensor,
    /// The noise the initial latents got, re-applied at each level when blending.
    noise: Tensor,
}

/// A loaded SDXL pipeline.
pub struct SdxlPipeline {
    dir: PathBuf,
    placement: Placement,
    tokenizer: Option<Rc<ClipTokenizer>>,
    text_encoder: Option<Rc<ClipTextModel>>,
    tokenizer_2: Rc<ClipTokenizer>,
    text_encoder_2: Rc<ClipTextModel>,
    unet: Rc<UNet2DConditionModel>,
    vae: Rc<VaeCodec>,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    requires_aesthetics_score: bool,
}

impl SdxlPipeline {
    /// Loads a diffusers SDXL pipeline folder.
    pub fn load(dir: &Path, placement: Placement) -> Result<Self> {
        Self::load_with(dir, placement, &mut Fresh)
    }

    /// Loads a diffusers folder or a single-file checkpoint, taking its components from
    /// `store` (which may share them with pipelines already loaded).
    pub fn load_with(
        dir: &Path,
        placement: Placement,
        store: &mut dyn ComponentStore,
    ) -> Result<Self> {
        if dir.is_file() {
            return Self::load_single_file(dir, placement, store);
        }
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let (device, kind) = (placement.device, placement.kind);
        let (tokenizer, text_encoder) = if dir.join("text_encoder").is_dir() {
            let folder = dir.join("text_encoder");
            (
                Some(Rc::new(ClipTokenizer::from_dir(&dir.join("tokenizer"))?)),
                Some(shared(
                    store,
                    &ComponentFiles::folder("text_encoder", &folder),
                    || ClipTextModel::load_dir(&folder, device, kind),
                )?),
            )
        } else {
            (None, None)
        };
        let tokenizer_2 = Rc::new(ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?);
        let folder = dir.join("text_encoder_2");
        let text_encoder_2 = shared(
            store,
            &ComponentFiles::folder("text_encoder_2", &folder),
            || ClipTextModel::load_dir(&folder, device, kind),
        )?;
        let folder = dir.join("unet");
        let unet = shared(store, &ComponentFiles::folder("unet", &folder), || {
            UNet2DConditionModel::load_dir(&folder, device, kind)
        })?;
        let folder = dir.join("vae");
        let vae = shared(store, &ComponentFiles::folder("vae", &folder), || {
            VaeCodec::load(&folder, placement)
        })?;
        let scheduler =
            SchedulerConfig::load(&dir.join("scheduler").join("scheduler_config.json"))?;

        let pipeline = Self {
            dir: dir.to_path_buf(),
            placement,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            requires_aesthetics_score: index.requires_aesthetics_score,
        };
        pipeline.check_shapes()?;
        Ok(pipeline)
    }

    /// The components a model folder or single-file checkpoint loads, without loading it.
    pub fn component_files(path: &Path) -> Vec<ComponentFiles> {
        use crate::engine::loading::single_file as single;
        if path.is_file() {
            return vec![
                ComponentFiles::in_file("text_encoder", path, single::TEXT_ENCODER),
                ComponentFiles::in_file("text_encoder_2", path, single::TEXT_ENCODER_2),
                ComponentFiles::in_file("unet", path, single::UNET),
                ComponentFiles::in_file("vae", path, single::VAE),
            ];
        }
        ["text_encoder", "text_encoder_2", "unet", "vae"]
            .into_iter()
            .filter(|role| path.join(role).is_dir())
            .map(|role| ComponentFiles::folder(role, &path.join(role)))
            .collect()
    }

    /// Loads a single-file SDXL checkpoint (`*.safetensors` in the original layout), with
    /// the configs its metadata carries or the stock SDXL base configs, and the CLIP
    /// tokenizers built from the vocabulary built into sdxld.
    fn load_single_file(
        file: &Path,
        placement: Placement,
        store: &mut dyn ComponentStore,
    ) -> Result<Self> {
        use crate::engine::loading::single_file::{self as single, Configs};
        let (device, kind) = (placement.device, placement.kind);
        let (names, metadata) = crate::engine::loading::weights::read_header(file)?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if !single::is_sdxl_checkpoint(&names) {
            return Err(EngineError::Incompatible(format!(
                "`{}` is not a single-file SDXL base checkpoint (it lacks the UNet, VAE or one of the two text encoders)",
                file.display()
            )));
        }
        let configs = Configs::from_metadata(file, &metadata)?;
        let text_encoder = shared(
            store,
            &ComponentFiles::in_file("text_encoder", file, single::TEXT_ENCODER),
            || single::load_text_encoder(file, &configs, device, kind),
        )?;
        let text_encoder_2 = shared(
            store,
            &ComponentFiles::in_file("text_encoder_2", file, single::TEXT_ENCODER_2),
            || single::load_text_encoder_2(file, &configs, device, kind),
        )?;
        let unet = shared(
            store,
            &ComponentFiles::in_file("unet", file, single::UNET),
            || single::load_unet(file, &configs, device, kind),
        )?;
        let vae = shared(
            store,
            &ComponentFiles::in_file("vae", file, single::VAE),
            || {
                VaeCodec::from_source(
                    crate::engine::codec::VaeSource::SingleFile {
                        file: file.to_path_buf(),
                        configs: Box::new(configs.clone()),
                    },
                    placement,
                )
            },
        )?;
        let scheduler: SchedulerConfig = serde_json::from_value(configs.scheduler.clone())
            .map_err(|e| EngineError::Config {
                path: single::config_path(file, "scheduler"),
                message: e.to_string(),
            })?;
        let pipeline = Self {
            dir: file.to_path_buf(),
            placement,
            // SDXL's tokenizers: the second pads with "!".
            tokenizer: Some(Rc::new(ClipTokenizer::builtin("<|endoftext|>")?)),
            text_encoder: Some(text_encoder),
            tokenizer_2: Rc::new(ClipTokenizer::builtin("!")?),
            text_encoder_2,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: true,
            requires_aesthetics_score: false,
        };
        pipeline.check_shapes()?;
        Ok(pipeline)
    }

    /// Checks that the components fit together (text widths, pooled width).
    fn check_shapes(&self) -> Result<()> {
        let mismatch = |message: String| EngineError::Config {
            path: self.dir.join("unet").join("config.json"),
            message,
        };
        let text_width = self
            .text_encoder
            .as_ref()
            .map_or(0, |t| t.config().hidden_size)
            + self.text_encoder_2.config().hidden_size;
        let cross = self.unet.config().cross_attention_dim;
        if text_width != cross {
            return Err(mismatch(format!(
                "cross_attention_dim is {cross} but the text encoders give {text_width} features"
            )));
        }
        let pooled = self.text_encoder_2.projection_dim().ok_or_else(|| {
            mismatch("text_encoder_2 has no text_projection (not an SDXL text encoder)".into())
        })?;
        // Refiners condition on five micro-conditioning values (no target size), the base
        // on six.
        let time_values = if self.requires_aesthetics_score { 5 } else { 6 };
        if let Some(expected) = self.unet.pooled_dim(time_values) {
            if expected != pooled {
                return Err(mismatch(format!(
                    "the added embedding expects a pooled width of {expected}, text_encoder_2 gives {pooled}"
                )));
            }
        }
        Ok(())
    }

    /// The folder the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Device and kind.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Pixels per latent along each side (2^(VAE levels - 1)).
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.scale_factor()
    }

    /// The default image size: the UNet's sample size times the VAE scale factor.
    pub fn default_size(&self) -> i64 {
        self.unet.config().sample_size.unwrap_or(128) * self.vae_scale_factor()
    }

    /// The UNet (for component tests and benchmarks).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The VAE (for component tests).
    pub fn vae(&self) -> &AutoencoderKL {
        self.vae.model()
    }

    /// The VAE that encodes and decodes.
    pub fn vae_codec(&self) -> &Rc<VaeCodec> {
        &self.vae
    }

    /// This pipeline with another VAE (same latent space), sharing everything else.
    pub fn with_vae(&self, vae: Rc<VaeCodec>) -> Result<Self> {
        if vae.latent_channels() != self.vae.latent_channels()
            || vae.scale_factor() != self.vae.scale_factor()
        {
            return Err(EngineError::Incompatible(format!(
                "the VAE `{}` ({} latent channels, scale factor {}) does not fit `{}` ({} channels, scale factor {})",
                vae.dir().display(),
                vae.latent_channels(),
                vae.scale_factor(),
                self.dir.display(),
                self.vae.latent_channels(),
                self.vae.scale_factor()
            )));
        }
        Ok(Self {
            dir: self.dir.clone(),
            placement: self.placement,
            tokenizer: self.tokenizer.clone(),
            text_encoder: self.text_encoder.clone(),
            tokenizer_2: self.tokenizer_2.clone(),
            text_encoder_2: self.text_encoder_2.clone(),
            unet: self.unet.clone(),
            vae,
            scheduler: self.scheduler.clone(),
            force_zeros_for_empty_prompt: self.force_zeros_for_empty_prompt,
            requires_aesthetics_score: self.requires_aesthetics_score,
        })
    }

    /// The first text encoder, absent in refiner-style pipelines.
    pub fn text_encoder(&self) -> Option<&ClipTextModel> {
        self.text_encoder.as_deref()
    }

    /// The second text encoder.
    pub fn text_encoder_2(&self) -> &ClipTextModel {
        &self.text_encoder_2
    }

    /// The model's default scheduler configuration.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Checks the parameters against this model before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        self.check(p, false)
    }

    /// [`Self::validate`] for a stage that may start from an earlier stage's latents.
    fn check(&self, p: &GenerateParams, handoff: bool) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        for (name, value) in [("width", p.width), ("height", p.height)] {
            if value <= 0 || value % 8 != 0 {
                return bad(format!(
                    "`{name}` must be a positive multiple of 8, got {value}"
                ));
            }
        }
        if p.steps == 0 {
            return bad("`steps` must be at least 1, got 0".into());
        }
        if p.num_images == 0 {
            return bad("`num_images` must be at least 1, got 0".into());
        }
        let fraction_ok = |f: f64| f > 0.0 && f < 1.0;
        if let Some(end) = p.denoising_end.filter(|f| !fraction_ok(*f)) {
            return bad(format!("`denoising_end` must be in (0, 1), got {end}"));
        }
        if let Some(init) = &p.init_image {
            if init.width != p.width || init.height != p.height {
                return bad(format!(
                    "the init image is {}x{} but the requested size is {}x{}",
                    init.width, init.height, p.width, p.height
                ));
            }
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return bad(format!(
                    "`strength` must be in (0, 1], got {}",
                    init.strength
                ));
            }
            match init.denoising_start {
                Some(start) if !fraction_ok(start) => {
                    return bad(format!("`denoising_start` must be in (0, 1), got {start}"))
                }
                Some(_) if init.mask.is_some() => {
                    return bad("`denoising_start` does not apply to inpainting".into())
                }
                Some(start) if p.denoising_end.is_some_and(|end| start >= end) => {
                    return bad(format!(
                        "`denoising_start` {start} must be below `denoising_end`"
                    ))
                }
                Some(_) => {}
                None if (p.steps as f64 * init.strength) < 1.0 => {
                    return bad(format!(
                        "`strength` {} leaves no step of {} to run (steps x strength must be at least 1)",
                        init.strength, p.steps
                    ))
                }
                None => {}
            }
        } else if self.requires_aesthetics_score && !handoff {
            return Err(EngineError::Incompatible(format!(
                "`{}` is a refiner (requires_aesthetics_score): it runs as a refiner stage or on an init image, not from noise",
                self.dir.display()
            )));
        }
        if !p.guidance_scale.is_finite() {
            return bad("`guidance_scale` must be finite".into());
        }
        if !(0.0..=1.0).contains(&p.guidance_rescale) {
            return bad(format!(
                "`guidance_rescale` must be between 0 and 1, got {}",
                p.guidance_rescale
            ));
        }
        Ok(())
    }

    /// Runs the text encoders on one (prompt, prompt_2) pair: the concatenated hidden
    /// states [1, 77, cross_dim] and the pooled embedding [1, projection_dim].
    fn encode_pair(
        &self,
        prompt: &str,
        prompt_2: &str,
        clip_skip: i64,
    ) -> Result<(Tensor, Tensor)> {
        let device = self.placement.device;
        let ids = |tok: &ClipTokenizer, text: &str| -> Result<Tensor> {
            Ok(Tensor::from_slice(&tok.encode(text)?)
                .unsqueeze(0)
                .to_device(device))
        };
        let mut hidden = Vec::with_capacity(2);
        let second_text = match (&self.tokenizer, &self.text_encoder) {
            (Some(tok), Some(enc)) => {
                hidden.push(enc.forward(&ids(tok, prompt)?, clip_skip)?.hidden);
                prompt_2
            }
            // diffusers pairs the prompts with the encoders present: a pipeline with only
            // the second encoder (the refiner) gives it the first prompt.
            _ => prompt,
        };
        let out = self
            .text_encoder_2
            .forward(&ids(&self.tokenizer_2, second_text)?, clip_skip)?;
        hidden.push(out.hidden);
        let pooled = out.pooled.ok_or_else(|| {
            EngineError::InvalidRequest("text_encoder_2 has no pooled projection".into())
        })?;
        Ok((Tensor::cat(&hidden, -1), pooled))
    }

    /// diffusers' `encode_prompt`: positive and (with guidance) negative embeddings.
    #[allow(clippy::type_complexity)]
    fn encode_prompt(
        &self,
        p: &GenerateParams,
        cfg: bool,
    ) -> Result<(Tensor, Tensor, Option<(Tensor, Tensor)>)> {
        let prompt_2 = p
            .prompt_2
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&p.prompt);
        let (embeds, pooled) = self.encode_pair(&p.prompt, prompt_2, p.clip_skip.unwrap_or(0))?;
        if !cfg {
            return Ok((embeds, pooled, None));
        }
        let negative = if p.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            (embeds.zeros_like(), pooled.zeros_like())
        } else {
            let negative = p.negative_prompt.as_deref().unwrap_or("");
            let negative_2 = p
                .negative_prompt_2
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or(negative);
            // diffusers encodes negatives at the penultimate layer whatever clip_skip is.
            self.encode_pair(negative, negative_2, 0)?
        };
        Ok((embeds, pooled, Some(negative)))
    }

    /// Initial noise for `n` images: image i is `randn([1, C, h, w])` from the CPU
    /// generator seeded with seed + i, in float32 (invariant 2).
    fn initial_noise(&self, p: &GenerateParams, noise: &mut NoiseStream) -> Tensor {
        let f = self.vae_scale_factor();
        let channels = self.vae.latent_channels();
        let shape = [1, channels, p.height / f, p.width / f];
        let draws: Vec<Tensor> = (0..p.num_images)
            .map(|i| {
                noise.seed(p.seed.wrapping_add(i as u64));
                noise.randn(&shape)
            })
            .collect();
        Tensor::cat(&draws, 0)
    }

    /// The index of the first timestep an image-based start runs: diffusers'
    /// `get_timesteps` of the img2img and inpainting pipelines.
    fn entry_index(
        &self,
        scheduler: &dyn Scheduler,
        train_steps: i64,
        steps: usize,
        entry: Entry,
    ) -> Result<usize> {
        let timesteps = scheduler.timesteps();
        match entry {
            Entry::Strength(strength) => {
                let keep = ((steps as f64 * strength) as usize).min(steps);
                if keep == 0 {
                    return Err(EngineError::InvalidRequest(format!(
                        "`strength` {strength} leaves no step of {steps} to run"
                    )));
                }
                Ok((steps - keep) * scheduler.order())
            }
            Entry::DenoisingStart(fraction) => {
                let cutoff = discrete_cutoff(train_steps, fraction);
                let mut remaining = timesteps.iter().filter(|&&t| t < cutoff).count();
                // A second-order scheduler must not start between its two evaluations.
                if scheduler.order() == 2 && remaining % 2 == 0 {
                    remaining += 1;
                }
                let remaining = remaining.min(timesteps.len());
                if remaining == 0 {
                    return Err(EngineError::InvalidRequest(format!(
                        "`denoising_start` {fraction} leaves no step of {steps} to run"
                    )));
                }
                Ok(timesteps.len() - remaining)
            }
        }
    }

    /// Image to image (StableDiffusionXLImg2ImgPipeline's prepare_latents): the VAE
    /// latents of the init image (or latents from an earlier stage), noised to timestep
    /// `start` unless the start is a `denoising_start`. Draws the latent sample first,
    /// then the noise.
    fn image_latents(
        &self,
        image: Option<&InitImage>,
        latents: Option<&Tensor>,
        add_noise: bool,
        scheduler: &dyn Scheduler,
        start: usize,
        noise: &mut NoiseStream,
    ) -> Result<Tensor> {
        let device = self.placement.device;
        let latents = match (image, latents) {
            (_, Some(latents)) => latents.to_device(device).to_kind(Kind::Float),
            (Some(image), None) => self.encode_sample(&image.to_tensor(), noise),
            (None, None) => {
                return Err(EngineError::InvalidRequest(
                    "image to image needs an image or latents".into(),
                ))
            }
        };
        if !add_noise {
            return Ok(latents);
        }
        let draw = noise.randn(latents.size().as_slice()).to_device(device);
        Ok(scheduler.add_noise(&latents, &draw, start))
    }

    /// A VAE sample of `image` ([1, 3, H, W] in [-1, 1]) in the denoiser's latent space,
    /// drawing its noise from the generator.
    fn encode_sample(&self, image: &Tensor, noise: &mut NoiseStream) -> Tensor {
        self.vae.encode_sample(image, noise)
    }

    /// Inpainting (StableDiffusionXLInpaintPipeline's prepare_latents and
    /// prepare_mask_latents), drawing in diffusers' order: the image's latent sample (when
    /// needed), the noise, then the masked image's latent sample.
    fn inpaint_latents(
        &self,
        init: &InitImage,
        p: &GenerateParams,
        scheduler: &dyn Scheduler,
        start: usize,
        noise: &mut NoiseStream,
    ) -> Result<(Tensor, Inpaint)> {
        let device = self.placement.device;
        let in_channels = self.unet.config().in_channels;
        let latent_channels = self.vae.latent_channels();
        let nine_channels = in_channels == 2 * latent_channels + 1;
        if !nine_channels && in_channels != latent_channels {
            return Err(EngineError::InvalidRequest(format!(
                "a UNet with {in_channels} input channels cannot inpaint"
            )));
        }
        let strength_max = init.strength >= 1.0;
        let image = init.to_tensor();
        let mask = init
            .mask_tensor()
            .ok_or_else(|| EngineError::InvalidRequest("inpainting needs a mask".into()))?;
        let masked_image = &image * mask.lt(0.5).to_kind(Kind::Float);
        let f = self.vae_scale_factor();
        let (h, w) = (p.height / f, p.width / f);
        let need_image = !nine_channels || !strength_max;
        let shape = [1, latent_channels, h, w];
        let (image_latents, initial, masked_latents) = match p.batch_first_seed {
            None => {
                noise.seed(p.seed);
                let image_latents = need_image.then(|| self.encode_sample(&image, noise));
                let initial = noise.randn(&shape).to_device(device);
                (
                    image_latents,
                    initial,
                    self.encode_sample(&masked_image, noise),
                )
            }
            Some(first) => {
                // The latent samples come from the first image's generator; this image's
                // generator starts with the noise.
                noise.seed(first);
                let image_latents = need_image.then(|| self.encode_sample(&image, noise));
                let _first_noise = noise.randn(&shape);
                let masked_latents = self.encode_sample(&masked_image, noise);
                noise.seed(p.seed);
                (
                    image_latents,
                    noise.randn(&shape).to_device(device),
                    masked_latents,
                )
            }
        };
        let latents = match (&image_latents, strength_max) {
            (Some(image_latents), false) => scheduler.add_noise(image_latents, &initial, start),
            _ => &initial * scheduler.init_noise_sigma(),
        };
        let mask = mask
            .upsample_nearest2d([h, w], None, None)
            .to_device(device);
        let state = Inpaint {
            nine_channels,
            mask,
            masked_latents,
            image_latents: image_latents.unwrap_or_else(|| initial.zeros_like()),
            noise: initial,
        };
        Ok((latents, state))
    }

    /// The micro-conditioning (positive, negative) time ids. Text to image uses the
    /// negative sizes only when both are given; image-based starts default each negative
    /// to its positive, and models with `requires_aesthetics_score` take an aesthetic
    /// score in place of the target size, as diffusers' img2img pipeline does.
    fn time_ids(&self, p: &GenerateParams, image_based: bool) -> (Tensor, Tensor) {
        let ids = |values: [f64; 6]| Tensor::from_slice(&values.map(|v| v as f32)).unsqueeze(0);
        let ids5 = |values: [f64; 5]| Tensor::from_slice(&values.map(|v| v as f32)).unsqueeze(0);
        let size = (p.height, p.width);
        let original = p.original_size.unwrap_or(size);
        let target = p.target_size.unwrap_or(size);
        let crop = p.crops_coords_top_left;
        let f = |v: i64| v as f64;
        let positive = [original.0, original.1, crop.0, crop.1, target.0, target.1].map(f);
        if !image_based {
            let negative = match (p.negative_original_size, p.negative_target_size) {
                (Some(o), Some(t)) => {
                    let c = p.negative_crops_coords_top_left;
                    [o.0, o.1, c.0, c.1, t.0, t.1].map(f)
                }
                _ => positive,
            };
            return (ids(positive), ids(negative));
        }
        let negative_original = p.negative_original_size.unwrap_or(original);
        let negative_target = p.negative_target_size.unwrap_or(target);
        if self.requires_aesthetics_score {
            let c = p.negative_crops_coords_top_left;
            (
                ids5([
                    f(original.0),
                    f(original.1),
                    f(crop.0),
                    f(crop.1),
                    p.aesthetic_score,
                ]),
                ids5([
                    f(negative_original.0),
                    f(negative_original.1),
                    f(c.0),
                    f(c.1),
                    p.negative_aesthetic_score,
                ]),
            )
        } else {
            // diffusers' img2img and inpainting pipelines pair the negative sizes with
            // the positive crop.
            let (o, t) = (negative_original, negative_target);
            (
                ids(positive),
                ids([o.0, o.1, crop.0, crop.1, t.0, t.1].map(f)),
            )
        }
    }

    /// Generates `p.num_images` images. `progress` is called as work advances; an error it
    /// returns (such as [`EngineError::Cancelled`]) stops the job at that point.
    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<GenerateOutput> {
        let latents = self.denoise(p, progress)?;
        self.decode_all(&latents, progress)
    }

    /// Decodes every image of `latents` [N, C, h, w].
    pub fn decode_all(
        &self,
        latents: &Tensor,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<GenerateOutput> {
        let n = latents.size()[0];
        let mut images = Vec::with_capacity(n as usize);
        for i in 0..n {
            progress(Progress::Decoding { index: i as usize })?;
            images.push(self.decode_image(&latents.get(i))?);
        }
        Ok(GenerateOutput {
            latents: latents.shallow_clone(),
            images: Tensor::stack(&images, 0),
        })
    }

    /// Runs the text encoders and the denoising loop: the final latents, float32 on the
    /// CPU, [N, C, H/f, W/f].
    pub fn denoise(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Tensor> {
        self.validate(p)?;
        let mut noise = NoiseStream::lock();
        self.denoise_with(p, None, &mut noise, progress)
    }

    /// Denoises with the generator already held: from `p`'s init image or noise, or (a
    /// refiner stage) from `handoff` latents of one image entered at `entry`, continuing
    /// the generator where the previous stage left it.
    pub(crate) fn denoise_with(
        &self,
        p: &GenerateParams,
        handoff: Option<(&Tensor, Entry)>,
        noise: &mut NoiseStream,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Tensor> {
        self.check(p, handoff.is_some())?;
        let _no_grad = tch::no_grad_guard();
        let device = self.placement.device;
        let kind = self.placement.kind;
        let n = p.num_images as i64;
        let cfg = p.guidance_scale > 1.0;
        let config = p.scheduler_overrides.apply(&self.scheduler)?;
        let mut scheduler = config.build(p.steps)?;
        if handoff.is_none()
            && (scheduler.is_stochastic() || p.init_image.is_some())
            && p.num_images > 1
        {
            // diffusers draws image i's noise (VAE sample, added noise, step noise) from its
            // own generator (seed + i); one process-wide generator reproduces that image by
            // image.
            let mut all = Vec::with_capacity(p.num_images);
            for i in 0..p.num_images {
                let single = GenerateParams {
                    seed: p.seed.wrapping_add(i as u64),
                    num_images: 1,
                    batch_first_seed: (i > 0).then_some(p.batch_first_seed.unwrap_or(p.seed)),
                    ..p.clone()
                };
                all.push(self.denoise_with(&single, None, noise, progress)?);
            }
            return Ok(Tensor::cat(&all, 0));
        }
        if handoff.is_some() && p.num_images != 1 {
            return Err(EngineError::InvalidRequest(
                "a refiner stage takes one image at a time".into(),
            ));
        }

        // 1. prompt embeddings
        progress(Progress::EncodingPrompt)?;
        let (embeds, pooled, negative) = self.encode_prompt(p, cfg)?;

        // 2. where the schedule is entered, and the initial latents
        let entry = match (&handoff, &p.init_image) {
            (Some((_, entry)), _) => Some(*entry),
            (None, Some(init)) => Some(init.entry()),
            (None, None) => None,
        };
        let start = match entry {
            Some(entry) => self.entry_index(
                scheduler.as_ref(),
                config.num_train_timesteps,
                p.steps,
                entry,
            )?,
            None => 0,
        };
        let timesteps = scheduler.timesteps().to_vec();
        let end = match p.denoising_end {
            Some(fraction) => {
                let cutoff = discrete_cutoff(config.num_train_timesteps, fraction);
                start + timesteps[start..].iter().filter(|&&t| t >= cutoff).count()
            }
            None => timesteps.len(),
        };
        if end <= start {
            return Err(EngineError::InvalidRequest(format!(
                "`denoising_end` {:?} leaves no step of {} to run",
                p.denoising_end, p.steps
            )));
        }
        let image_based = entry.is_some();
        let add_noise = matches!(entry, Some(Entry::Strength(_)));
        let unet_takes_latents_only = self.unet.config().in_channels == self.vae.latent_channels();
        let mut inpaint: Option<Inpaint> = None;
        let mut latents = match (&handoff, &p.init_image) {
            (Some((latents, _)), _) => self.image_latents(
                None,
                Some(latents),
                add_noise,
                scheduler.as_ref(),
                start,
                noise,
            )?,
            (None, None) => {
                if !unet_takes_latents_only {
                    return Err(EngineError::InvalidRequest(
                        "this is an inpainting model: it needs an init image and a mask".into(),
                    ));
                }
                let initial = self.initial_noise(p, noise).to_device(device);
                initial * scheduler.init_noise_sigma()
            }
            (None, Some(init)) if init.mask.is_some() => {
                let (latents, state) =
                    self.inpaint_latents(init, p, scheduler.as_ref(), start, noise)?;
                inpaint = Some(state);
                latents
            }
            (None, Some(init)) => {
                if !unet_takes_latents_only {
                    return Err(EngineError::InvalidRequest(
                        "this is an inpainting model: it needs a mask with the init image".into(),
                    ));
                }
                noise.seed(p.seed);
                self.image_latents(
                    Some(init),
                    None,
                    add_noise,
                    scheduler.as_ref(),
                    start,
                    noise,
                )?
            }
        };

        // 3. added conditioning
        let (add_time_ids, negative_time_ids) = self.time_ids(p, image_based);
        let repeat = |t: &Tensor| t.repeat([n, 1, 1][..t.dim()].to_vec());
        let (context, text_embeds, time_ids) = match &negative {
            Some((neg_embeds, neg_pooled)) => (
                Tensor::cat(&[repeat(neg_embeds), repeat(&embeds)], 0),
                Tensor::cat(&[repeat(neg_pooled), repeat(&pooled)], 0),
                Tensor::cat(
                    &[
                        negative_time_ids.repeat([n, 1]),
                        add_time_ids.repeat([n, 1]),
                    ],
                    0,
                ),
            ),
            None => (
                repeat(&embeds),
                repeat(&pooled),
                add_time_ids.repeat([n, 1]),
            ),
        };
        let context = context.to_device(device).to_kind(kind);
        let text_embeds = text_embeds.to_device(device).to_kind(kind);
        let time_ids = time_ids.to_device(device).to_kind(kind);
        let added = AddedCond {
            text_embeds: &text_embeds,
            time_ids: &time_ids,
        };

        // 4. denoising loop (step 0 marks its start); progress counts scheduler steps, not
        // UNet calls (second-order schedulers call it twice per step)
        let total = (end - start).div_ceil(scheduler.order());
        let refining = handoff.is_some();
        let mut done = 0;
        let mut draw = |shape: &[i64]| noise.randn(shape);
        progress(Progress::Denoising {
            step: 0,
            total,
            latents: &latents,
            refining,
        })?;
        for (i, &t) in timesteps.iter().enumerate().take(end).skip(start) {
            let model_input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let mut model_input = scheduler.scale_model_input(&model_input, i);
            if let Some(state) = inpaint.as_ref().filter(|s| s.nine_channels) {
                // 9-channel inpainting UNets also see the mask and the masked image.
                let (mask, masked) = if cfg {
                    (
                        Tensor::cat(&[&state.mask, &state.mask], 0),
                        Tensor::cat(&[&state.masked_latents, &state.masked_latents], 0),
                    )
                } else {
                    (
                        state.mask.shallow_clone(),
                        state.masked_latents.shallow_clone(),
                    )
                };
                model_input = Tensor::cat(&[model_input, mask, masked], 1);
            }
            let model_input = model_input.to_kind(kind);
            let timestep = Tensor::from(t as f32).to_device(device);
            let noise_pred = self
                .unet
                .forward(&model_input, &timestep, &context, Some(&added))
                .to_kind(Kind::Float);
            let noise_pred = if cfg {
                let halves = noise_pred.chunk(2, 0);
                let (uncond, text) = (&halves[0], &halves[1]);
                let guided = uncond + (text - uncond) * p.guidance_scale;
                if p.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, text, p.guidance_rescale)
                } else {
                    guided
                }
            } else {
                noise_pred
            };
            latents = scheduler.step(&noise_pred, i, &latents, &mut draw);
            if let Some(state) = inpaint.as_ref().filter(|s| !s.nine_channels) {
                // 4-channel UNets: keep the unmasked area on the image's noised trajectory.
                let proper = if i + 1 < timesteps.len() {
                    scheduler.add_noise(&state.image_latents, &state.noise, i + 1)
                } else {
                    state.image_latents.shallow_clone()
                };
                latents = (-&state.mask + 1.0) * proper + &state.mask * &latents;
            }
            if scheduler.completes_step(i) || i + 1 == end {
                done += 1;
                progress(Progress::Denoising {
                    step: done.min(total),
                    total,
                    latents: &latents,
                    refining,
                })?;
            }
        }
        let latents = latents.to_kind(Kind::Float).to_device(Device::Cpu);
        if latents.isfinite().all().int64_value(&[]) == 0 {
            return Err(EngineError::NonFinite(format!(
                "try another scheduler configuration (scheduler {:?}, {} steps)",
                p.scheduler_overrides.class, p.steps
            )));
        }
        Ok(latents)
    }

    /// Decodes one image's latents [C, h, w] into a [H, W, 3] uint8 image on the CPU.
    pub fn decode_image(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(latents)?.image)
    }

    /// Tokens of `prompt` beyond what the tokenizers keep (0 when it fits).
    pub fn prompt_overflow(&self, prompt: &str) -> usize {
        let first = self.tokenizer.as_ref().map_or(0, |t| t.overflow(prompt));
        first.max(self.tokenizer_2.overflow(prompt))
    }

    /// Whether the model conditions on aesthetic scores (an SDXL refiner).
    pub fn requires_aesthetics_score(&self) -> bool {
        self.requires_aesthetics_score
    }

    /// Whether the UNet is an inpainting UNet (latents, mask and masked image in).
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels != self.vae.latent_channels()
    }

    /// The number of latent channels.
    pub fn latent_channels(&self) -> i64 {
        self.unet.config().in_channels
    }
}

/// diffusers' `discrete_timestep_cutoff` for a fraction of the schedule: timesteps at or
/// above it belong to the first `fraction`.
fn discrete_cutoff(train_steps: i64, fraction: f64) -> f64 {
    let train = train_steps as f64;
    // Python's round() rounds halves to even.
    (train - fraction * train).round_ties_even()
}

/// diffusers' `rescale_noise_cfg`.
fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, rescale: f64) -> Tensor {
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std_text = text.std_dim(dims.as_slice(), true, true);
    let std_cfg = guided.std_dim(dims.as_slice(), true, true);
    let rescaled = guided * (std_text / std_cfg);
    rescaled * rescale + guided * (1.0 - rescale)
}

pub use crate::engine::codec::to_uint8;
