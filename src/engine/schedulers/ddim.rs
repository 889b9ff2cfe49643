//! `DDIMScheduler` (diffusers `schedulers/scheduling_ddim.py`): denoising diffusion
//! implicit models; `eta` > 0 adds noise (DDPM-like), 0 is deterministic.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::{
    predict_clean_vp, predict_noise_vp, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};

/// Whether DDIM clamps its clean-image prediction when the config does not say (diffusers'
/// `DDIMScheduler` default).
pub const CLIPS_BY_DEFAULT: bool = true;

/// DDIM sampling.
pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    eta: f64,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
}

impl Ddim {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let train = config.num_train_timesteps;
        let n = steps as i64;
        let timesteps: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                crate::engine::schedulers::sigmas::linspace(0.0, (train - 1) as f64, steps)
                    .into_iter()
                    .rev()
                    .map(|v| v.round_ties_even() as i64)
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / n as f64;
                let len = (train as f64 / ratio).ceil() as i64;
                (0..len)
                    .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod.first().copied().unwrap_or(1.0)
        };
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: train / n,
            eta: config.eta.unwrap_or(0.0),
            prediction_type: config.prediction_type,
            clip_sample: config.clip_range(CLIPS_BY_DEFAULT),
        })
    }

    /// alphas_cumprod at `t` (float32, as diffusers indexes its float32 tensor).
    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for Ddim {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        let alpha = self.alpha(self.timesteps[index] as i64);
        original * f64::from(alpha.sqrt()) + noise * f64::from((1.0 - alpha).sqrt())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        let t = self.timesteps[index] as i64;
        let prev_t = t - self.step_ratio;
        // The scalar algebra in float32, as diffusers does it on 0-d float32 tensors: the
        // update divides by sqrt(alpha_t), which amplifies any rounding difference.
        let alpha_t = self.alpha(t);
        let alpha_prev = self.alpha(prev_t);
        let beta_t = 1.0 - alpha_t;
        let prediction = self.prediction_type;
        let mut pred_original = predict_clean_vp(prediction, &model_output, sample, alpha_t);
        let pred_epsilon =
            predict_noise_vp(prediction, &model_output, sample, &pred_original, alpha_t);
        if let Some(range) = self.clip_sample {
            pred_original = pred_original.clamp(-range, range);
        }
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = pred_epsilon * f64::from((1.0 - alpha_prev - std_dev * std_dev).sqrt());
        let prev = pred_original * f64::from(alpha_prev.sqrt()) + direction;
        if self.eta > 0.0 {
            let n = noise(&model_output.size()).to_device(model_output.device());
            prev + n * f64::from(std_dev)
        } else {
            prev
        }
    }

    fn is_stochastic(&self) -> bool {
        self.eta > 0.0
    }
}
