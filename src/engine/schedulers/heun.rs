//! `HeunDiscreteScheduler` (diffusers `schedulers/scheduling_heun_discrete.py`): Heun's
//! second-order method. Every step but the last calls the UNet twice (predictor at sigma,
//! corrector at the next sigma); the timesteps list holds both calls.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::sigmas::{schedule, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_sigma, init_noise_sigma, predict_original, scale_by_sigma, NoiseSource,
    PredictionType, Scheduler, SchedulerConfig,
};

/// Heun sampling.
pub struct Heun {
    timesteps: Vec<f64>,
    /// [s0, s1, s1, s2, s2, ..., s_{n-1}, s_{n-1}, 0].
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
    /// The predictor's derivative, step size and sample, while a corrector is due.
    pending: Option<(Tensor, f64, Tensor)>,
}

/// `[x0, x1, x1, x2, x2, ...]`: every element but the first twice.
pub(crate) fn interleave<T: Copy>(values: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len() * 2);
    if let Some(first) = values.first() {
        out.push(*first);
    }
    for v in values.iter().skip(1) {
        out.push(*v);
        out.push(*v);
    }
    out
}

impl Heun {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let training = TrainingSigmas::new(config)?;
        let s = schedule(config, &training, steps, false, false);
        let mut sigmas: Vec<f32> = s.sigmas.iter().map(|&v| v as f32).collect();
        sigmas.push(0.0);
        // cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        let last = sigmas.len() - 1;
        let mut interleaved = interleave(&sigmas[..last]);
        interleaved.push(sigmas[last]);
        let timesteps: Vec<f64> = s.timesteps.iter().map(|&t| t as f32 as f64).collect();
        let max_sigma = interleaved.iter().copied().fold(f32::MIN, f32::max);
        Ok(Self {
            timesteps: interleave(&timesteps),
            sigmas: interleaved,
            init_noise_sigma: init_noise_sigma(config.timestep_spacing, max_sigma.into()),
            prediction_type: config.prediction_type,
            pending: None,
        })
    }
}

impl Scheduler for Heun {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        add_noise_sigma(original, noise, f64::from(self.sigmas[index]))
    }

    fn order(&self) -> usize {
        2
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
        _noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        match self.pending.take() {
            None => {
                let sigma = f64::from(self.sigmas[index]);
                let sigma_next = f64::from(self.sigmas[index + 1]);
                let pred = predict_original(self.prediction_type, &model_output, sample, sigma);
                let derivative = (sample - pred) / sigma;
                let dt = sigma_next - sigma;
                let prev = sample + &derivative * dt;
                self.pending = Some((derivative, dt, sample.shallow_clone()));
                prev
            }
            Some((prev_derivative, dt, first_sample)) => {
                let sigma_next = f64::from(self.sigmas[index]);
                let pred =
                    predict_original(self.prediction_type, &model_output, sample, sigma_next);
                let derivative = (sample - pred) / sigma_next;
                let derivative = (prev_derivative + derivative) / 2.0;
                first_sample + derivative * dt
            }
        }
    }

    fn completes_step(&self, index: usize) -> bool {
        // The corrector finished (no predictor pending), or the final Euler step ran.
        self.pending.is_none() || index + 1 == self.timesteps.len()
    }
}
