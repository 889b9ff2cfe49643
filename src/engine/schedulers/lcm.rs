//! `LCMScheduler` (diffusers `schedulers/scheduling_lcm.py`): multistep latent consistency
//! sampling, for LCM-distilled models and the LCM LoRAs (a few steps, guidance about 1).
//! Each step maps the sample to the model's clean estimate through the consistency
//! boundary condition and, unless it is the last step, noises that estimate afresh to the
//! next timestep.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::{
    predict_clean_vp, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
};

/// Whether LCM clamps its clean-image prediction when the config does not say (diffusers'
/// `LCMScheduler` default).
pub const CLIPS_BY_DEFAULT: bool = false;

/// The schedule the consistency models were distilled on (`original_inference_steps`,
/// default 50): timesteps k - 1, 2k - 1, ..., k = train // original steps.
pub const DEFAULT_ORIGINAL_STEPS: i64 = 50;

/// The steps of the schedule `config`'s model was distilled on, whose timesteps LCM and
/// TCD take theirs from.
pub fn distillation_steps(config: &SchedulerConfig) -> i64 {
    config
        .original_inference_steps
        .unwrap_or(DEFAULT_ORIGINAL_STEPS)
}

/// The inference timesteps of LCM and TCD for `steps` steps: `steps` of the distillation
/// schedule's timesteps taken at evenly spaced indices from the top, as diffusers'
/// `set_timesteps` picks them (numpy's `linspace(0, n, steps, endpoint=False)`, floored);
/// a request's custom timesteps in their place.
pub fn consistency_timesteps(config: &SchedulerConfig, steps: usize) -> Result<Vec<i64>> {
    if let Some(custom) = &config.timesteps {
        return Ok(custom.clone());
    }
    let train = config.num_train_timesteps;
    let original = distillation_steps(config);
    let invalid = |m: String| Err(EngineError::InvalidRequest(m));
    if !(1..=train).contains(&original) {
        return invalid(format!(
            "`original_inference_steps` is {original}; it must lie in 1..={train} (the training timesteps)"
        ));
    }
    if steps as i64 > original {
        return invalid(format!(
            "{steps} steps exceed the scheduler's `original_inference_steps` ({original}): \
             its timesteps are a subset of that schedule"
        ));
    }
    let k = train / original;
    let origin: Vec<i64> = (1..=original).rev().map(|i| i * k - 1).collect();
    let spacing = origin.len() as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| origin[(i as f64 * spacing).floor() as usize])
        .collect())
}

/// The alphas and timesteps LCM and TCD step through.
pub struct ConsistencySchedule {
    /// The inference timesteps (whole numbers, as the UNet is fed them).
    pub timesteps: Vec<f64>,
    /// alphas_cumprod (float32).
    pub alphas_cumprod: Vec<f32>,
    /// The alpha before timestep 0 (1 with `set_alpha_to_one`, their default).
    pub final_alpha_cumprod: f32,
}

impl ConsistencySchedule {
    /// `set_timesteps(steps)` of a consistency scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod.first().copied().unwrap_or(1.0)
        };
        Ok(Self {
            timesteps: consistency_timesteps(config, steps)?
                .into_iter()
                .map(|t| t as f64)
                .collect(),
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    /// alphas_cumprod at timestep `t` (the final alpha below 0).
    pub fn alpha(&self, t: i64) -> f32 {
        usize::try_from(t)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t).copied())
            .unwrap_or(self.final_alpha_cumprod)
    }

    /// `add_noise` at call `index`: sqrt(alpha) x + sqrt(1 - alpha) noise.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        let alpha = self.alpha(self.timestep(index));
        original * f64::from(alpha.sqrt()) + noise * f64::from((1.0 - alpha).sqrt())
    }

    /// The timestep of call `index`, `None` past the last.
    pub fn get(&self, index: usize) -> Option<i64> {
        self.timesteps.get(index).map(|&t| t as i64)
    }

    /// The timestep of call `index`.
    pub fn timestep(&self, index: usize) -> i64 {
        self.timesteps[index] as i64
    }
}

/// Latent consistency multistep sampling.
pub struct Lcm {
    schedule: ConsistencySchedule,
    timestep_scaling: f32,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
}

impl Lcm {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self {
            schedule: ConsistencySchedule::new(config, steps)?,
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0) as f32,
            prediction_type: config.prediction_type,
            clip_sample: config.clip_range(CLIPS_BY_DEFAULT),
        })
    }

    /// The boundary condition's (c_skip, c_out) at timestep `t`, sigma_data 0.5, in
    /// float32 (diffusers divides through `reciprocal`, as `float / tensor` does).
    fn boundary_scalings(&self, t: i64) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let denominator = scaled * scaled + 0.25;
        (denominator.recip() * 0.25, scaled / denominator.sqrt())
    }
}

impl Scheduler for Lcm {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        self.schedule.add_noise(original, noise, index)
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        let t = self.schedule.timestep(index);
        let alpha_t = self.schedule.alpha(t);
        let mut clean = predict_clean_vp(self.prediction_type, &model_output, sample, alpha_t);
        if let Some(range) = self.clip_sample {
            clean = clean.clamp(-range, range);
        }
        let (c_skip, c_out) = self.boundary_scalings(t);
        let denoised = clean * f64::from(c_out) + sample * f64::from(c_skip);
        match self.schedule.get(index + 1) {
            Some(prev_t) => {
                let alpha_prev = self.schedule.alpha(prev_t);
                let n = noise(&model_output.size()).to_device(model_output.device());
                denoised * f64::from(alpha_prev.sqrt()) + n * f64::from((1.0 - alpha_prev).sqrt())
            }
            None => denoised,
        }
    }

    fn is_stochastic(&self) -> bool {
        self.schedule.timesteps.len() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(original: Option<i64>) -> SchedulerConfig {
        SchedulerConfig {
            original_inference_steps: original,
            ..SchedulerConfig::sdxl_base()
        }
    }

    #[test]
    fn timesteps_match_diffusers() {
        // LCMScheduler().set_timesteps(n).timesteps
        let c = config(None);
        assert_eq!(consistency_timesteps(&c, 4).unwrap(), [999, 759, 499, 259]);
        assert_eq!(consistency_timesteps(&c, 1).unwrap(), [999]);
        assert_eq!(
            consistency_timesteps(&c, 6).unwrap(),
            [999, 839, 679, 499, 339, 179]
        );
        assert_eq!(consistency_timesteps(&c, 50).unwrap().last(), Some(&19));
        let c = config(Some(8));
        assert_eq!(consistency_timesteps(&c, 3).unwrap(), [999, 749, 374]);
    }

    #[test]
    fn more_steps_than_the_distillation_schedule_are_refused() {
        assert!(consistency_timesteps(&config(None), 51).is_err());
        assert!(consistency_timesteps(&config(Some(2000)), 4).is_err());
        assert!(consistency_timesteps(&config(Some(0)), 1).is_err());
    }
}
