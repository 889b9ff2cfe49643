//! `TCDScheduler` (diffusers `schedulers/scheduling_tcd.py`): trajectory consistency
//! distillation sampling, for the TCD and Hyper-SD LoRAs. Each step estimates the clean
//! sample, moves it to an intermediate timestep s = floor((1 - gamma) t_prev) along the
//! model's own noise and, with gamma (`eta`) above 0, noises it from s back up to the next
//! timestep; gamma 0 is deterministic.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::lcm::ConsistencySchedule;
use crate::engine::schedulers::{
    predict_clean_vp, predict_noise_vp, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
};

/// Trajectory consistency sampling.
pub struct Tcd {
    schedule: ConsistencySchedule,
    gamma: f64,
    prediction_type: PredictionType,
}

impl Tcd {
    /// `set_timesteps(steps)` of a scheduler built from `config`; gamma is the config's
    /// `eta` (a call argument in diffusers, 0 unless the pipeline is given one).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self {
            schedule: ConsistencySchedule::new(config, steps)?,
            gamma: config.eta.unwrap_or(0.0),
            prediction_type: config.prediction_type,
        })
    }

    /// The intermediate timestep below `prev_t`, in float32 as diffusers' long tensor
    /// times a Python float gives it.
    fn intermediate(&self, prev_t: i64) -> i64 {
        ((1.0 - self.gamma) as f32 * prev_t as f32).floor() as i64
    }
}

impl Scheduler for Tcd {
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
        let next = self.schedule.get(index + 1);
        let prev_t = next.unwrap_or(0);
        let alpha_t = self.schedule.alpha(t);
        let alpha_prev = self.schedule.alpha(prev_t);
        let alpha_s = self.schedule.alpha(self.intermediate(prev_t));
        let prediction = self.prediction_type;
        let clean = predict_clean_vp(prediction, &model_output, sample, alpha_t);
        let epsilon = predict_noise_vp(prediction, &model_output, sample, &clean, alpha_t);
        let noised =
            clean * f64::from(alpha_s.sqrt()) + epsilon * f64::from((1.0 - alpha_s).sqrt());
        if self.gamma > 0.0 && next.is_some() {
            let ratio = alpha_prev / alpha_s;
            let n = noise(&model_output.size()).to_device(model_output.device());
            noised * f64::from(ratio.sqrt()) + n * f64::from((1.0 - ratio).sqrt())
        } else {
            noised
        }
    }

    fn is_stochastic(&self) -> bool {
        self.gamma > 0.0 && self.schedule.timesteps.len() > 1
    }
}
