//! Sigma schedules shared by the k-diffusion style schedulers (Euler, Euler ancestral,
//! Heun, KDPM2, KDPM2 ancestral, LMS), as diffusers computes them: interpolated training
//! sigmas, optionally respaced as Karras, exponential or beta schedules.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::schedulers::{interp, spaced_timesteps, SchedulerConfig};

/// How sigmas are respaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigmaSpacing {
    /// Interpolated training sigmas at the spaced timesteps.
    #[default]
    Default,
    /// Karras et al. (2022), rho = 7.
    Karras,
    /// Log-linear between the extremes.
    Exponential,
    /// Quantiles of Beta(0.6, 0.6) (arXiv:2407.12173).
    Beta,
}

/// The training noise levels.
pub struct TrainingSigmas {
    /// sqrt((1 - alphas_cumprod) / alphas_cumprod), float32 as diffusers holds them.
    pub sigmas: Vec<f32>,
    /// Their logarithms (float32).
    pub log_sigmas: Vec<f32>,
}

impl TrainingSigmas {
    /// The training sigmas of `config`.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let mut cumprod = config.alphas_cumprod()?;
        if config.rescale_betas_zero_snr {
            // Close to 0 without being 0, so the first sigma is finite (diffusers' sigma
            // schedulers; DDIM, LCM and TCD keep the 0).
            if let Some(last) = cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let ac = Tensor::from_slice(&cumprod);
        let sigmas: Vec<f32> = Vec::try_from(((-&ac + 1.0) / &ac).pow_tensor_scalar(0.5))?;
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Ok(Self { sigmas, log_sigmas })
    }

    /// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigma = sigma.max(1e-10).ln();
        let logs = &self.log_sigmas;
        let n = logs.len();
        if n < 2 {
            return 0.0;
        }
        // Index of the last training log-sigma not above log_sigma (0 if none).
        let count = logs
            .iter()
            .filter(|&&l| log_sigma - f64::from(l) >= 0.0)
            .count();
        let low_idx = count.saturating_sub(1).min(n - 2);
        let high_idx = low_idx + 1;
        let (low, high) = (f64::from(logs[low_idx]), f64::from(logs[high_idx]));
        let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
        (1.0 - w) * low_idx as f64 + w * high_idx as f64
    }
}

/// Timesteps and sigmas (without the final one) for `steps` steps.
pub struct SigmaSchedule {
    /// UNet timesteps (float64 here; diffusers stores float32).
    pub timesteps: Vec<f64>,
    /// One sigma per timestep.
    pub sigmas: Vec<f64>,
}

/// The schedule of `config` for `steps` steps. `round_respaced` rounds the timesteps of a
/// Karras schedule (KDPM2 does; Euler does not).
/// `use_config_bounds` takes `sigma_min`/`sigma_max` from the config where set (Euler has
/// them; the other schedulers do not).
pub fn schedule(
    config: &SchedulerConfig,
    training: &TrainingSigmas,
    steps: usize,
    round_karras: bool,
    use_config_bounds: bool,
) -> SigmaSchedule {
    let spacing = config.sigma_spacing();
    let timesteps = spaced_timesteps(config, steps);
    let sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| interp(t, &training.sigmas))
        .collect();
    let mut sigma_max = sigmas.first().copied().unwrap_or(1.0);
    let mut sigma_min = sigmas.last().copied().unwrap_or(1.0);
    if use_config_bounds {
        sigma_max = config.sigma_max.unwrap_or(sigma_max);
        sigma_min = config.sigma_min.unwrap_or(sigma_min);
    }
    let respaced = respaced(spacing, sigma_max, sigma_min, steps);
    match respaced {
        None => SigmaSchedule { timesteps, sigmas },
        Some(sigmas) => {
            let timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = training.sigma_to_t(s);
                    if round_karras && spacing == SigmaSpacing::Karras {
                        t.round_ties_even()
                    } else {
                        t
                    }
                })
                .collect();
            SigmaSchedule { timesteps, sigmas }
        }
    }
}

/// `count` sigmas from `max` down to `min` under a respacing (`None` for the default).
pub fn respaced(spacing: SigmaSpacing, max: f64, min: f64, count: usize) -> Option<Vec<f64>> {
    Some(match spacing {
        SigmaSpacing::Default => return None,
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
    })
}

/// The schedule of the VP solvers (DPM-Solver multistep and singlestep, UniPC): integer
/// timesteps from `spacing` over `steps + 1` points with the last dropped, sigmas
/// interpolated, or respaced between `max` and `min` with their timesteps recovered
/// (rounded for Karras when `round_karras`). Timesteps are truncated to integers, as
/// diffusers stores them in int64.
pub fn vp_schedule(
    config: &SchedulerConfig,
    training: &TrainingSigmas,
    steps: usize,
    spacing: crate::engine::schedulers::TimestepSpacing,
    (max, min): (f64, f64),
    round_karras: bool,
) -> SigmaSchedule {
    use crate::engine::schedulers::TimestepSpacing;
    let train = config.num_train_timesteps;
    let n = steps as i64;
    let timesteps: Vec<f64> = match spacing {
        _ if config.timesteps.is_some() => {
            crate::engine::schedulers::spaced_timesteps(config, steps)
        }
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
    let sigma_spacing = config.sigma_spacing();
    match respaced(sigma_spacing, max, min, timesteps.len()) {
        None => SigmaSchedule {
            sigmas: timesteps
                .iter()
                .map(|&t| interp(t, &training.sigmas))
                .collect(),
            timesteps,
        },
        Some(sigmas) => SigmaSchedule {
            timesteps: sigmas
                .iter()
                .map(|&s| {
                    let t = training.sigma_to_t(s);
                    if round_karras && sigma_spacing == SigmaSpacing::Karras {
                        t.round_ties_even()
                    } else {
                        t
                    }
                    .trunc()
                })
                .collect(),
            sigmas,
        },
    }
}

/// alpha_t, sigma_t and lambda_t = ln(alpha_t / sigma_t) of a k-diffusion sigma (VP form).
pub fn vp_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

/// The data prediction x0 of the VP solvers at k-diffusion sigma `sigma`.
pub fn predict_x0_vp(
    prediction: crate::engine::schedulers::PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Tensor {
    use crate::engine::schedulers::PredictionType;
    let (alpha, sigma_t, _) = vp_lambda(sigma);
    match prediction {
        PredictionType::Epsilon => (sample - model_output * sigma_t) / alpha,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample * alpha - model_output * sigma_t,
    }
}

/// numpy's `linspace(start, stop, n)`.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        stop
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}

/// ln Γ(x) (Lanczos approximation, |error| < 1e-14 for x > 0).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(x: f64, a: f64, b: f64) -> f64 {
    let tiny = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 + aa * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularised incomplete beta function I_x(a, b).
fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(x, a, b) / a
    } else {
        1.0 - front * beta_cf(1.0 - x, b, a) / b
    }
}

/// The quantile function of Beta(a, b) (scipy.stats.beta.ppf), by bisection.
pub fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if beta_cdf(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-16 {
            break;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles_match_scipy() {
        // scipy.stats.beta.ppf(q, 0.6, 0.6)
        assert!((beta_ppf(0.5, 0.6, 0.6) - 0.5).abs() < 1e-12);
        assert!(
            (beta_ppf(0.1, 0.6, 0.6) - 0.039_584_405_588_780_85).abs() < 1e-9,
            "{}",
            beta_ppf(0.1, 0.6, 0.6)
        );
        assert!((beta_ppf(0.9, 0.6, 0.6) - 0.960_415_594_411_219_2).abs() < 1e-9);
    }

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(3.0, 1.0, 1), vec![3.0]);
    }
}
