//! `EulerAncestralDiscreteScheduler` (diffusers
//! `schedulers/scheduling_euler_ancestral_discrete.py`), A1111's "Euler a": an Euler step
//! to a lower sigma, then fresh noise back up to the next sigma.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::sigmas::TrainingSigmas;
use crate::engine::schedulers::{
    add_noise_sigma, init_noise_sigma, interp, predict_original, scale_by_sigma, spaced_timesteps,
    NoiseSource, PredictionType, Scheduler, SchedulerConfig,
};

/// Ancestral Euler sampling.
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

impl EulerAncestral {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let training = TrainingSigmas::new(config)?;
        let timesteps = spaced_timesteps(config, steps);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(t, &training.sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: init_noise_sigma(config.timestep_spacing, max_sigma.into()),
            prediction_type: config.prediction_type,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        add_noise_sigma(original, noise, f64::from(self.sigmas[index]))
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Tensor {
        scale_by_sigma(sample, self.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        let (from, to) = (self.sigmas[index], self.sigmas[index + 1]);
        let pred_original =
            predict_original(self.prediction_type, &model_output, sample, f64::from(from));
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = (sample - pred_original) / f64::from(from);
        let dt = f64::from(sigma_down - from);
        let prev = sample + derivative * dt;
        let noise = noise(&model_output.size()).to_device(model_output.device());
        prev + noise * f64::from(sigma_up)
    }

    fn is_stochastic(&self) -> bool {
        true
    }
}
