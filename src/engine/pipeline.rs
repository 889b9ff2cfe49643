//! The SDXL text-to-image pipeline, following diffusers'
//! `StableDiffusionXLPipeline.__call__` step by step.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::error::{read_json, EngineError, Result};
use crate::engine::models::clip::ClipTextModel;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::models::unet::{AddedCond, UNet2DConditionModel};
use crate::engine::models::vae::AutoencoderKL;
use crate::engine::schedulers::SchedulerConfig;

/// libtorch's CPU generator is process-global: one job draws all its noise under this lock
/// so that no other job's draws interleave (invariant 2).
static NOISE_LOCK: Mutex<()> = Mutex::new(());

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

/// One text-to-image request, with diffusers' parameter names and defaults.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Prompt for the first text encoder.
    pub prompt: String,
    /// Prompt for the second text encoder; the prompt when `None` or empty.
    pub prompt_2: Option<String>,
    /// Negative prompt. `None` means zero embeddings where the model forces zeros for an
    /// empty prompt (SDXL does); `Some("")` is encoded.
    pub negative_prompt: Option<String>,
    /// Negative prompt for the second encoder; the negative prompt when `None` or empty.
    pub negative_prompt_2: Option<String>,
    /// Classifier-free guidance scale; guidance is off at 1 or below.
    pub guidance_scale: f64,
    /// Guidance rescale (arXiv:2305.08891 §3.4), 0 for none.
    pub guidance_rescale: f64,
    /// Layers skipped before the penultimate one for the prompt embeddings.
    pub clip_skip: Option<i64>,
    /// Image width in pixels (a multiple of 8).
    pub width: i64,
    /// Image height in pixels (a multiple of 8).
    pub height: i64,
    /// Denoising steps.
    pub steps: usize,
    /// Seed of image 0; image i uses seed + i.
    pub seed: u64,
    /// Number of images.
    pub num_images: usize,
    /// Micro-conditioning original size (height, width); the image size when `None`.
    pub original_size: Option<(i64, i64)>,
    /// Micro-conditioning crop top-left (y, x).
    pub crops_coords_top_left: (i64, i64),
    /// Micro-conditioning target size (height, width); the image size when `None`.
    pub target_size: Option<(i64, i64)>,
    /// Negative micro-conditioning; the positive one unless original and target are set.
    pub negative_original_size: Option<(i64, i64)>,
    /// Negative crop top-left.
    pub negative_crops_coords_top_left: (i64, i64),
    /// Negative target size.
    pub negative_target_size: Option<(i64, i64)>,
    /// Changes to the model's scheduler configuration.
    pub scheduler_overrides: SchedulerOverrides,
    /// Image to image: the init image (its size is the output size) and the strength.
    pub init_image: Option<InitImage>,
    /// Set for images after the first of a batch: the batch's first seed. diffusers'
    /// inpainting encodes the (single) init image with the first image's generator only,
    /// so later images share those latent samples.
    pub batch_first_seed: Option<u64>,
}

/// An init image for image to image, 8-bit RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
    /// How much of the schedule runs, in (0, 1]: 1 ignores the image's content.
    pub strength: f64,
    /// Inpainting: luminance of the mask, same size, row-major (128 and above repaint).
    pub mask: Option<Vec<u8>>,
}

impl InitImage {
    /// Decodes PNG, JPEG or WebP bytes.
    pub fn decode(bytes: &[u8], strength: f64) -> Result<Self> {
        let image = image::load_from_memory(bytes)
            .map_err(|e| {
                EngineError::InvalidRequest(format!("the init image does not decode: {e}"))
            })?
            .to_rgb8();
        let (width, height) = image.dimensions();
        Ok(Self {
            width: i64::from(width),
            height: i64::from(height),
            pixels: image.into_raw(),
            strength,
            mask: None,
        })
    }

    /// Adds an inpainting mask (PNG, JPEG or WebP; white repaints), which must have the
    /// image's size. Luminance as PIL's `convert("L")` computes it.
    pub fn with_mask(mut self, bytes: &[u8]) -> Result<Self> {
        let mask = image::load_from_memory(bytes)
            .map_err(|e| EngineError::InvalidRequest(format!("the mask does not decode: {e}")))?
            .to_rgb8();
        let (w, h) = mask.dimensions();
        if (i64::from(w), i64::from(h)) != (self.width, self.height) {
            return Err(EngineError::InvalidRequest(format!(
                "the mask is {w}x{h} but the image is {}x{}",
                self.width, self.height
            )));
        }
        let luma = mask
            .pixels()
            .map(|p| {
                let [r, g, b] = p.0.map(u32::from);
                ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
            })
            .collect();
        self.mask = Some(luma);
        Ok(self)
    }

    /// The binarised mask [1, 1, H, W] (1 = repaint), as diffusers' mask processor makes it.
    fn mask_tensor(&self) -> Option<Tensor> {
        let mask = self.mask.as_ref()?;
        let t = Tensor::from_slice(mask)
            .reshape([1, 1, self.height, self.width])
            .to_kind(Kind::Float)
            / 255.0;
        Some(t.ge(0.5).to_kind(Kind::Float))
    }

    /// [1, 3, H, W] float32 in [-1, 1], as diffusers' image processor normalises.
    fn to_tensor(&self) -> Tensor {
        let t = Tensor::from_slice(&self.pixels)
            .reshape([self.height, self.width, 3])
            .permute([2, 0, 1])
            .unsqueeze(0)
            .to_kind(Kind::Float);
        (t / 255.0) * 2.0 - 1.0
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            prompt_2: None,
            negative_prompt: None,
            negative_prompt_2: None,
            guidance_scale: 5.0,
            guidance_rescale: 0.0,
            clip_skip: None,
            width: 1024,
            height: 1024,
            steps: 30,
            seed: 0,
            num_images: 1,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            scheduler_overrides: SchedulerOverrides::default(),
            init_image: None,
            batch_first_seed: None,
        }
    }
}

/// What the pipeline reports while it works.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Text encoders are running.
    EncodingPrompt,
    /// Denoising step `step` of `total` finished (0 when the loop starts); `latents` are
    /// the current ones.
    Denoising {
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
        /// The latents after this step.
        latents: &'a Tensor,
    },
    /// The VAE is decoding image `index`.
    Decoding {
        /// The image.
        index: usize,
    },
}

/// Request-level changes to the model's scheduler configuration: another scheduler
/// class and diffusers config keys, as `XScheduler.from_config(config, **keys)` applies
/// them (keys the model's config shares with the new class carry over).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOverrides {
    /// Another scheduler class.
    pub class: Option<crate::engine::schedulers::SchedulerKind>,
    /// diffusers config keys and their values.
    pub keys: std::collections::BTreeMap<String, serde_json::Value>,
}

impl SchedulerOverrides {
    /// Sets a diffusers config key.
    pub fn set(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.keys.insert(key.to_string(), value.into());
    }

    /// The model's configuration with these overrides applied.
    pub fn apply(&self, base: &SchedulerConfig) -> Result<SchedulerConfig> {
        if self.class.is_none() && self.keys.is_empty() {
            return Ok(base.clone());
        }
        let invalid = |m: String| EngineError::InvalidRequest(m);
        let mut value = serde_json::to_value(base).map_err(|e| invalid(e.to_string()))?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| invalid("scheduler config is not an object".into()))?;
        if let Some(class) = self.class {
            map.insert("_class_name".into(), class.class_name().into());
        }
        for (key, v) in &self.keys {
            if !crate::engine::schedulers::CONFIG_KEYS.contains(&key.as_str()) {
                return Err(invalid(format!("unknown scheduler config key `{key}`")));
            }
            map.insert(key.clone(), v.clone());
        }
        serde_json::from_value(value).map_err(|e| invalid(format!("scheduler config: {e}")))
    }
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

/// The result of a generation.
pub struct GenerateOutput {
    /// Final latents before decoding, float32 on the CPU, [N, C, H/f, W/f].
    pub latents: Tensor,
    /// 8-bit RGB images, [N, H, W, 3] uint8 on the CPU.
    pub images: Tensor,
}

/// A loaded SDXL pipeline.
pub struct SdxlPipeline {
    dir: PathBuf,
    placement: Placement,
    tokenizer: Option<ClipTokenizer>,
    text_encoder: Option<ClipTextModel>,
    tokenizer_2: ClipTokenizer,
    text_encoder_2: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    /// The VAE's kind: float32 when the model runs in float16 and the VAE forces upcasting.
    vae_kind: Kind,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    requires_aesthetics_score: bool,
}

impl SdxlPipeline {
    /// Loads a diffusers SDXL pipeline folder.
    pub fn load(dir: &Path, placement: Placement) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let (device, kind) = (placement.device, placement.kind);
        let (tokenizer, text_encoder) = if dir.join("text_encoder").is_dir() {
            (
                Some(ClipTokenizer::from_dir(&dir.join("tokenizer"))?),
                Some(ClipTextModel::load_dir(
                    &dir.join("text_encoder"),
                    device,
                    kind,
                )?),
            )
        } else {
            (None, None)
        };
        let tokenizer_2 = ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?;
        let text_encoder_2 = ClipTextModel::load_dir(&dir.join("text_encoder_2"), device, kind)?;
        let unet = UNet2DConditionModel::load_dir(&dir.join("unet"), device, kind)?;
        let vae_config: crate::engine::models::vae::VaeConfig =
            read_json(&dir.join("vae").join("config.json"))?;
        let vae_kind = if kind == Kind::Half && vae_config.force_upcast {
            Kind::Float
        } else {
            kind
        };
        let vae = AutoencoderKL::load_dir(&dir.join("vae"), device, vae_kind)?;
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
            vae_kind,
            scheduler,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            requires_aesthetics_score: index.requires_aesthetics_score,
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
        if self.requires_aesthetics_score {
            return Err(mismatch(
                "models with requires_aesthetics_score (refiners) run only as a refiner stage"
                    .into(),
            ));
        }
        if let Some(expected) = self.unet.pooled_dim() {
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
        self.vae.config().scale_factor()
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
        &self.vae
    }

    /// The first text encoder, absent in refiner-style pipelines.
    pub fn text_encoder(&self) -> Option<&ClipTextModel> {
        self.text_encoder.as_ref()
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
            if (p.steps as f64 * init.strength) < 1.0 {
                return bad(format!(
                    "`strength` {} leaves no step of {} to run (steps x strength must be at least 1)",
                    init.strength, p.steps
                ));
            }
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

    /// Runs both text encoders on one (prompt, prompt_2) pair: the concatenated hidden
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
        if let (Some(tok), Some(enc)) = (&self.tokenizer, &self.text_encoder) {
            hidden.push(enc.forward(&ids(tok, prompt)?, clip_skip)?.hidden);
        }
        let out = self
            .text_encoder_2
            .forward(&ids(&self.tokenizer_2, prompt_2)?, clip_skip)?;
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
    /// generator seeded with seed + i, in float32 (invariant 2). Call with NOISE_LOCK held.
    fn initial_noise(&self, p: &GenerateParams) -> Tensor {
        let f = self.vae_scale_factor();
        let channels = self.vae.config().latent_channels;
        let shape = [1, channels, p.height / f, p.width / f];
        let noise: Vec<Tensor> = (0..p.num_images)
            .map(|i| {
                tch::manual_seed(p.seed.wrapping_add(i as u64) as i64);
                Tensor::randn(shape, (Kind::Float, Device::Cpu))
            })
            .collect();
        Tensor::cat(&noise, 0)
    }

    /// Image to image (StableDiffusionXLImg2ImgPipeline's get_timesteps and
    /// prepare_latents): the VAE latents of the init image, sampled and noised to the
    /// first timestep that `strength` keeps, and the index of that timestep. Draws from
    /// the generator (call with NOISE_LOCK held): the latent sample first, then the noise.
    fn image_latents(
        &self,
        init: &InitImage,
        p: &GenerateParams,
        scheduler: &dyn crate::engine::schedulers::Scheduler,
    ) -> Result<(Tensor, usize)> {
        let keep = ((p.steps as f64 * init.strength) as usize).min(p.steps);
        let t_start = p.steps - keep;
        let start = t_start * scheduler.order();
        tch::manual_seed(p.seed as i64);
        let latents = self.encode_sample(&init.to_tensor());
        let noise = Tensor::randn(latents.size().as_slice(), (Kind::Float, Device::Cpu));
        Ok((
            scheduler.add_noise(&latents, &noise.to_device(self.placement.device), start),
            start,
        ))
    }

    /// A VAE sample of `image` ([1, 3, H, W] in [-1, 1]) in the denoiser's latent space,
    /// drawing its noise from the generator.
    fn encode_sample(&self, image: &Tensor) -> Tensor {
        let device = self.placement.device;
        let image = image.to_device(device).to_kind(self.vae_kind);
        let (mean, logvar) = self.vae.encode(&image);
        let eps =
            Tensor::randn(mean.size().as_slice(), (Kind::Float, Device::Cpu)).to_device(device);
        let sample = mean.to_kind(Kind::Float) + (logvar.to_kind(Kind::Float) * 0.5).exp() * eps;
        self.vae.scale_latents(&sample)
    }

    /// Inpainting (StableDiffusionXLInpaintPipeline's prepare_latents and
    /// prepare_mask_latents), drawing in diffusers' order: the image's latent sample (when
    /// needed), the noise, then the masked image's latent sample.
    fn inpaint_latents(
        &self,
        init: &InitImage,
        p: &GenerateParams,
        scheduler: &dyn crate::engine::schedulers::Scheduler,
    ) -> Result<(Tensor, usize, Inpaint)> {
        let device = self.placement.device;
        let in_channels = self.unet.config().in_channels;
        let latent_channels = self.vae.config().latent_channels;
        let nine_channels = in_channels == 2 * latent_channels + 1;
        if !nine_channels && in_channels != latent_channels {
            return Err(EngineError::InvalidRequest(format!(
                "a UNet with {in_channels} input channels cannot inpaint"
            )));
        }
        let keep = ((p.steps as f64 * init.strength) as usize).min(p.steps);
        let start = (p.steps - keep) * scheduler.order();
        let strength_max = init.strength >= 1.0;
        let image = init.to_tensor();
        let mask = init
            .mask_tensor()
            .ok_or_else(|| EngineError::InvalidRequest("inpainting needs a mask".into()))?;
        let masked_image = &image * mask.lt(0.5).to_kind(Kind::Float);
        let f = self.vae_scale_factor();
        let (h, w) = (p.height / f, p.width / f);
        let need_image = !nine_channels || !strength_max;
        let draw_noise = || {
            Tensor::randn([1, latent_channels, h, w], (Kind::Float, Device::Cpu)).to_device(device)
        };
        let (image_latents, noise, masked_latents) = match p.batch_first_seed {
            None => {
                tch::manual_seed(p.seed as i64);
                let image_latents = need_image.then(|| self.encode_sample(&image));
                let noise = draw_noise();
                (image_latents, noise, self.encode_sample(&masked_image))
            }
            Some(first) => {
                // The latent samples come from the first image's generator; this image's
                // generator starts with the noise.
                tch::manual_seed(first as i64);
                let image_latents = need_image.then(|| self.encode_sample(&image));
                let _first_noise = draw_noise();
                let masked_latents = self.encode_sample(&masked_image);
                tch::manual_seed(p.seed as i64);
                (image_latents, draw_noise(), masked_latents)
            }
        };
        let latents = match (&image_latents, strength_max) {
            (Some(image_latents), false) => scheduler.add_noise(image_latents, &noise, start),
            _ => &noise * scheduler.init_noise_sigma(),
        };
        let mask = mask
            .upsample_nearest2d([h, w], None, None)
            .to_device(device);
        let state = Inpaint {
            nine_channels,
            mask,
            masked_latents,
            image_latents: image_latents.unwrap_or_else(|| noise.zeros_like()),
            noise,
        };
        Ok((latents, start, state))
    }

    fn time_ids(&self, original: (i64, i64), crop: (i64, i64), target: (i64, i64)) -> Tensor {
        let values = [original.0, original.1, crop.0, crop.1, target.0, target.1].map(|v| v as f32);
        Tensor::from_slice(&values).unsqueeze(0)
    }

    /// Generates `p.num_images` images. `progress` is called as work advances; an error it
    /// returns (such as [`EngineError::Cancelled`]) stops the job at that point.
    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<GenerateOutput> {
        let latents = self.denoise(p, progress)?;
        let mut images = Vec::with_capacity(p.num_images);
        for i in 0..p.num_images {
            progress(Progress::Decoding { index: i })?;
            images.push(self.decode_image(&latents.get(i as i64))?);
        }
        Ok(GenerateOutput {
            latents,
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
        let _no_grad = tch::no_grad_guard();
        let device = self.placement.device;
        let kind = self.placement.kind;
        let n = p.num_images as i64;
        let cfg = p.guidance_scale > 1.0;
        let mut scheduler = p
            .scheduler_overrides
            .apply(&self.scheduler)?
            .build(p.steps)?;
        if (scheduler.is_stochastic() || p.init_image.is_some()) && p.num_images > 1 {
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
                all.push(self.denoise(&single, progress)?);
            }
            return Ok(Tensor::cat(&all, 0));
        }

        // 1. prompt embeddings
        progress(Progress::EncodingPrompt)?;
        let (embeds, pooled, negative) = self.encode_prompt(p, cfg)?;

        // 2. initial latents; a stochastic scheduler keeps drawing from the same generator,
        // so the lock is held until the loop ends.
        let noise_guard = NOISE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut inpaint: Option<Inpaint> = None;
        let (mut latents, start) = match &p.init_image {
            None => {
                if self.unet.config().in_channels != self.vae.config().latent_channels {
                    return Err(EngineError::InvalidRequest(
                        "this is an inpainting model: it needs an init image and a mask".into(),
                    ));
                }
                let noise = self.initial_noise(p).to_device(device);
                (noise * scheduler.init_noise_sigma(), 0)
            }
            Some(init) if init.mask.is_some() => {
                let (latents, start, state) = self.inpaint_latents(init, p, scheduler.as_ref())?;
                inpaint = Some(state);
                (latents, start)
            }
            Some(init) => {
                if self.unet.config().in_channels != self.vae.config().latent_channels {
                    return Err(EngineError::InvalidRequest(
                        "this is an inpainting model: it needs a mask with the init image".into(),
                    ));
                }
                self.image_latents(init, p, scheduler.as_ref())?
            }
        };
        let noise_guard = scheduler.is_stochastic().then_some(noise_guard);

        // 3. added conditioning
        let size = (p.height, p.width);
        let add_time_ids = self.time_ids(
            p.original_size.unwrap_or(size),
            p.crops_coords_top_left,
            p.target_size.unwrap_or(size),
        );
        let negative_time_ids = match (p.negative_original_size, p.negative_target_size) {
            (Some(original), Some(target)) => {
                self.time_ids(original, p.negative_crops_coords_top_left, target)
            }
            _ => add_time_ids.shallow_clone(),
        };
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
        let timesteps = scheduler.timesteps().to_vec();
        let total = p.steps - start / scheduler.order();
        let mut done = 0;
        let mut draw = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        progress(Progress::Denoising {
            step: 0,
            total,
            latents: &latents,
        })?;
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
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
            if scheduler.completes_step(i) {
                done += 1;
                progress(Progress::Denoising {
                    step: done.min(total),
                    total,
                    latents: &latents,
                })?;
            }
        }
        drop(noise_guard);
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
        let _no_grad = tch::no_grad_guard();
        let z = latents
            .unsqueeze(0)
            .to_device(self.placement.device)
            .to_kind(self.vae_kind);
        let z = self.vae.unscale_latents(&z);
        let decoded = self
            .vae
            .decode(&z)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        Ok(to_uint8(&decoded).get(0))
    }

    /// Tokens of `prompt` beyond what the tokenizers keep (0 when it fits).
    pub fn prompt_overflow(&self, prompt: &str) -> usize {
        let first = self.tokenizer.as_ref().map_or(0, |t| t.overflow(prompt));
        first.max(self.tokenizer_2.overflow(prompt))
    }

    /// Whether the UNet is an inpainting UNet (latents, mask and masked image in).
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels != self.vae.config().latent_channels
    }

    /// The number of latent channels.
    pub fn latent_channels(&self) -> i64 {
        self.unet.config().in_channels
    }
}

/// diffusers' `rescale_noise_cfg`.
fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, rescale: f64) -> Tensor {
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std_text = text.std_dim(dims.as_slice(), true, true);
    let std_cfg = guided.std_dim(dims.as_slice(), true, true);
    let rescaled = guided * (std_text / std_cfg);
    rescaled * rescale + guided * (1.0 - rescale)
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
