//! `LMSDiscreteScheduler` (diffusers `schedulers/scheduling_lms_discrete.py`): linear
//! multistep in sigma space, order 4, with coefficients integrated exactly (the Lagrange
//! basis is a polynomial; 4-point Gauss-Legendre integrates it without error).

use std::collections::VecDeque;

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::sigmas::{schedule, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_sigma, init_noise_sigma, predict_original, scale_by_sigma, NoiseSource,
    PredictionType, Scheduler, SchedulerConfig,
};

const ORDER: usize = 4;

/// LMS sampling.
pub struct Lms {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
    derivatives: VecDeque<Tensor>,
}

impl Lms {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let training = TrainingSigmas::new(config)?;
        let s = schedule(config, &training, steps, false, false);
        let mut sigmas: Vec<f32> = s.sigmas.iter().map(|&v| v as f32).collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        Ok(Self {
            timesteps: s.timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            init_noise_sigma: init_noise_sigma(config.timestep_spacing, max_sigma.into()),
            prediction_type: config.prediction_type,
            derivatives: VecDeque::new(),
        })
    }

    /// ∫ from sigma[t] to sigma[t+1] of the Lagrange basis polynomial `current` over the
    /// last `order` sigmas.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let sigma = |i: usize| f64::from(self.sigmas[i]);
        let basis = |tau: f64| {
            let mut prod = 1.0;
            for k in 0..order {
                if k == current {
                    continue;
                }
                prod *= (tau - sigma(t - k)) / (sigma(t - current) - sigma(t - k));
            }
            prod
        };
        let (a, b) = (sigma(t), sigma(t + 1));
        const NODES: [f64; 4] = [
            -0.861_136_311_594_052_6,
            -0.339_981_043_584_856_3,
            0.339_981_043_584_856_3,
            0.861_136_311_594_052_6,
        ];
        const WEIGHTS: [f64; 4] = [
            0.347_854_845_137_453_9,
            0.652_145_154_862_546_1,
            0.652_145_154_862_546_1,
            0.347_854_845_137_453_9,
        ];
        let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
        NODES
            .iter()
            .zip(WEIGHTS)
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Scheduler for Lms {
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
        let model_output = model_output.to_kind(tch::Kind::Float);
        let sigma = f64::from(self.sigmas[index]);
        let pred = predict_original(self.prediction_type, &model_output, sample, sigma);
        self.derivatives.push_back((sample - pred) / sigma);
        if self.derivatives.len() > ORDER {
            self.derivatives.pop_front();
        }
        let order = (index + 1).min(ORDER);
        let mut prev = sample.shallow_clone();
        for (current, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            // Not `+=`: prev starts as a view of the caller's sample.
            prev = &prev + derivative * self.coefficient(order, index, current);
        }
        prev
    }
}
