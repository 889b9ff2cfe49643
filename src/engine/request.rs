//! What a generation request asks of the pipeline, with diffusers' parameter names and
//! defaults, and what the pipeline reports back.

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::SchedulerConfig;

/// One generation request for one pipeline, with diffusers' parameter names and defaults.
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
    /// Stop denoising at this fraction of the schedule, in (0, 1), and return the
    /// latents as they are (the base's part of an ensemble of experts).
    pub denoising_end: Option<f64>,
    /// Aesthetic-score conditioning of models with `requires_aesthetics_score` (the
    /// refiner), in place of the target size.
    pub aesthetic_score: f64,
    /// Negative aesthetic-score conditioning.
    pub negative_aesthetic_score: f64,
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
    /// Start at this fraction of the schedule, in (0, 1), without adding noise: the image
    /// is taken as already denoised that far (refiner-style hand-off). Overrides
    /// `strength`.
    pub denoising_start: Option<f64>,
}

/// Where an image-based start enters the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Entry {
    /// Run the last `steps x strength` steps after noising the image to the first of them.
    Strength(f64),
    /// Run the timesteps below this fraction of the schedule, adding no noise.
    DenoisingStart(f64),
}

impl InitImage {
    /// Where this image enters the schedule.
    pub fn entry(&self) -> Entry {
        match self.denoising_start {
            Some(fraction) => Entry::DenoisingStart(fraction),
            None => Entry::Strength(self.strength),
        }
    }

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
            denoising_start: None,
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
    pub(crate) fn mask_tensor(&self) -> Option<Tensor> {
        let mask = self.mask.as_ref()?;
        let t = Tensor::from_slice(mask)
            .reshape([1, 1, self.height, self.width])
            .to_kind(Kind::Float)
            / 255.0;
        Some(t.ge(0.5).to_kind(Kind::Float))
    }

    /// [1, 3, H, W] float32 in [-1, 1], as diffusers' image processor normalises.
    pub(crate) fn to_tensor(&self) -> Tensor {
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
            denoising_end: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
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
        /// Whether the refiner stage is denoising.
        refining: bool,
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

/// The result of a generation.
pub struct GenerateOutput {
    /// Final latents before decoding, float32 on the CPU, [N, C, H/f, W/f].
    pub latents: Tensor,
    /// 8-bit RGB images, [N, H, W, 3] uint8 on the CPU.
    pub images: Tensor,
}

/// How the refiner takes over from the base model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefinerMode {
    /// Ensemble of experts: the base denoises the first `high_noise_fraction` of the
    /// schedule (`denoising_end`), the refiner the rest (`denoising_start`).
    EnsembleOfExperts {
        /// Fraction of the schedule the base runs, in (0, 1).
        high_noise_fraction: f64,
    },
    /// The base denoises fully; the refiner re-noises its latents by `strength` and
    /// denoises them again.
    Img2Img {
        /// In (0, 1].
        strength: f64,
    },
}

/// The refiner stage of a request: diffusers' StableDiffusionXLImg2ImgPipeline run on
/// the base's latents with the same prompts and micro-conditioning.
#[derive(Debug, Clone, PartialEq)]
pub struct RefinerParams {
    /// How it takes over.
    pub mode: RefinerMode,
    /// The refiner's steps (its whole schedule; the mode decides the part it runs).
    pub steps: usize,
    /// The refiner's guidance scale.
    pub guidance_scale: f64,
    /// Changes to the refiner's scheduler configuration.
    pub scheduler_overrides: SchedulerOverrides,
    /// Aesthetic-score conditioning.
    pub aesthetic_score: f64,
    /// Negative aesthetic-score conditioning.
    pub negative_aesthetic_score: f64,
}

impl RefinerParams {
    /// diffusers' defaults for `mode` with the base request's steps and guidance.
    pub fn new(mode: RefinerMode, base: &GenerateParams) -> Self {
        Self {
            mode,
            steps: base.steps,
            guidance_scale: base.guidance_scale,
            scheduler_overrides: SchedulerOverrides::default(),
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}
