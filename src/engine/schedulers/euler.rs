//! `EulerDiscreteScheduler` (diffusers `schedulers/scheduling_euler_discrete.py`), the
//! SDXL default: a first-order step in sigma space with no added noise.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::{
    interp, spaced_timesteps, FinalSigmasType, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};

/// Euler's method over the model's sigma schedule.
pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    /// One more than the timesteps: the final sigma.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

impl EulerDiscrete {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let unsupported = |what: &str| {
            Err(EngineError::InvalidRequest(format!(
                "scheduler option `{what}` is not supported by this engine yet"
            )))
        };
        if config.use_karras_sigmas == Some(true) {
            return unsupported("use_karras_sigmas");
        }
        if config.use_exponential_sigmas == Some(true) {
            return unsupported("use_exponential_sigmas");
        }
        if config.use_beta_sigmas == Some(true) {
            return unsupported("use_beta_sigmas");
        }
        if config
            .interpolation_type
            .as_deref()
            .is_some_and(|t| t != "linear")
        {
            return unsupported("interpolation_type");
        }
        if config
            .timestep_type
            .as_deref()
            .is_some_and(|t| t != "discrete")
        {
            return unsupported("timestep_type");
        }
        let cumprod = config.alphas_cumprod()?;
        let table: Vec<f32> = {
            let ac = Tensor::from_slice(&cumprod);
            Vec::try_from(((-&ac + 1.0) / &ac).pow_tensor_scalar(0.5))?
        };
        let timesteps = spaced_timesteps(config, steps);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(t, &table) as f32)
            .collect();
        let last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => table.first().copied().unwrap_or(0.0),
        };
        sigmas.push(last);
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = match config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: init_noise_sigma as f64,
            prediction_type: config.prediction_type,
        })
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Tensor {
        let sigma = self.sigmas[step];
        sample / ((sigma * sigma + 1.0).sqrt() as f64)
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor) -> Tensor {
        let sigma = self.sigmas[step] as f64;
        let model_output = model_output.to_kind(tch::Kind::Float);
        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => sample - &model_output * sigma,
            PredictionType::VPrediction => {
                let denom = sigma * sigma + 1.0;
                &model_output * (-sigma / denom.sqrt()) + sample / denom
            }
            PredictionType::Sample => model_output.shallow_clone(),
        };
        let derivative = (sample - pred_original) / sigma;
        let dt = self.sigmas[step + 1] as f64 - sigma;
        sample + derivative * dt
    }
}
