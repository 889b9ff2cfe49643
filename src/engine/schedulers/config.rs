//! A scheduler's configuration as diffusers writes it (`scheduler_config.json`), with
//! diffusers' defaults, and the noise schedule it implies.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::engine::config_check::{read_config, CheckedConfig, ConfigCheck};
use crate::engine::error::{EngineError, Result};
use crate::engine::schedulers::solver::{
    AlgorithmType, SolverType, SOLVER_ORDERS, UNIPC_BH2_ALIASES,
};
use crate::engine::schedulers::{ddim, lcm, sigmas};
use crate::engine::schedulers::{
    BetaSchedule, FinalSigmasType, PredictionType, SchedulerKind, TimestepSpacing,
};

/// The diffusers config keys sdxld reads (and accepts as overrides).
pub const CONFIG_KEYS: [&str; 30] = [
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "eta",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "final_sigmas_type",
    "rescale_betas_zero_snr",
    "timestep_type",
    "sigma_min",
    "sigma_max",
    "original_inference_steps",
    "timestep_scaling",
    "timesteps",
    "sigmas",
];

/// Mirrors a diffusers scheduler config; defaults are diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the config.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training timesteps.
    #[serde(default = "thousand")]
    pub num_train_timesteps: i64,
    /// First beta.
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    /// Beta schedule.
    #[serde(default = "beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit betas (rare).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts.
    #[serde(default = "prediction_type")]
    pub prediction_type: PredictionType,
    /// Timestep placement.
    #[serde(default = "timestep_spacing")]
    pub timestep_spacing: TimestepSpacing,
    /// Added to leading timesteps.
    #[serde(default)]
    pub steps_offset: i64,
    /// Sigma interpolation (`linear` only).
    #[serde(default)]
    pub interpolation_type: Option<String>,
    /// Karras sigmas.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// Exponential sigmas.
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    /// Beta sigmas.
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// Final sigma.
    #[serde(default = "final_sigmas_type")]
    pub final_sigmas_type: FinalSigmasType,
    /// Rescale betas to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// `discrete` only.
    #[serde(default)]
    pub timestep_type: Option<String>,
    /// Smallest sigma of respaced schedules (Euler); the schedule's own when absent.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    /// Largest sigma of respaced schedules (Euler); the schedule's own when absent.
    #[serde(default)]
    pub sigma_max: Option<f64>,
    /// Clip the predicted clean sample (DDIM; its default is true).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// The clipping range (default 1).
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    /// DDIM: the final alpha is 1 (its default) rather than the first training alpha.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM's eta (a call argument in diffusers, carried here per request; default 0).
    #[serde(default)]
    pub eta: Option<f64>,
    /// Multistep order (DPM-Solver, UniPC; default 2).
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// dpmsolver++ (default) or sde-dpmsolver++.
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// midpoint (default) or heun.
    #[serde(default)]
    pub solver_type: Option<String>,
    /// Lower-order steps at the end of short schedules (default true).
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    /// A first-order last step (default false).
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    /// The distillation schedule's steps (LCM, TCD; default 50).
    #[serde(default)]
    pub original_inference_steps: Option<i64>,
    /// The consistency boundary condition's timestep scale (LCM; default 10).
    #[serde(default)]
    pub timestep_scaling: Option<f64>,
    /// Custom inference timesteps, decreasing (`set_timesteps(timesteps=...)`, a call
    /// argument in diffusers, carried here per request), in place of the spacing's.
    #[serde(default)]
    pub timesteps: Option<Vec<i64>>,
    /// Custom sigmas, decreasing, the final one included (`set_timesteps(sigmas=...)`,
    /// Euler's; carried here per request), in place of the schedule's.
    #[serde(default)]
    pub sigmas: Option<Vec<f64>>,
}

fn thousand() -> i64 {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn prediction_type() -> PredictionType {
    PredictionType::Epsilon
}
fn timestep_spacing() -> TimestepSpacing {
    TimestepSpacing::Linspace
}
fn final_sigmas_type() -> FinalSigmasType {
    FinalSigmasType::Zero
}

impl SchedulerConfig {
    /// stabilityai/stable-diffusion-xl-base-1.0's `scheduler/scheduler_config.json`.
    pub fn sdxl_base() -> Self {
        Self {
            class_name: Some("EulerDiscreteScheduler".into()),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            interpolation_type: Some("linear".into()),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            timestep_type: None,
            sigma_min: None,
            sigma_max: None,
            clip_sample: Some(false),
            clip_sample_range: None,
            set_alpha_to_one: Some(false),
            eta: None,
            solver_order: None,
            algorithm_type: None,
            solver_type: None,
            lower_order_final: None,
            euler_at_final: None,
            original_inference_steps: None,
            timestep_scaling: None,
            timesteps: None,
            sigmas: None,
        }
    }

    /// Reads a `scheduler_config.json` and checks its values.
    pub fn load(path: &Path) -> Result<Self> {
        read_config(path)
    }

    /// The multistep solvers' order (2 when the config names none).
    pub fn order(&self) -> std::result::Result<usize, String> {
        let order = self.solver_order.unwrap_or(2);
        if SOLVER_ORDERS.contains(&order) {
            Ok(order)
        } else {
            Err(format!("`solver_order` is {order}; it must be 1, 2 or 3"))
        }
    }

    /// DPM-Solver's algorithm (dpmsolver++ when the config names none).
    pub fn algorithm(&self) -> std::result::Result<AlgorithmType, String> {
        let name = self.algorithm_type.as_deref().unwrap_or("dpmsolver++");
        AlgorithmType::from_name(name).ok_or_else(|| {
            format!("`algorithm_type` `{name}` is not supported (dpmsolver++, sde-dpmsolver++)")
        })
    }

    /// The algorithm this config names.
    pub fn kind(&self) -> std::result::Result<SchedulerKind, String> {
        match &self.class_name {
            None => Ok(SchedulerKind::Euler),
            Some(name) => SchedulerKind::from_class_name(name)
                .ok_or_else(|| format!("scheduler `{name}` is not supported")),
        }
    }

    /// The sigma respacing the config asks for.
    pub fn sigma_spacing(&self) -> sigmas::SigmaSpacing {
        if self.use_karras_sigmas == Some(true) {
            sigmas::SigmaSpacing::Karras
        } else if self.use_exponential_sigmas == Some(true) {
            sigmas::SigmaSpacing::Exponential
        } else if self.use_beta_sigmas == Some(true) {
            sigmas::SigmaSpacing::Beta
        } else {
            sigmas::SigmaSpacing::Default
        }
    }

    /// Sets the sigma respacing.
    pub fn set_sigma_spacing(&mut self, spacing: sigmas::SigmaSpacing) {
        self.use_karras_sigmas = Some(spacing == sigmas::SigmaSpacing::Karras);
        self.use_exponential_sigmas = Some(spacing == sigmas::SigmaSpacing::Exponential);
        self.use_beta_sigmas = Some(spacing == sigmas::SigmaSpacing::Beta);
    }

    /// The training betas, as diffusers computes them (float32).
    pub fn betas(&self) -> Result<Tensor> {
        let n = self.num_train_timesteps;
        let betas = if let Some(trained) = &self.trained_betas {
            Tensor::from_slice(trained).to_kind(Kind::Float)
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => Tensor::linspace(
                    self.beta_start,
                    self.beta_end,
                    n,
                    (Kind::Float, tch::Device::Cpu),
                ),
                BetaSchedule::ScaledLinear => Tensor::linspace(
                    self.beta_start.sqrt(),
                    self.beta_end.sqrt(),
                    n,
                    (Kind::Float, tch::Device::Cpu),
                )
                .pow_tensor_scalar(2),
                BetaSchedule::SquaredcosCapV2 => {
                    let alpha_bar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    let betas: Vec<f64> = (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                        })
                        .collect();
                    Tensor::from_slice(&betas).to_kind(Kind::Float)
                }
            }
        };
        Ok(if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        })
    }

    /// Cumulative products of the alphas (float32), as diffusers computes them (the last
    /// is 0 under zero-SNR betas; the sigma schedulers replace it, see `TrainingSigmas`).
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let alphas = -self.betas()? + 1.0;
        Ok(Vec::try_from(alphas.cumprod(0, Kind::Float))?)
    }
}

impl SchedulerConfig {
    /// The range the scheduler clamps its clean-image prediction to (`clip_sample`, whose
    /// default differs between schedulers: `on_by_default`); `None` when it does not.
    pub fn clip_range(&self, on_by_default: bool) -> Option<f64> {
        self.clip_sample
            .unwrap_or(on_by_default)
            .then_some(self.clip_sample_range.unwrap_or(1.0))
    }

    /// Whether a step at timestep `t` leaves the clean image undefined: zero-SNR betas
    /// make the last training timestep's `alphas_cumprod` 0, and DDIM, LCM and TCD divide
    /// an epsilon prediction by its root there; unless the scheduler then clamps it
    /// (`clip_sample`; TCD never does), the image comes out NaN, in diffusers too. The
    /// sigma schedulers replace that 0 by 2^-24, and a v- or sample prediction needs no
    /// division.
    pub fn clean_image_undefined_at(&self, t: f64) -> bool {
        let unclamped = match self.kind() {
            Ok(SchedulerKind::Ddim) => self.clip_range(ddim::CLIPS_BY_DEFAULT).is_none(),
            Ok(SchedulerKind::Lcm) => self.clip_range(lcm::CLIPS_BY_DEFAULT).is_none(),
            Ok(SchedulerKind::Tcd) => true,
            _ => false,
        };
        if !unclamped || self.prediction_type != PredictionType::Epsilon {
            return false;
        }
        let Ok(alphas_cumprod) = self.alphas_cumprod() else {
            return false;
        };
        let index = t.round().max(0.0) as usize;
        alphas_cumprod.get(index).is_some_and(|&a| a == 0.0)
    }
}

/// The most training timesteps a config may name (1000 for SDXL): the schedule's tables
/// are this long.
const MAX_TRAIN_TIMESTEPS: i64 = 100_000;

impl SchedulerConfig {
    fn check_betas(&self, check: &mut ConfigCheck) {
        let beta = |check: &mut ConfigCheck, key: &str, value: f64| {
            if !(0.0..1.0).contains(&value) {
                check.problem(key, format_args!("is {value}; a beta lies in [0, 1)"));
            }
        };
        beta(check, "beta_start", self.beta_start);
        beta(check, "beta_end", self.beta_end);
        if let Some(trained) = &self.trained_betas {
            let steps = self.num_train_timesteps.max(0) as usize;
            check.length("trained_betas", trained.len(), steps, "num_train_timesteps");
            if let Some(&bad) = trained.iter().find(|b| !(0.0..1.0).contains(*b)) {
                beta(check, "trained_betas", bad);
            }
        }
    }
}

impl CheckedConfig for SchedulerConfig {
    fn check(&self, check: &mut ConfigCheck) {
        if let Err(message) = self.kind() {
            check.problem("_class_name", message);
        }
        let steps = self.num_train_timesteps;
        if !(1..=MAX_TRAIN_TIMESTEPS).contains(&steps) {
            check.problem(
                "num_train_timesteps",
                format_args!("is {steps}; it must lie in 1..={MAX_TRAIN_TIMESTEPS}"),
            );
        }
        self.check_betas(check);
        check.not_negative("steps_offset", self.steps_offset);
        for (key, value) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            value.inspect(|&v| check.positive_number(key, v));
        }
        if let Some(range) = self.clip_sample_range {
            check.positive_number("clip_sample_range", range);
        }
        if let Some(original) = self.original_inference_steps {
            if !(1..=steps).contains(&original) {
                check.problem(
                    "original_inference_steps",
                    format_args!("is {original}; it must lie in 1..={steps} (num_train_timesteps)"),
                );
            }
        }
        if let Some(scaling) = self.timestep_scaling {
            check.positive_number("timestep_scaling", scaling);
        }
        if let Some(eta) = self.eta.filter(|e| !(e.is_finite() && *e >= 0.0)) {
            check.problem(
                "eta",
                format_args!("is {eta}; it must be a finite number ≥ 0"),
            );
        }
        if let Err(message) = self.order() {
            check.message(message);
        }
        if let Err(message) = self.algorithm() {
            check.message(message);
        }
        let known_solver =
            |s: &str| SolverType::from_name(s).is_some() || UNIPC_BH2_ALIASES.contains(&s);
        if let Some(solver) = self.solver_type.as_deref().filter(|s| !known_solver(s)) {
            check.problem(
                "solver_type",
                format_args!("{solver:?} is not a solver type sdxld knows"),
            );
        }
        if let Some(interpolation) = &self.interpolation_type {
            check.one_of("interpolation_type", interpolation, &["linear"]);
        }
        if let Some(timestep_type) = &self.timestep_type {
            check.one_of("timestep_type", timestep_type, &["discrete"]);
        }
    }
}

/// Rescales betas to zero terminal SNR (Algorithm 1 of arXiv:2305.08891).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas = -betas + 1.0;
    let mut sqrt_bar = alphas.cumprod(0, Kind::Float).sqrt();
    let first = sqrt_bar.get(0).copy();
    let last = sqrt_bar.get(-1).copy();
    sqrt_bar -= &last;
    sqrt_bar *= &first / (&first - &last);
    let bar = sqrt_bar.pow_tensor_scalar(2);
    let n = bar.size()[0];
    let ratios = bar.narrow(0, 1, n - 1) / bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[bar.narrow(0, 0, 1), ratios], 0);
    -alphas + 1.0
}

/// Request-level changes to the model's scheduler configuration: another scheduler
/// class and diffusers config keys, as `XScheduler.from_config(config, **keys)` applies
/// them (keys the model's config shares with the new class carry over).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOverrides {
    /// Another scheduler class.
    pub class: Option<SchedulerKind>,
    /// diffusers config keys and their values.
    pub keys: std::collections::BTreeMap<String, serde_json::Value>,
}

impl SchedulerOverrides {
    /// Sets a diffusers config key.
    pub fn set(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.keys.insert(key.to_string(), value.into());
    }

    /// The model's configuration with these overrides applied.
    pub fn apply(&self, base: &SchedulerConfig) -> Result<SchedulerConfig> {
        if self.class.is_none() && self.keys.is_empty() {
            return Ok(base.clone());
        }
        let invalid = |m: String| EngineError::InvalidRequest(m);
        let mut value = serde_json::to_value(base).map_err(|e| invalid(e.to_string()))?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| invalid("scheduler config is not an object".into()))?;
        if let Some(class) = self.class {
            map.insert("_class_name".into(), class.class_name().into());
        }
        for (key, v) in &self.keys {
            if !CONFIG_KEYS.contains(&key.as_str()) {
                return Err(invalid(format!("unknown scheduler config key `{key}`")));
            }
            map.insert(key.clone(), v.clone());
        }
        serde_json::from_value(value).map_err(|e| invalid(format!("scheduler config: {e}")))
    }
}
