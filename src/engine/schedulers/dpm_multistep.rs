//! `DPMSolverMultistepScheduler` (diffusers `schedulers/scheduling_dpmsolver_multistep.py`):
//! DPM-Solver++ (A1111's "DPM++ 2M", with Karras sigmas "DPM++ 2M Karras") and its SDE
//! variant ("DPM++ 2M SDE"), orders 1 to 3, data prediction in VP space.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::sigmas::{beta_ppf, linspace, SigmaSpacing, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_vp, BetaSchedule, FinalSigmasType, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing,
};

/// dpmsolver++ or sde-dpmsolver++.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Deterministic DPM-Solver++.
    DpmSolverPlusPlus,
    /// Stochastic DPM-Solver++ (SDE).
    SdeDpmSolverPlusPlus,
}

/// The second-order formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// Midpoint.
    Midpoint,
    /// Heun.
    Heun,
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

/// alpha_t and sigma_t (VP) of a k-diffusion sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f64) -> (f64, f64, f64) {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmMultistep {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let invalid = |m: &str| Err(EngineError::InvalidRequest(m.to_string()));
        let algorithm = match config.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" => Algorithm::DpmSolverPlusPlus,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPlusPlus,
            other => {
                return invalid(&format!(
                    "algorithm_type `{other}` is not supported (dpmsolver++, sde-dpmsolver++)"
                ))
            }
        };
        let solver_type = match config.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return invalid(&format!(
                    "solver_type `{other}` is not supported (midpoint, heun)"
                ))
            }
        };
        let order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return invalid("solver_order must be 1, 2 or 3");
        }
        let training = TrainingSigmas::new(config)?;
        let train = config.num_train_timesteps;
        let n = steps as i64;
        // lambda_min_clipped is -inf by default: the whole range.
        let last = train;
        let mut timesteps: Vec<f64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = linspace(0.0, (last - 1) as f64, steps + 1)
                    .into_iter()
                    .map(|x| x.round_ties_even())
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                let mut v: Vec<f64> = (0..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / n as f64;
                let len = (last as f64 / ratio).ceil() as i64;
                (0..len)
                    .map(|i| (last as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
        };
        let table: Vec<f64> = training.sigmas.iter().map(|&s| f64::from(s)).collect();
        // Respaced schedules start from all training sigmas, largest first.
        let (max, min) = (
            table.last().copied().unwrap_or(1.0),
            table.first().copied().unwrap_or(1.0),
        );
        let count = timesteps.len();
        let mut sigmas: Vec<f64> = match config.sigma_spacing() {
            SigmaSpacing::Default => timesteps
                .iter()
                .map(|&t| crate::engine::schedulers::interp(t, &training.sigmas))
                .collect(),
            SigmaSpacing::Karras => {
                let rho = 7.0;
                let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
                let s: Vec<f64> = linspace(0.0, 1.0, count)
                    .into_iter()
                    .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                    .collect();
                timesteps = s
                    .iter()
                    .map(|&v| {
                        let t = training.sigma_to_t(v);
                        if config.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                            t
                        } else {
                            t.round_ties_even()
                        }
                    })
                    .collect();
                s
            }
            SigmaSpacing::Exponential => {
                let s: Vec<f64> = linspace(max.ln(), min.ln(), count)
                    .into_iter()
                    .map(f64::exp)
                    .collect();
                timesteps = s.iter().map(|&v| training.sigma_to_t(v)).collect();
                s
            }
            SigmaSpacing::Beta => {
                let s: Vec<f64> = linspace(0.0, 1.0, count)
                    .into_iter()
                    .map(|t| min + beta_ppf(1.0 - t, 0.6, 0.6) * (max - min))
                    .collect();
                timesteps = s.iter().map(|&v| training.sigma_to_t(v)).collect();
                s
            }
        };
        sigmas.push(match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => min,
        });
        // diffusers keeps sigmas in float32 and timesteps as int64.
        let sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        let timesteps = timesteps.into_iter().map(|t| t.trunc()).collect();
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
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        match self.prediction_type {
            PredictionType::Epsilon => (sample - model_output * sigma) / alpha,
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => sample * alpha - model_output * sigma,
        }
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

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Tensor {
        sample.shallow_clone()
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
