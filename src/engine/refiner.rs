//! The SDXL refiner stage: the base pipeline's latents handed to a second pipeline (the
//! refiner), as diffusers' two-pipeline recipe does with `output_type="latent"` and one
//! generator per image passed to both pipelines. After inpainting, the refiner inpaints
//! too (diffusers' inpainting pipeline given the base's latents and the same mask).

use crate::engine::error::{EngineError, Result};
use crate::engine::models::seamless;
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::{go_on, to_the_end, SdxlPipeline, Start};
use crate::engine::request::{
    batch_runs, BatchMode, Entry, GenerateOutput, GenerateParams, InitImage, RefinerMode,
    RefinerParams,
};

/// The refiner's request: the base request's prompts and micro-conditioning with the
/// refiner's steps, guidance, scheduler and aesthetic scores.
pub fn refiner_params(base: &GenerateParams, r: &RefinerParams) -> GenerateParams {
    GenerateParams {
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        scheduler_overrides: r.scheduler_overrides.clone(),
        aesthetic_score: r.aesthetic_score,
        negative_aesthetic_score: r.negative_aesthetic_score,
        init_image: None,
        denoising_end: None,
        batch_first_seed: None,
        // FreeU's factors are the base UNet's.
        freeu: None,
        // Perturbed-attention guidance names the base UNet's layers.
        pag: None,
        // The guider guides the first pass.
        guider: None,
        ..base.clone()
    }
}

/// The inpainting mask the refiner keeps to when the base inpaints (diffusers' recipe
/// passes the refiner's inpainting pipeline the base's latents and the same mask).
pub fn handoff_mask(base: &GenerateParams) -> Option<tch::Tensor> {
    base.init_image.as_ref().and_then(InitImage::mask_tensor)
}

/// How the base hands over: where it stops (`denoising_end`) and where the refiner
/// enters the schedule.
pub fn handoff(mode: RefinerMode) -> (Option<f64>, Entry) {
    match mode {
        RefinerMode::EnsembleOfExperts {
            high_noise_fraction,
        } => (
            Some(high_noise_fraction),
            Entry::DenoisingStart(high_noise_fraction),
        ),
        RefinerMode::Img2Img { strength } => (None, Entry::Strength(strength)),
    }
}

/// Checks that `refiner` can follow `base` for this request.
pub fn validate(
    base: &SdxlPipeline,
    refiner: &SdxlPipeline,
    p: &GenerateParams,
    r: &RefinerParams,
) -> Result<()> {
    base.validate(p)?;
    if p.denoising_end.is_some() {
        return Err(EngineError::InvalidRequest(
            "`denoising_end` is set by the refiner's high-noise fraction".into(),
        ));
    }
    if refiner.latent_channels() != base.latent_channels()
        || refiner.vae_scale_factor() != base.vae_scale_factor()
    {
        return Err(EngineError::Incompatible(format!(
            "the refiner `{}` has another latent space than the base `{}`",
            refiner.dir().display(),
            base.dir().display()
        )));
    }
    if refiner.is_inpainting() {
        return Err(EngineError::Incompatible(format!(
            "the refiner `{}` is an inpainting model: it needs a masked image, which a hand-off does not have",
            refiner.dir().display()
        )));
    }
    match r.mode {
        RefinerMode::EnsembleOfExperts {
            high_noise_fraction: f,
        } if !(f > 0.0 && f < 1.0) => Err(EngineError::InvalidRequest(format!(
            "`high_noise_fraction` must be in (0, 1), got {f}"
        ))),
        RefinerMode::Img2Img { strength: s } if !(s > 0.0 && s <= 1.0) => Err(
            EngineError::InvalidRequest(format!("refiner `strength` must be in (0, 1], got {s}")),
        ),
        RefinerMode::Img2Img { strength: s } if (r.steps as f64 * s) < 1.0 => {
            Err(EngineError::InvalidRequest(format!(
                "refiner `strength` {s} leaves no step of {} to run",
                r.steps
            )))
        }
        _ if r.steps == 0 => Err(EngineError::InvalidRequest(
            "refiner `steps` must be at least 1".into(),
        )),
        _ => Ok(()),
    }
}

/// Runs the base and then the refiner for every image, and the refiner's VAE decode, as
/// diffusers' two-pipeline recipe does: image i's generator (seed + i) is used by both
/// stages in turn.
pub fn generate_refined(
    base: &SdxlPipeline,
    refiner: &SdxlPipeline,
    p: &GenerateParams,
    r: &RefinerParams,
) -> Result<GenerateOutput> {
    validate(base, refiner, p, r)?;
    let _seamless = seamless::request(p.seamless);
    let (denoising_end, entry) = handoff(r.mode);
    let base_params = GenerateParams {
        denoising_end,
        ..p.clone()
    };
    let mask = handoff_mask(p);
    let base_prompt = base.encode_prompt(&base_params)?;
    let refiner_prompt = refiner.encode_prompt(&refiner_params(p, r))?;
    let mut refined = Vec::with_capacity(p.num_images);
    for run in batch_runs(&base_params, true, BatchMode::Together) {
        let mut noise = NoiseStream::lock();
        let latents = to_the_end(base.denoise(
            &run,
            &base_prompt,
            Start::Request,
            &[],
            &mut noise,
            &mut go_on,
        )?);
        let from = Start::Handoff {
            latents: &latents,
            entry,
            mask: mask.as_ref(),
        };
        let stage = refiner_params(&run, r);
        refined.push(to_the_end(refiner.denoise(
            &stage,
            &refiner_prompt,
            from,
            &[],
            &mut noise,
            &mut go_on,
        )?));
    }
    refiner.decode_all(&tch::Tensor::cat(&refined, 0))
}
