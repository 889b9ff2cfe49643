//! `EulerDiscreteScheduler` (diffusers `schedulers/scheduling_euler_discrete.py`), the
//! SDXL default: a first-order step in sigma space with no added noise.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::sigmas::{schedule, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_sigma, init_noise_sigma, predict_original, scale_by_sigma, FinalSigmasType,
    NoiseSource, PredictionType, Scheduler, SchedulerConfig,
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
                "scheduler option `{what}` is not supported by this engine"
            )))
        };
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
        let training = TrainingSigmas::new(config)?;
        let (timesteps, sigmas) = match &config.sigmas {
            Some(custom) => custom_schedule(config, &training, custom, steps)?,
            None => {
                let s = schedule(config, &training, steps, false, true);
                let mut sigmas: Vec<f32> = s.sigmas.iter().map(|&v| v as f32).collect();
                sigmas.push(match config.final_sigmas_type {
                    FinalSigmasType::Zero => 0.0,
                    FinalSigmasType::SigmaMin => training.sigmas.first().copied().unwrap_or(0.0),
                });
                (s.timesteps, sigmas)
            }
        };
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            init_noise_sigma: init_noise_sigma(config.timestep_spacing, max_sigma.into()),
            prediction_type: config.prediction_type,
        })
    }
}

/// `set_timesteps(sigmas=...)`: the sigmas as float32, the final one included, and a
/// timestep for each but the final one, where it lies among the training sigmas.
fn custom_schedule(
    config: &SchedulerConfig,
    training: &TrainingSigmas,
    custom: &[f64],
    steps: usize,
) -> Result<(Vec<f64>, Vec<f32>)> {
    config
        .check_custom_sigmas(custom, steps)
        .map_err(EngineError::InvalidRequest)?;
    let sigmas: Vec<f32> = custom.iter().map(|&s| s as f32).collect();
    let timesteps = sigmas[..sigmas.len() - 1]
        .iter()
        .map(|&s| training.sigma_to_t(f64::from(s)))
        .collect();
    Ok((timesteps, sigmas))
}

impl Scheduler for EulerDiscrete {
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
        _noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let sigma = f64::from(self.sigmas[index]);
        let model_output = model_output.to_kind(tch::Kind::Float);
        let pred_original = predict_original(self.prediction_type, &model_output, sample, sigma);
        let derivative = (sample - pred_original) / sigma;
        let dt = f64::from(self.sigmas[index + 1]) - sigma;
        sample + derivative * dt
    }
}
