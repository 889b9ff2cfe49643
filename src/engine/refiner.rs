//! The SDXL refiner stage: the base pipeline's latents handed to a second pipeline (the
//! refiner), as diffusers' two-pipeline recipe does with `output_type="latent"` and one
//! generator per image passed to both pipelines.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::SdxlPipeline;
use crate::engine::request::{
    Entry, GenerateOutput, GenerateParams, Progress, RefinerMode, RefinerParams,
};

/// The refiner's request: the base request's prompts and micro-conditioning with the
/// refiner's steps, guidance, scheduler and aesthetic scores.
fn refiner_params(base: &GenerateParams, r: &RefinerParams) -> GenerateParams {
    GenerateParams {
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        scheduler_overrides: r.scheduler_overrides.clone(),
        aesthetic_score: r.aesthetic_score,
        negative_aesthetic_score: r.negative_aesthetic_score,
        init_image: None,
        denoising_end: None,
        batch_first_seed: None,
        ..base.clone()
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
    if p.init_image.as_ref().is_some_and(|i| i.mask.is_some()) {
        return Err(EngineError::InvalidRequest(
            "the refiner stage does not follow inpainting".into(),
        ));
    }
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

/// Runs the base and then the refiner for every image: the refined latents, float32 on
/// the CPU, [N, C, h, w]. Image i's generator (seed + i) is used by both stages in turn.
pub fn denoise_refined(
    base: &SdxlPipeline,
    refiner: &SdxlPipeline,
    p: &GenerateParams,
    r: &RefinerParams,
    progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
) -> Result<Tensor> {
    validate(base, refiner, p, r)?;
    let (denoising_end, entry) = match r.mode {
        RefinerMode::EnsembleOfExperts {
            high_noise_fraction,
        } => (
            Some(high_noise_fraction),
            Entry::DenoisingStart(high_noise_fraction),
        ),
        RefinerMode::Img2Img { strength } => (None, Entry::Strength(strength)),
    };
    let mut refined = Vec::with_capacity(p.num_images);
    for i in 0..p.num_images {
        let single = GenerateParams {
            seed: p.seed.wrapping_add(i as u64),
            num_images: 1,
            batch_first_seed: (i > 0).then_some(p.seed),
            ..p.clone()
        };
        let mut noise = NoiseStream::lock();
        let base_params = GenerateParams {
            denoising_end,
            ..single.clone()
        };
        let handoff = base.denoise_with(&base_params, None, &mut noise, progress)?;
        let stage = refiner_params(&single, r);
        refined.push(refiner.denoise_with(
            &stage,
            Some((&handoff, entry)),
            &mut noise,
            progress,
        )?);
    }
    Ok(Tensor::cat(&refined, 0))
}

/// [`denoise_refined`] and the refiner's VAE decode, as the refiner pipeline decodes.
pub fn generate_refined(
    base: &SdxlPipeline,
    refiner: &SdxlPipeline,
    p: &GenerateParams,
    r: &RefinerParams,
    progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
) -> Result<GenerateOutput> {
    let latents = denoise_refined(base, refiner, p, r, progress)?;
    refiner.decode_all(&latents, progress)
}
