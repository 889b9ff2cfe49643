//! `UniPCMultistepScheduler` (diffusers `schedulers/scheduling_unipc_multistep.py`): the
//! unified predictor-corrector (UniPC) in its data-prediction form, B(h) = bh1 or bh2.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::sigmas::{beta_ppf, linspace, SigmaSpacing, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_vp, interp, FinalSigmasType, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
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

fn lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

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
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            "bh1" => false,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "solver_type `{other}` is not supported by UniPC (bh1, bh2)"
                )))
            }
        };
        let order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return Err(EngineError::InvalidRequest(
                "solver_order must be 1, 2 or 3".into(),
            ));
        }
        let training = TrainingSigmas::new(config)?;
        let train = config.num_train_timesteps;
        let n = steps as i64;
        let mut timesteps: Vec<f64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = linspace(0.0, (train - 1) as f64, steps + 1)
                    .into_iter()
                    .map(|x| x.round_ties_even())
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = train / (n + 1);
                let mut v: Vec<f64> = (0..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / n as f64;
                let len = (train as f64 / ratio).ceil() as i64;
                (0..len)
                    .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
        };
        let table: Vec<f64> = training.sigmas.iter().map(|&s| f64::from(s)).collect();
        let max = config
            .sigma_max
            .unwrap_or_else(|| table.last().copied().unwrap_or(1.0));
        let min = config
            .sigma_min
            .unwrap_or_else(|| table.first().copied().unwrap_or(1.0));
        let count = timesteps.len();
        let spacing = config.sigma_spacing();
        let mut sigmas: Vec<f64> = match spacing {
            SigmaSpacing::Default => timesteps
                .iter()
                .map(|&t| interp(t, &training.sigmas))
                .collect(),
            SigmaSpacing::Karras => {
                let rho = 7.0;
                let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
                linspace(0.0, 1.0, count)
                    .into_iter()
                    .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                    .collect()
            }
            SigmaSpacing::Exponential => linspace(max.ln(), min.ln(), count)
                .into_iter()
                .map(f64::exp)
                .collect(),
            SigmaSpacing::Beta => linspace(0.0, 1.0, count)
                .into_iter()
                .map(|t| min + beta_ppf(1.0 - t, 0.6, 0.6) * (max - min))
                .collect(),
        };
        if spacing != SigmaSpacing::Default {
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = training.sigma_to_t(s);
                    if spacing == SigmaSpacing::Karras {
                        t.round_ties_even()
                    } else {
                        t
                    }
                })
                .collect();
        }
        let last = match (config.final_sigmas_type, spacing) {
            (FinalSigmasType::Zero, _) => 0.0,
            (FinalSigmasType::SigmaMin, SigmaSpacing::Default) => {
                table.first().copied().unwrap_or(0.0)
            }
            (FinalSigmasType::SigmaMin, _) => sigmas.last().copied().unwrap_or(0.0),
        };
        sigmas.push(last);
        Ok(Self {
            timesteps: timesteps.into_iter().map(|t| t.trunc()).collect(),
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
        _noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        let sigma = self.sigmas[index];
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha;
        let converted = match self.prediction_type {
            PredictionType::Epsilon => (sample - &model_output * sigma_t) / alpha,
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => sample * alpha - &model_output * sigma_t,
        };
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
