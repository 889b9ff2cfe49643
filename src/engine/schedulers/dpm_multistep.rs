//! `DPMSolverMultistepScheduler` (diffusers `schedulers/scheduling_dpmsolver_multistep.py`):
//! DPM-Solver++ (A1111's "DPM++ 2M", with Karras sigmas "DPM++ 2M Karras") and its SDE
//! variant ("DPM++ 2M SDE"), orders 1 to 3, data prediction in VP space.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::sigmas::{predict_x0_vp, vp_schedule, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_vp, BetaSchedule, FinalSigmasType, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig,
};

/// dpmsolver++ or sde-dpmsolver++.
pub use crate::engine::schedulers::solver::AlgorithmType as Algorithm;

/// DPM-Solver's second-order formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// Midpoint.
    Midpoint,
    /// Heun.
    Heun,
}

/// DPM-Solver's settings from `config`: algorithm, second-order formula and order.
pub(super) fn dpm_settings(config: &SchedulerConfig) -> Result<(Algorithm, SolverType, usize)> {
    let invalid = EngineError::InvalidRequest;
    let algorithm = config.algorithm().map_err(invalid)?;
    let solver_type = match config.solver_type.as_deref().unwrap_or("midpoint") {
        "midpoint" => SolverType::Midpoint,
        "heun" => SolverType::Heun,
        other => {
            return Err(invalid(format!(
                "`solver_type` `{other}` is not supported (midpoint, heun)"
            )))
        }
    };
    Ok((algorithm, solver_type, config.order().map_err(invalid)?))
}

/// DPM-Solver++ multistep sampling.
pub struct DpmMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    algorithm: Algorithm,
    solver_type: SolverType,
    order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

use crate::engine::schedulers::sigmas::vp_lambda as lambda;

impl DpmMultistep {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (algorithm, solver_type, order) = dpm_settings(config)?;
        let training = TrainingSigmas::new(config)?;
        let table = &training.sigmas;
        // Respaced schedules span all training sigmas.
        let bounds = (
            table.last().copied().map_or(1.0, f64::from),
            table.first().copied().map_or(1.0, f64::from),
        );
        let min = bounds.1;
        let schedule = vp_schedule(
            config,
            &training,
            steps,
            config.timestep_spacing,
            bounds,
            config.beta_schedule != BetaSchedule::SquaredcosCapV2,
        );
        let timesteps = schedule.timesteps;
        let mut sigmas = schedule.sigmas;
        sigmas.push(match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => min,
        });
        // diffusers keeps sigmas in float32.
        let sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            algorithm,
            solver_type,
            order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_zero: config.final_sigmas_type == FinalSigmasType::Zero,
            model_outputs: (0..order).map(|_| None).collect(),
            lower_order_nums: 0,
        })
    }

    /// The data prediction x0 (dpmsolver++ works on x0).
    fn convert(&self, model_output: &Tensor, sample: &Tensor, index: usize) -> Tensor {
        predict_x0_vp(
            self.prediction_type,
            model_output,
            sample,
            self.sigmas[index],
        )
    }

    fn first_order(
        &self,
        m0: &Tensor,
        sample: &Tensor,
        index: usize,
        noise: Option<&Tensor>,
    ) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = lambda(self.sigmas[index + 1]);
        let (_, sigma_s, lambda_s) = lambda(self.sigmas[index]);
        let h = lambda_t - lambda_s;
        match (self.algorithm, noise) {
            (Algorithm::SdeDpmSolverPlusPlus, Some(noise)) => {
                sample * (sigma_t / sigma_s * (-h).exp())
                    + m0 * (alpha_t * (1.0 - (-2.0 * h).exp()))
                    + noise * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())
            }
            _ => sample * (sigma_t / sigma_s) - m0 * (alpha_t * ((-h).exp() - 1.0)),
        }
    }

    fn second_order(&self, sample: &Tensor, index: usize, noise: Option<&Tensor>) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = lambda(self.sigmas[index + 1]);
        let (_, sigma_s0, lambda_s0) = lambda(self.sigmas[index]);
        let (_, _, lambda_s1) = lambda(self.sigmas[index - 1]);
        let (m0, m1) = (self.output(1), self.output(2));
        let (h, h0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h0 / h;
        let d0 = m0;
        let d1 = (m0 - m1) * (1.0 / r0);
        match (self.algorithm, noise) {
            (Algorithm::SdeDpmSolverPlusPlus, Some(noise)) => {
                let base = sample * (sigma_t / sigma_s0 * (-h).exp())
                    + d0 * (alpha_t * (1.0 - (-2.0 * h).exp()))
                    + noise * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt());
                match self.solver_type {
                    SolverType::Midpoint => base + d1 * (0.5 * alpha_t * (1.0 - (-2.0 * h).exp())),
                    SolverType::Heun => {
                        base + d1 * (alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0))
                    }
                }
            }
            _ => {
                let base = sample * (sigma_t / sigma_s0) - d0 * (alpha_t * ((-h).exp() - 1.0));
                match self.solver_type {
                    SolverType::Midpoint => base - d1 * (0.5 * alpha_t * ((-h).exp() - 1.0)),
                    SolverType::Heun => base + d1 * (alpha_t * (((-h).exp() - 1.0) / h + 1.0)),
                }
            }
        }
    }

    fn third_order(&self, sample: &Tensor, index: usize, noise: Option<&Tensor>) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = lambda(self.sigmas[index + 1]);
        let (_, sigma_s0, lambda_s0) = lambda(self.sigmas[index]);
        let (_, _, lambda_s1) = lambda(self.sigmas[index - 1]);
        let (_, _, lambda_s2) = lambda(self.sigmas[index - 2]);
        let (m0, m1, m2) = (self.output(1), self.output(2), self.output(3));
        let (h, h0, h1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = (m0 - m1) * (1.0 / r0);
        let d1_1 = (m1 - m2) * (1.0 / r1);
        let d1 = &d1_0 + (&d1_0 - &d1_1) * (r0 / (r0 + r1));
        let d2 = (&d1_0 - &d1_1) * (1.0 / (r0 + r1));
        match (self.algorithm, noise) {
            (Algorithm::SdeDpmSolverPlusPlus, Some(noise)) => {
                let e = (-2.0 * h).exp();
                sample * (sigma_t / sigma_s0 * (-h).exp())
                    + m0 * (alpha_t * (1.0 - e))
                    + d1 * (alpha_t * ((1.0 - e) / (-2.0 * h) + 1.0))
                    + d2 * (alpha_t * ((1.0 - e - 2.0 * h) / (2.0 * h).powi(2) - 0.5))
                    + noise * (sigma_t * (1.0 - e).sqrt())
            }
            _ => {
                let e = (-h).exp();
                sample * (sigma_t / sigma_s0) - m0 * (alpha_t * (e - 1.0))
                    + d1 * (alpha_t * ((e - 1.0) / h + 1.0))
                    - d2 * (alpha_t * ((e - 1.0 + h) / (h * h) - 0.5))
            }
        }
    }

    /// The k-th most recent converted model output (1 = newest).
    fn output(&self, k: usize) -> &Tensor {
        self.model_outputs[self.order - k]
            .as_ref()
            .expect("the multistep history holds enough outputs at this order")
    }
}

impl Scheduler for DpmMultistep {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        add_noise_vp(original, noise, self.sigmas[index])
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
        let n = self.timesteps.len();
        let lower_order_final = index == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let lower_order_second = index + 2 == n && self.lower_order_final && n < 15;
        let model_output = model_output.to_kind(tch::Kind::Float);
        let converted = self.convert(&model_output, sample, index);
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(converted.shallow_clone());
        }
        let noise = (self.algorithm == Algorithm::SdeDpmSolverPlusPlus)
            .then(|| noise(&model_output.size()).to_device(model_output.device()));
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&converted, sample, index, noise.as_ref())
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(sample, index, noise.as_ref())
        } else {
            self.third_order(sample, index, noise.as_ref())
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        prev
    }

    fn is_stochastic(&self) -> bool {
        self.algorithm == Algorithm::SdeDpmSolverPlusPlus
    }
}
