//! `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler` (diffusers
//! `schedulers/scheduling_k_dpm_2_discrete.py`, `..._ancestral_discrete.py`): DPM-Solver-2
//! from k-diffusion. Each step evaluates the UNet at sigma and at the geometric midpoint
//! towards the next sigma; the ancestral variant adds noise after the second half.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::heun::interleave;
use crate::engine::schedulers::sigmas::{schedule, TrainingSigmas};
use crate::engine::schedulers::{
    add_noise_sigma, init_noise_sigma, predict_original, scale_by_sigma, NoiseSource,
    PredictionType, Scheduler, SchedulerConfig,
};

/// KDPM2 (optionally ancestral) sampling.
pub struct Kdpm2 {
    ancestral: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
    /// The sample before the first half, while the second half is due.
    pending: Option<Tensor>,
}

/// `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`.
fn interleave_ends(values: &[f32]) -> Vec<f32> {
    let mut out = interleave(values);
    if let Some(last) = values.last() {
        out.push(*last);
    }
    out
}

/// exp(lerp(ln a, ln b, 0.5)) in float32 with torch's lerp formula for weights >= 0.5
/// (`end - (end - start) * (1 - weight)`): 0 when a is 0, NaN when only b is (diffusers
/// never reads that entry).
fn log_midpoint(a: f32, b: f32) -> f32 {
    let (la, lb) = (a.ln(), b.ln());
    (lb - (lb - la) * 0.5).exp()
}

impl Kdpm2 {
    /// `set_timesteps(steps)` of a scheduler built from `config`.
    pub fn new(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
        let training = TrainingSigmas::new(config)?;
        let s = schedule(config, &training, steps, true, false);
        let mut sigmas: Vec<f32> = s.sigmas.iter().map(|&v| v as f32).collect();
        sigmas.push(0.0);
        let n = sigmas.len();
        let timesteps: Vec<f64> = s.timesteps.iter().map(|&t| t as f32 as f64).collect();

        let (interpol, up, down) = if ancestral {
            let next: Vec<f32> = (0..n)
                .map(|i| if i + 1 < n { sigmas[i + 1] } else { 0.0 })
                .collect();
            let up: Vec<f32> = (0..n)
                .map(|i| {
                    let (s, sn) = (sigmas[i], next[i]);
                    (sn * sn * (s * s - sn * sn) / (s * s)).sqrt()
                })
                .collect();
            let mut down: Vec<f32> = (0..n)
                .map(|i| (next[i] * next[i] - up[i] * up[i]).sqrt())
                .collect();
            down[n - 1] = 0.0;
            let mut interpol: Vec<f32> = (0..n).map(|i| log_midpoint(sigmas[i], down[i])).collect();
            for v in interpol.iter_mut().skip(n.saturating_sub(2)) {
                *v = 0.0;
            }
            (interpol, up, down)
        } else {
            // sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
            let interpol: Vec<f32> = (0..n)
                .map(|i| log_midpoint(sigmas[i], sigmas[(i + n - 1) % n]))
                .collect();
            (interpol, vec![0.0; n], vec![0.0; n])
        };
        let timesteps_interpol: Vec<f64> = interpol
            .iter()
            .map(|&s| training.sigma_to_t(f64::from(s)) as f32 as f64)
            .collect();
        // Calls: t0, then (interpolated, next) pairs.
        let mut calls = vec![timesteps[0]];
        let offset = if ancestral { 0 } else { 1 };
        for k in 1..timesteps.len() {
            calls.push(timesteps_interpol[k - 1 + offset]);
            calls.push(timesteps[k]);
        }
        let sigmas_i = interleave_ends(&sigmas);
        let max_sigma = sigmas_i.iter().copied().fold(f32::MIN, f32::max);
        Ok(Self {
            ancestral,
            timesteps: calls,
            sigmas: sigmas_i,
            sigmas_interpol: interleave_ends(&interpol),
            sigmas_up: interleave_ends(&up),
            sigmas_down: interleave_ends(&down),
            init_noise_sigma: init_noise_sigma(config.timestep_spacing, max_sigma.into()),
            prediction_type: config.prediction_type,
            pending: None,
        })
    }
}

impl Scheduler for Kdpm2 {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor {
        add_noise_sigma(original, noise, f64::from(self.sigmas[index]))
    }

    fn order(&self) -> usize {
        2
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Tensor {
        let sigma = match (&self.pending, self.ancestral) {
            (None, _) => self.sigmas[index],
            (Some(_), false) => self.sigmas_interpol[index],
            (Some(_), true) => self.sigmas_interpol[index - 1],
        };
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Tensor {
        let model_output = model_output.to_kind(tch::Kind::Float);
        match self.pending.take() {
            None => {
                let sigma = f64::from(self.sigmas[index]);
                let sigma_interpol = if self.ancestral {
                    f64::from(self.sigmas_interpol[index])
                } else {
                    f64::from(self.sigmas_interpol[index + 1])
                };
                let pred = predict_original(self.prediction_type, &model_output, sample, sigma);
                let derivative = (sample - pred) / sigma;
                let dt = sigma_interpol - sigma;
                self.pending = Some(sample.shallow_clone());
                sample + derivative * dt
            }
            Some(first_sample) => {
                let sigma = f64::from(self.sigmas[index - 1]);
                let (sigma_interpol, target) = if self.ancestral {
                    (
                        f64::from(self.sigmas_interpol[index - 1]),
                        f64::from(self.sigmas_down[index - 1]),
                    )
                } else {
                    (
                        f64::from(self.sigmas_interpol[index]),
                        f64::from(self.sigmas[index]),
                    )
                };
                let pred =
                    predict_original(self.prediction_type, &model_output, sample, sigma_interpol);
                let derivative = (sample - pred) / sigma_interpol;
                let prev = first_sample + derivative * (target - sigma);
                if self.ancestral {
                    let up = f64::from(self.sigmas_up[index - 1]);
                    let noise = noise(&model_output.size()).to_device(model_output.device());
                    prev + noise * up
                } else {
                    prev
                }
            }
        }
    }

    fn completes_step(&self, index: usize) -> bool {
        self.pending.is_none() || index + 1 == self.timesteps.len()
    }

    fn is_stochastic(&self) -> bool {
        self.ancestral
    }
}
