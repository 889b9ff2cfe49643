//! `DPMSolverSinglestepScheduler` (diffusers
//! `schedulers/scheduling_dpmsolver_singlestep.py`): DPM-Solver++ in single-step groups of
//! orders 1, 2, 3 (A1111's "DPM++ SDE" family with the SDE variant).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::dpm_multistep::{dpm_settings, Algorithm, SolverType};
use crate::engine::schedulers::sigmas::{predict_x0_vp, vp_schedule, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_vp, BetaSchedule, FinalSigmasType, NoiseSource, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing,
};

/// DPM-Solver++ singlestep sampling.
pub struct DpmSinglestep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    algorithm: Algorithm,
    solver_type: SolverType,
    order_list: Vec<usize>,
    model_outputs: Vec<Option<Tensor>>,
    /// The sample at the start of the current single-step group.
    group_sample: Option<Tensor>,
}

use crate::engine::schedulers::sigmas::vp_lambda as lambda;

/// diffusers' `get_order_list`.
fn order_list(steps: usize, order: usize, lower_order_final: bool, final_zero: bool) -> Vec<usize> {
    let repeat = |pattern: &[usize], times: usize| -> Vec<usize> {
        pattern
            .iter()
            .copied()
            .cycle()
            .take(pattern.len() * times)
            .collect()
    };
    let mut orders = if lower_order_final {
        match order {
            3 => match steps % 3 {
                0 => [
                    repeat(&[1, 2, 3], (steps / 3).saturating_sub(1)),
                    vec![1, 2],
                    vec![1],
                ]
                .concat(),
                1 => [repeat(&[1, 2, 3], steps / 3), vec![1]].concat(),
                _ => [repeat(&[1, 2, 3], steps / 3), vec![1, 2]].concat(),
            },
            2 => {
                if steps.is_multiple_of(2) {
                    [repeat(&[1, 2], (steps / 2).saturating_sub(1)), vec![1, 1]].concat()
                } else {
                    [repeat(&[1, 2], steps / 2), vec![1]].concat()
                }
            }
            _ => vec![1; steps],
        }
    } else {
        match order {
            3 => repeat(&[1, 2, 3], steps / 3),
            2 => repeat(&[1, 2], steps / 2),
            _ => vec![1; steps],
        }
    };
    if final_zero {
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
    }
    orders
}

impl DpmSinglestep {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (algorithm, solver_type, order) = dpm_settings(config)?;
        let training = TrainingSigmas::new(config)?;
        let table = &training.sigmas;
        let (max, min) = (
            table.last().copied().map_or(1.0, f64::from),
            table.first().copied().map_or(1.0, f64::from),
        );
        // Singlestep places timesteps by linspace only.
        let schedule = vp_schedule(
            config,
            &training,
            steps,
            TimestepSpacing::Linspace,
            (max, min),
            config.beta_schedule != BetaSchedule::SquaredcosCapV2,
        );
        let timesteps = schedule.timesteps;
        let mut sigmas = schedule.sigmas;
        let final_zero = config.final_sigmas_type == FinalSigmasType::Zero;
        sigmas.push(if final_zero { 0.0 } else { min });
        // diffusers switches lower_order_final on for uneven step counts and a zero end.
        let mut lower_order_final = config.lower_order_final.unwrap_or(true);
        if !lower_order_final && (!steps.is_multiple_of(order) || final_zero) {
            lower_order_final = true;
        }
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| f64::from(s as f32)).collect(),
            prediction_type: config.prediction_type,
            algorithm,
            solver_type,
            order_list: order_list(steps, order, lower_order_final, final_zero),
            model_outputs: (0..order).map(|_| None).collect(),
            group_sample: None,
        })
    }

    fn output(&self, k: usize) -> Option<&Tensor> {
        let n = self.model_outputs.len();
        self.model_outputs.get(n.checked_sub(k)?)?.as_ref()
    }

    fn update(
        &self,
        x: &Tensor,
        index: usize,
        order: usize,
        noise: Option<&Tensor>,
    ) -> Option<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = lambda(self.sigmas[index + 1]);
        let sde = self.algorithm == Algorithm::SdeDpmSolverPlusPlus && noise.is_some();
        let heun = self.solver_type == SolverType::Heun;
        // The start of the group: sigma at index + 1 - order.
        let (_, sigma_s, lambda_s) = lambda(self.sigmas[index + 1 - order]);
        let h = lambda_t - lambda_s;
        let e = (-h).exp();
        let e2 = (-2.0 * h).exp();
        let noise_term = |t: Tensor| match (sde, noise) {
            (true, Some(n)) => t + n * (sigma_t * (1.0 - e2).sqrt()),
            _ => t,
        };
        let base = |d0: &Tensor| {
            if sde {
                x * (sigma_t / sigma_s * e) + d0 * (alpha_t * (1.0 - e2))
            } else {
                x * (sigma_t / sigma_s) - d0 * (alpha_t * (e - 1.0))
            }
        };
        let c1 = if sde {
            (1.0 - e2) / (-2.0 * h) + 1.0
        } else {
            (e - 1.0) / h + 1.0
        };
        Some(match order {
            1 => noise_term(base(self.output(1)?)),
            2 => {
                let (m0, m1) = (self.output(1)?, self.output(2)?);
                let (_, _, lambda_s0) = lambda(self.sigmas[index]);
                let r0 = (lambda_s0 - lambda_s) / h;
                let d1 = (m0 - m1) * (1.0 / r0);
                let t = if heun {
                    base(m1) + d1 * (alpha_t * c1)
                } else if sde {
                    base(m1) + d1 * (0.5 * alpha_t * (1.0 - e2))
                } else {
                    base(m1) - d1 * (0.5 * alpha_t * (e - 1.0))
                };
                noise_term(t)
            }
            _ => {
                let (m0, m1, m2) = (self.output(1)?, self.output(2)?, self.output(3)?);
                let (_, _, lambda_s0) = lambda(self.sigmas[index]);
                let (_, _, lambda_s1) = lambda(self.sigmas[index - 1]);
                let (r0, r1) = ((lambda_s0 - lambda_s) / h, (lambda_s1 - lambda_s) / h);
                let d1_0 = (m1 - m2) * (1.0 / r1);
                let d1_1 = (m0 - m2) * (1.0 / r0);
                let t = if heun {
                    let d1 = (&d1_0 * r0 - &d1_1 * r1) / (r0 - r1);
                    let d2 = (&d1_1 - &d1_0) * (2.0 / (r0 - r1));
                    let c2 = if sde {
                        (1.0 - e2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5
                    } else {
                        (e - 1.0 + h) / (h * h) - 0.5
                    };
                    let t = base(m2) + d1 * (alpha_t * c1);
                    if sde {
                        t + d2 * (alpha_t * c2)
                    } else {
                        t - d2 * (alpha_t * c2)
                    }
                } else {
                    base(m2) + d1_1 * (alpha_t * c1)
                };
                noise_term(t)
            }
        })
    }
}

impl Scheduler for DpmSinglestep {
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
        let model_output = model_output.to_kind(tch::Kind::Float);
        let converted = predict_x0_vp(
            self.prediction_type,
            &model_output,
            sample,
            self.sigmas[index],
        );
        self.model_outputs.rotate_left(1);
        if let Some(slot) = self.model_outputs.last_mut() {
            *slot = Some(converted);
        }
        let noise = (self.algorithm == Algorithm::SdeDpmSolverPlusPlus)
            .then(|| noise(&model_output.size()).to_device(model_output.device()));
        let mut order = self.order_list.get(index).copied().unwrap_or(1);
        while order > 1 && self.output(order).is_none() {
            order -= 1;
        }
        if order == 1 || self.group_sample.is_none() {
            self.group_sample = Some(sample.shallow_clone());
        }
        let start = self
            .group_sample
            .as_ref()
            .map(Tensor::shallow_clone)
            .unwrap_or_else(|| sample.shallow_clone());
        self.update(&start, index, order, noise.as_ref())
            .unwrap_or_else(|| sample.shallow_clone())
    }

    fn is_stochastic(&self) -> bool {
        self.algorithm == Algorithm::SdeDpmSolverPlusPlus
    }
}
