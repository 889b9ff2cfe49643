//! What a generation request asks of the pipeline, with diffusers' parameter names and
//! defaults, and what the pipeline reports back.

use tch::{Kind, Tensor};

pub use crate::engine::guider::{Guider, GuiderKind};
pub use crate::engine::models::freeu::FreeU;
pub use crate::engine::models::seamless::Seamless;
pub use crate::engine::pag::{Pag, PagLayer};
use crate::engine::prompt_syntax::a1111_compose;
pub use crate::engine::prompt_syntax::Emphasis;
pub use crate::engine::prompt_syntax::PromptSyntax;
pub use crate::engine::schedulers::SchedulerOverrides;
pub use crate::engine::variation::SeedVariation;

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
    /// How the prompts are read: plain, compel's or A1111's syntax.
    pub prompt_syntax: PromptSyntax,
    /// How A1111's syntax applies its weights.
    pub emphasis: Emphasis,
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
    /// A1111's seed variation of every image's starting noise (image i toward its seed
    /// + i); `None`: the seeds' own noise.
    pub variation: Option<SeedVariation>,
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
    /// FreeU's factors for the UNet's first two up blocks (`enable_freeu`), if asked.
    pub freeu: Option<FreeU>,
    /// Perturbed-attention guidance (diffusers' `StableDiffusionXLPAG*Pipeline`), if asked.
    pub pag: Option<Pag>,
    /// The axes along which the image tiles seamlessly (the UNets' and the VAE's
    /// convolutions pad circularly along them), if asked.
    pub seamless: Option<Seamless>,
    /// How the prompt's and the negative prompt's predictions combine (diffusers'
    /// guiders); `None`: classifier-free guidance at every step.
    pub guider: Option<Guider>,
    /// For a second pass (hires), the first pass's steps: prompt edits in A1111's syntax
    /// count past them, as A1111 counts them in its hires pass.
    pub first_pass_steps: Option<usize>,
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

    /// An init image of `width` x `height` RGB `pixels` (row-major), entering the
    /// schedule at `strength`.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>, strength: f64) -> Self {
        Self {
            width: i64::from(width),
            height: i64::from(height),
            pixels,
            strength,
            mask: None,
            denoising_start: None,
        }
    }

    /// Adds an inpainting mask from RGB pixels of the image's size (white repaints), as
    /// the luminance PIL's `convert("L")` computes.
    pub fn with_mask_rgb(self, rgb: &[u8]) -> Self {
        self.with_blurred_mask_rgb(rgb, 0)
    }

    /// Adds an inpainting mask from RGB pixels of the image's size, first blurred as
    /// diffusers' `mask_processor.blur(mask, blur)` does (Pillow's Gaussian blur of
    /// that standard deviation; 0: none), then its luminance.
    pub fn with_blurred_mask_rgb(mut self, rgb: &[u8], blur: u32) -> Self {
        let (width, height) = (self.width as usize, self.height as usize);
        let grey = rgb.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]);
        let mask = if grey {
            // A grey mask blurs the same in each channel: once is enough.
            let mut plane: Vec<u8> = rgb.iter().step_by(3).copied().collect();
            crate::engine::blur::gaussian_blur(&mut plane, width, height, 1, blur as f32);
            plane
        } else {
            let mut rgb = rgb.to_vec();
            crate::engine::blur::gaussian_blur(&mut rgb, width, height, 3, blur as f32);
            luminance(&rgb)
        };
        self.mask = Some(mask);
        self
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

/// PIL's `convert("L")` of RGB pixels.
pub(crate) fn luminance(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| {
            let [r, g, b] = [p[0], p[1], p[2]].map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

impl GenerateParams {
    /// The prompt's parts in the UNet's batch: its sub-prompts in A1111's syntax (a
    /// prompt that does not split is one), else one.
    pub fn prompt_parts(&self) -> usize {
        match self.prompt_syntax {
            PromptSyntax::A1111 => a1111_compose::sub_prompts(&self.prompt).map_or(1, |p| p.len()),
            _ => 1,
        }
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
            prompt_syntax: PromptSyntax::Plain,
            emphasis: Emphasis::Original,
            width: 1024,
            height: 1024,
            steps: 30,
            seed: 0,
            num_images: 1,
            variation: None,
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
            freeu: None,
            pag: None,
            seamless: None,
            guider: None,
            first_pass_steps: None,
        }
    }
}

/// How the images of one request are split into denoising runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// As one call of diffusers' pipeline with one generator per image: images that draw
    /// no noise of their own share each UNet call; the others run one at a time, an
    /// inpainting image after the first taking the init image's latent samples from the
    /// first image's generator.
    Together,
    /// One run per image, each as if it were image 0 of a request with its seed: an image
    /// is the same whatever batch it was part of, so its metadata replays it exactly.
    PerImage,
}

/// The denoising runs of `p`: image i has seed `p.seed + i`. `own_generators` says whether
/// its images draw noise of their own (a stochastic scheduler, an init image), which
/// keeps them in runs of one image.
pub fn batch_runs(
    p: &GenerateParams,
    own_generators: bool,
    mode: BatchMode,
) -> Vec<GenerateParams> {
    if mode == BatchMode::Together && !own_generators {
        return vec![p.clone()];
    }
    (0..p.num_images)
        .map(|i| GenerateParams {
            seed: p.seed.wrapping_add(i as u64),
            num_images: 1,
            variation: p.variation.map(|v| v.nth(i as u64)),
            batch_first_seed: match mode {
                BatchMode::Together => (i > 0).then_some(p.batch_first_seed.unwrap_or(p.seed)),
                BatchMode::PerImage => None,
            },
            ..p.clone()
        })
        .collect()
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
