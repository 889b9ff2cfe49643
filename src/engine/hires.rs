//! The hires pass (A1111's "Hires. fix"): a generation enlarged, in latent space or
//! decoded and run through an upscaler model, then denoised again at the larger size as
//! image to image. Its semantics are diffusers' two-pipeline recipe:
//! `StableDiffusionXLPipeline`, the latents (`output_type="latent"`) interpolated or the
//! image upscaled, then `StableDiffusionXLImg2ImgPipeline` from the same components (or
//! another base model's, A1111's "Hires checkpoint") with image i's generator (seed + i)
//! continuing from the first pass.

use image::RgbImage;
use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::models::seamless;
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::{go_on, to_the_end, SdxlPipeline, Start};
use crate::engine::request::{
    batch_runs, BatchMode, Entry, GenerateOutput, GenerateParams, InitImage, SchedulerOverrides,
};
use crate::engine::resample::lanczos_resize;
use crate::engine::upscale::tiles::TilePlan;
use crate::engine::upscale::{UpscaleNoise, Upscaler};

/// Most upscaler passes an enlargement takes (A1111's `Upscaler.upscale`).
const MAX_MODEL_PASSES: usize = 3;

/// How latents are interpolated (`torch.nn.functional.interpolate` modes, as A1111's
/// latent upscalers call it: `align_corners=False`, no antialiasing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentInterpolation {
    /// `nearest` (A1111 "Latent (nearest)").
    Nearest,
    /// `nearest-exact` (A1111 "Latent (nearest-exact)").
    NearestExact,
    /// `bilinear` (A1111 "Latent").
    Bilinear,
    /// `bicubic` (A1111 "Latent (bicubic)").
    Bicubic,
}

impl LatentInterpolation {
    /// A1111's name for the upscaler, as its PNG parameters write it.
    pub fn a1111_name(self) -> &'static str {
        match self {
            LatentInterpolation::Nearest => "Latent (nearest)",
            LatentInterpolation::NearestExact => "Latent (nearest-exact)",
            LatentInterpolation::Bilinear => "Latent",
            LatentInterpolation::Bicubic => "Latent (bicubic)",
        }
    }
}

/// How the first pass's result is enlarged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Enlarge {
    /// The latents, interpolated.
    Latent(LatentInterpolation),
    /// The decoded image, through an upscaler model tiled so.
    Model(TilePlan),
}

/// The second pass of a hires generation.
#[derive(Debug, Clone)]
pub struct HiresParams {
    /// The final width in pixels (a multiple of 8).
    pub width: i64,
    /// The final height in pixels (a multiple of 8).
    pub height: i64,
    /// The second pass's whole schedule, of which `strength` runs.
    pub steps: usize,
    /// Denoising strength, in (0, 1].
    pub strength: f64,
    /// Its guidance scale.
    pub guidance_scale: f64,
    /// Its scheduler.
    pub scheduler_overrides: SchedulerOverrides,
    /// How the first pass's result is enlarged.
    pub enlarge: Enlarge,
    /// The pass's own texts (A1111's hires prompt), in place of the first pass's.
    pub prompts: Option<PassPrompts>,
}

/// The texts a pass reads in place of the first pass's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassPrompts {
    pub prompt: String,
    pub prompt_2: Option<String>,
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
}

/// The second pass's request: the first pass's micro-conditioning at the final size,
/// with the pass's steps, guidance, scheduler and prompts (the first pass's unless it has
/// its own).
pub fn second_pass_params(first: &GenerateParams, h: &HiresParams) -> GenerateParams {
    let texts = h.prompts.clone().unwrap_or_else(|| PassPrompts {
        prompt: first.prompt.clone(),
        prompt_2: first.prompt_2.clone(),
        negative_prompt: first.negative_prompt.clone(),
        negative_prompt_2: first.negative_prompt_2.clone(),
    });
    GenerateParams {
        prompt: texts.prompt,
        prompt_2: texts.prompt_2,
        negative_prompt: texts.negative_prompt,
        negative_prompt_2: texts.negative_prompt_2,
        width: h.width,
        height: h.height,
        steps: h.steps,
        guidance_scale: h.guidance_scale,
        scheduler_overrides: h.scheduler_overrides.clone(),
        init_image: None,
        batch_first_seed: None,
        denoising_end: None,
        first_pass_steps: Some(first.steps),
        ..first.clone()
    }
}

/// Where the second pass enters its schedule.
pub fn entry(h: &HiresParams) -> Entry {
    Entry::Strength(h.strength)
}

/// Latents [N, C, h, w] interpolated to `height` x `width` latent pixels.
pub fn enlarge_latents(
    latents: &Tensor,
    mode: LatentInterpolation,
    height: i64,
    width: i64,
) -> Result<Tensor> {
    let size = [height, width];
    // Without scale factors torch derives them from the sizes, as `interpolate(size=...)`.
    Ok(match mode {
        LatentInterpolation::Nearest => latents.f_upsample_nearest2d(size, None, None)?,
        LatentInterpolation::NearestExact => {
            latents.f_internal_upsample_nearest_exact2d(size, None, None)?
        }
        LatentInterpolation::Bilinear => latents.f_upsample_bilinear2d(size, false, None, None)?,
        LatentInterpolation::Bicubic => latents.f_upsample_bicubic2d(size, false, None, None)?,
    })
}

/// `image` enlarged to `width` x `height` as A1111's `Upscaler.upscale` does: upscaler
/// passes (`pass`) while the image is smaller than the target (at least one when the
/// target is the image's own size, at most three), then Pillow's Lanczos to the exact
/// size.
pub fn enlarge_image<E>(
    image: RgbImage,
    width: u32,
    height: u32,
    mut pass: impl FnMut(&RgbImage) -> std::result::Result<RgbImage, E>,
) -> std::result::Result<RgbImage, E> {
    let same_size = image.dimensions() == (width, height);
    let mut current = image;
    for i in 0..MAX_MODEL_PASSES {
        let covers = current.width() >= width && current.height() >= height;
        if covers && (i > 0 || !same_size) {
            break;
        }
        let before = current.dimensions();
        current = pass(&current)?;
        if current.dimensions() == before {
            break;
        }
    }
    Ok(if current.dimensions() == (width, height) {
        current
    } else {
        lanczos_resize(&current, width, height)
    })
}

/// An 8-bit RGB image as the image-to-image pipeline takes it: [1, 3, H, W] in [-1, 1].
pub fn image_tensor(image: &RgbImage) -> Tensor {
    InitImage::new(image.width(), image.height(), image.as_raw().clone(), 1.0).to_tensor()
}

/// Checks that `own`, another base model, can run the hires pass of a generation on
/// `base` (A1111's "Hires checkpoint"): the same latent space, and a UNet that denoises
/// plain latents without aesthetic scores.
pub fn check_pass_model(base: &SdxlPipeline, own: &SdxlPipeline) -> Result<()> {
    let name = own.dir().display();
    if own.latent_channels() != base.latent_channels()
        || own.vae_scale_factor() != base.vae_scale_factor()
    {
        return Err(EngineError::Incompatible(format!(
            "the hires model `{name}` has another latent space than the base `{}`",
            base.dir().display()
        )));
    }
    if own.requires_aesthetics_score() {
        return Err(EngineError::Incompatible(format!(
            "the hires model `{name}` is a refiner (requires_aesthetics_score): it runs as a refiner stage"
        )));
    }
    if own.is_inpainting() {
        return Err(EngineError::Incompatible(format!(
            "the hires model `{name}` is an inpainting model: it needs a masked image, which the hires pass does not have"
        )));
    }
    Ok(())
}

/// Generates `p.num_images` images with a hires pass, as diffusers' two-pipeline recipe
/// does with one generator per image: the final latents and decoded images. `second` runs
/// the hires pass (`base` itself, or another base model built from its components).
pub fn generate_hires(
    base: &SdxlPipeline,
    second: &SdxlPipeline,
    upscaler: Option<&Upscaler>,
    p: &GenerateParams,
    h: &HiresParams,
) -> Result<GenerateOutput> {
    base.validate(p)?;
    check_pass_model(base, second)?;
    let _seamless = seamless::request(p.seamless);
    let second_params = second_pass_params(p, h);
    second.validate(&second_params)?;
    let first_prompt = base.encode_prompt(p)?;
    let second_prompt = second.encode_prompt(&second_params)?;
    let f = base.vae_scale_factor();
    let mut all = Vec::with_capacity(p.num_images);
    for run in batch_runs(p, true, BatchMode::Together) {
        let mut noise = NoiseStream::lock();
        let latents = to_the_end(base.denoise(
            &run,
            &first_prompt,
            Start::Request,
            &[],
            &mut noise,
            &mut go_on,
        )?);
        let run_second = second_pass_params(&run, h);
        let enlarged = match (h.enlarge, upscaler) {
            (Enlarge::Model(plan), Some(upscaler)) => {
                let tiling = upscaler.tiling(plan, None);
                let decoded = base.decode_image(&latents.get(0))?;
                let image = rgb_image(&decoded)?;
                let (w, hh) = (h.width as u32, h.height as u32);
                let upscaled = enlarge_image(image, w, hh, |img| {
                    let drawn = UpscaleNoise {
                        seed: run.seed,
                        stream: Some(&mut noise),
                    };
                    upscaler.upscale(img, tiling, drawn, &mut |_| Ok(()))
                })?;
                Enlarged::Image(image_tensor(&upscaled))
            }
            (Enlarge::Latent(mode), _) => {
                Enlarged::Latents(enlarge_latents(&latents, mode, h.height / f, h.width / f)?)
            }
            (Enlarge::Model(_), None) => {
                return Err(EngineError::InvalidRequest(
                    "an upscaler-model hires pass needs the upscaler".into(),
                ))
            }
        };
        let from = enlarged.start(entry(h));
        all.push(to_the_end(second.denoise(
            &run_second,
            &second_prompt,
            from,
            &[],
            &mut noise,
            &mut go_on,
        )?));
    }
    second.decode_all(&Tensor::cat(&all, 0))
}

/// The first pass's result, enlarged.
pub enum Enlarged {
    /// Latents [1, C, h, w] at the final size.
    Latents(Tensor),
    /// An image [1, 3, H, W] in [-1, 1] at the final size.
    Image(Tensor),
}

impl Enlarged {
    /// Where the second pass starts from it.
    pub fn start(&self, entry: Entry) -> Start<'_> {
        match self {
            Enlarged::Latents(latents) => Start::Handoff {
                latents,
                entry,
                mask: None,
            },
            Enlarged::Image(image) => Start::Image { image, entry },
        }
    }
}

/// An [H, W, 3] uint8 tensor as an RGB image.
pub fn rgb_image(image: &Tensor) -> Result<RgbImage> {
    let size = image.size();
    let pixels = Vec::<u8>::try_from(image.contiguous().flatten(0, -1))?;
    RgbImage::from_raw(size[1] as u32, size[0] as u32, pixels)
        .ok_or_else(|| EngineError::Internal("a decoded image of the wrong size".into()))
}
