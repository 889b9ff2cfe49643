//! `UniPCMultistepScheduler` (diffusers `schedulers/scheduling_unipc_multistep.py`): the
//! unified predictor-corrector (UniPC) in its data-prediction form, B(h) = bh1 or bh2.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::sigmas::{predict_x0_vp, vp_schedule, SigmaSpacing, TrainingSigmas};
use crate::engine::schedulers::solver::UNIPC_BH2_ALIASES;
use crate::engine::schedulers::{
    add_noise_vp, FinalSigmasType, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
};

/// UniPC sampling.
pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    bh2: bool,
    order: usize,
    lower_order_final: bool,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
}

use crate::engine::schedulers::sigmas::vp_lambda as lambda;

/// Solves the small dense system `a x = b` (Gaussian elimination, partial pivoting).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (value, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *value -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// The R matrix and b vector of UniPC for `order` with ratios `rks` (last one 1).
fn system(rks: &[f64], hh: f64, b_h: f64, order: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
    let h_phi_1 = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let mut r = Vec::with_capacity(order);
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (r, b)
}

impl UniPc {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let bh2 = match config.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => false,
            name if name == "bh2" || UNIPC_BH2_ALIASES.contains(&name) => true,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "`solver_type` `{other}` is not supported by UniPC (bh1, bh2)"
                )))
            }
        };
        let order = config.order().map_err(EngineError::InvalidRequest)?;
        let training = TrainingSigmas::new(config)?;
        let table = &training.sigmas;
        let max = config
            .sigma_max
            .unwrap_or_else(|| table.last().copied().map_or(1.0, f64::from));
        let min = config
            .sigma_min
            .unwrap_or_else(|| table.first().copied().map_or(1.0, f64::from));
        let spacing = config.sigma_spacing();
        let schedule = vp_schedule(
            config,
            &training,
            steps,
            config.timestep_spacing,
            (max, min),
            true,
        );
        let timesteps = schedule.timesteps;
        let mut sigmas = schedule.sigmas;
        let last = match (config.final_sigmas_type, spacing) {
            (FinalSigmasType::Zero, _) => 0.0,
            (FinalSigmasType::SigmaMin, SigmaSpacing::Default) => {
                table.first().copied().map_or(0.0, f64::from)
            }
            (FinalSigmasType::SigmaMin, _) => sigmas.last().copied().unwrap_or(0.0),
        };
        sigmas.push(last);
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| f64::from(s as f32)).collect(),
            prediction_type: config.prediction_type,
            bh2,
            order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            model_outputs: (0..order).map(|_| None).collect(),
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
        })
    }

    /// The k-th most recent converted output (1 = newest).
    fn output(&self, k: usize) -> &Tensor {
        self.model_outputs[self.order - k]
            .as_ref()
            .expect("UniPC's history holds enough outputs at this order")
    }

    fn b_h(&self, hh: f64) -> f64 {
        if self.bh2 {
            hh.exp_m1()
        } else {
            hh
        }
    }

    /// The predictor: from `x` at sigmas[index] to sigmas[index + 1].
    fn predict(&self, x: &Tensor, index: usize, order: usize) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = lambda(self.sigmas[index + 1]);
        let (_, sigma_s0, lambda_s0) = lambda(self.sigmas[index]);
        let h = lambda_t - lambda_s0;
        let m0 = self.output(1);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let (_, _, lambda_si) = lambda(self.sigmas[index - i]);
            let rk = (lambda_si - lambda_s0) / h;
            rks.push(rk);
            d1s.push((self.output(i + 1) - m0) / rk);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = self.b_h(hh);
        let mut x_t = x * (sigma_t / sigma_s0) - m0 * (alpha_t * h_phi_1);
        if !d1s.is_empty() {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let (r, b) = system(&rks, hh, b_h, order);
                let r: Vec<Vec<f64>> = r[..order - 1]
                    .iter()
                    .map(|row| row[..order - 1].to_vec())
                    .collect();
                solve(r, b[..order - 1].to_vec())
            };
            for (rho, d) in rhos.iter().zip(&d1s) {
                x_t -= d * (alpha_t * b_h * rho);
            }
        }
        x_t
    }

    /// The corrector: refines `this_sample` (at sigmas[index]) with the new model output.
    fn correct(
        &self,
        this_output: &Tensor,
        last_sample: &Tensor,
        index: usize,
        order: usize,
    ) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = lambda(self.sigmas[index]);
        let (_, sigma_s0, lambda_s0) = lambda(self.sigmas[index - 1]);
        let h = lambda_t - lambda_s0;
        let m0 = self.output(1);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let (_, _, lambda_si) = lambda(self.sigmas[index - (i + 1)]);
            let rk = (lambda_si - lambda_s0) / h;
            rks.push(rk);
            d1s.push((self.output(i + 1) - m0) / rk);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = self.b_h(hh);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            let (r, b) = system(&rks, hh, b_h, order);
            solve(r, b)
        };
        let mut x_t = last_sample * (sigma_t / sigma_s0) - m0 * (alpha_t * h_phi_1);
        for (rho, d) in rhos.iter().zip(&d1s) {
            x_t -= d * (alpha_t * b_h * rho);
        }
        let rho_last = rhos.last().copied().unwrap_or(0.5);
        x_t - (this_output - m0) * (alpha_t * b_h * rho_last)
    }
}

impl Scheduler for UniPc {
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
        _noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        let converted = predict_x0_vp(
            self.prediction_type,
            &model_output,
            sample,
            self.sigmas[index],
        );
        let sample = match (&self.last_sample, index > 0) {
            (Some(last), true) => self.correct(&converted, last, index, self.this_order),
            _ => sample.shallow_clone(),
        };
        self.model_outputs.rotate_left(1);
        if let Some(slot) = self.model_outputs.last_mut() {
            *slot = Some(converted);
        }
        let n = self.timesteps.len();
        let this_order = if self.lower_order_final {
            self.order.min(n - index)
        } else {
            self.order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, index, self.this_order);
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        prev
    }
}
