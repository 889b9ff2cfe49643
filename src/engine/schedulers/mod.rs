//! Noise schedulers. A [`SchedulerConfig`] (data, read from a model's
//! `scheduler/scheduler_config.json` and overridden per request) builds a per-request
//! stateful [`Scheduler`]; nothing in a scheduler is global.

pub mod config;
pub mod ddim;
pub mod dpm_multistep;
pub mod dpm_singlestep;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod kdpm2;
pub mod lcm;
pub mod lms;
pub mod options;
pub mod sigmas;
pub mod solver;
pub mod tcd;
pub mod unipc;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::engine::error::{EngineError, Result};

pub use config::{SchedulerConfig, SchedulerOverrides, CONFIG_KEYS};
pub use options::{SchedulerOption, SchedulerOptions};

/// How betas grow over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Evenly spaced betas.
    Linear,
    /// Evenly spaced square roots of betas (Stable Diffusion).
    ScaledLinear,
    /// The Glide cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SDXL base).
    Epsilon,
    /// The velocity (v-prediction models).
    VPrediction,
    /// The clean sample.
    Sample,
}

/// How inference timesteps are placed over the training range (Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly spaced from 0 to the last training step.
    Linspace,
    /// Multiples of the step ratio, plus `steps_offset` (SDXL).
    Leading,
    /// Evenly spaced back from the last training step.
    Trailing,
}

/// The last sigma of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// End at sigma 0.
    Zero,
    /// End at the smallest training sigma.
    SigmaMin,
}

/// Which scheduler algorithm a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `HeunDiscreteScheduler`.
    Heun,
    /// `KDPM2DiscreteScheduler`.
    Kdpm2,
    /// `KDPM2AncestralDiscreteScheduler`.
    Kdpm2Ancestral,
    /// `LMSDiscreteScheduler`.
    Lms,
    /// `DDIMScheduler`.
    Ddim,
    /// `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
    /// `UniPCMultistepScheduler`.
    UniPc,
    /// `DPMSolverSinglestepScheduler`.
    DpmSolverSinglestep,
    /// `LCMScheduler`.
    Lcm,
    /// `TCDScheduler`.
    Tcd,
}

impl SchedulerKind {
    /// Every implemented scheduler.
    pub const ALL: [SchedulerKind; 12] = [
        SchedulerKind::DpmSolverSinglestep,
        SchedulerKind::UniPc,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Heun,
        SchedulerKind::Kdpm2,
        SchedulerKind::Kdpm2Ancestral,
        SchedulerKind::Lms,
        SchedulerKind::Ddim,
        SchedulerKind::Lcm,
        SchedulerKind::Tcd,
    ];

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Kdpm2 => "KDPM2DiscreteScheduler",
            SchedulerKind::Kdpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Tcd => "TCDScheduler",
        }
    }

    /// Parses a diffusers class name.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }

    /// The A1111 sampler name (without schedule suffix).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::Heun => "Heun",
            SchedulerKind::Kdpm2 => "DPM2",
            SchedulerKind::Kdpm2Ancestral => "DPM2 a",
            SchedulerKind::Lms => "LMS",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::DpmSolverMultistep => "DPM++ 2M",
            SchedulerKind::UniPc => "UniPC",
            SchedulerKind::DpmSolverSinglestep => "DPM++ SDE",
            SchedulerKind::Lcm => "LCM",
            SchedulerKind::Tcd => "TCD",
        }
    }
}

/// Draws standard normal noise of a shape, from the job's generator (invariant 2).
pub type NoiseSource<'a> = dyn FnMut(&[i64]) -> Tensor + 'a;

/// A stateful scheduler for one generation. The pipeline calls the UNet once per entry of
/// [`Scheduler::timesteps`] (second-order schedulers list some timesteps twice).
pub trait Scheduler: Send {
    /// The UNet timestep of each call.
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise (1 for the VP schedulers: DDIM,
    /// DPM-Solver, UniPC).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the UNet input of call `index` (unscaled for the VP schedulers).
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Tensor {
        let _ = index;
        sample.shallow_clone()
    }
    /// Advances `sample` given the model output of call `index`; stochastic schedulers
    /// draw from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Tensor;
    /// Whether call `index` completed a scheduler step (false for the first half of a
    /// second-order step). Progress counts completed steps.
    fn completes_step(&self, index: usize) -> bool {
        let _ = index;
        true
    }
    /// Whether `step` draws noise.
    fn is_stochastic(&self) -> bool {
        false
    }
    /// UNet calls per step (2 for Heun and KDPM2).
    fn order(&self) -> usize {
        1
    }
    /// Noises clean latents to the level of call `index` (image to image starts there).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Tensor;
}

/// `scale_model_input` of the k-diffusion sigma schedulers: x / sqrt(sigma^2 + 1), the
/// root taken in float32 as diffusers' sigma tensors do.
pub fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Tensor {
    sample / f64::from((sigma * sigma + 1.0).sqrt())
}

/// `add_noise` of the k-diffusion sigma schedulers: x + noise * sigma.
pub fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f64) -> Tensor {
    original + noise * sigma
}

/// `add_noise` of the VP schedulers (DPM-Solver, UniPC) at k-diffusion sigma `sigma`.
pub fn add_noise_vp(original: &Tensor, noise: &Tensor, sigma: f64) -> Tensor {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    original * alpha + noise * (sigma * alpha)
}

/// The clean-sample prediction from a model output at noise level `sigma` (k-diffusion
/// parameterisation), as the discrete sigma schedulers compute it.
pub fn predict_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Tensor {
    match prediction {
        PredictionType::Epsilon => sample - model_output * sigma,
        PredictionType::VPrediction => {
            let denom = sigma * sigma + 1.0;
            model_output * (-sigma / denom.sqrt()) + sample / denom
        }
        PredictionType::Sample => model_output.shallow_clone(),
    }
}

/// The clean-sample estimate of a VP model output at alpha `alpha_t` (DDIM, LCM, TCD),
/// the scalar factors in float32 as diffusers' 0-d float32 tensors give them.
pub fn predict_clean_vp(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
) -> Tensor {
    let (sqrt_alpha, sqrt_beta) = (f64::from(alpha_t.sqrt()), f64::from((1.0 - alpha_t).sqrt()));
    match prediction {
        PredictionType::Epsilon => (sample - model_output * sqrt_beta) / sqrt_alpha,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample * sqrt_alpha - model_output * sqrt_beta,
    }
}

/// The noise a VP model output at alpha `alpha_t` implies, given its (unclipped) clean
/// estimate `clean` (DDIM, TCD).
pub fn predict_noise_vp(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    clean: &Tensor,
    alpha_t: f32,
) -> Tensor {
    let (sqrt_alpha, sqrt_beta) = (f64::from(alpha_t.sqrt()), f64::from((1.0 - alpha_t).sqrt()));
    match prediction {
        PredictionType::Epsilon => model_output.shallow_clone(),
        PredictionType::Sample => (sample - clean * sqrt_alpha) / sqrt_beta,
        PredictionType::VPrediction => model_output * sqrt_alpha + sample * sqrt_beta,
    }
}

/// diffusers' `init_noise_sigma` of the sigma schedulers.
pub fn init_noise_sigma(spacing: TimestepSpacing, max_sigma: f64) -> f64 {
    let max_sigma = max_sigma as f32;
    (match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }) as f64
}

impl SchedulerKind {
    /// Whether its diffusers class's `set_timesteps` takes custom `timesteps`.
    pub fn takes_custom_timesteps(self) -> bool {
        matches!(
            self,
            SchedulerKind::Euler
                | SchedulerKind::Heun
                | SchedulerKind::DpmSolverMultistep
                | SchedulerKind::DpmSolverSinglestep
                | SchedulerKind::Lcm
                | SchedulerKind::Tcd
        )
    }

    /// Whether its diffusers class's `set_timesteps` takes custom `sigmas` (for a
    /// denoiser of SDXL's kind: UniPC takes them for flow-matching sigmas only).
    pub fn takes_custom_sigmas(self) -> bool {
        self == SchedulerKind::Euler
    }
}

impl SchedulerConfig {
    /// Builds a scheduler for `steps` inference steps.
    pub fn build(&self, steps: usize) -> Result<Box<dyn Scheduler>> {
        if steps == 0 {
            return Err(EngineError::InvalidRequest(
                "`steps` must be at least 1".into(),
            ));
        }
        let kind = self.kind().map_err(EngineError::InvalidRequest)?;
        if let Some(custom) = &self.timesteps {
            self.check_custom_timesteps(custom, steps)
                .map_err(EngineError::InvalidRequest)?;
        }
        Ok(match kind {
            SchedulerKind::Euler => Box::new(euler::EulerDiscrete::new(self, steps)?),
            SchedulerKind::EulerAncestral => {
                Box::new(euler_ancestral::EulerAncestral::new(self, steps)?)
            }
            SchedulerKind::Heun => Box::new(heun::Heun::new(self, steps)?),
            SchedulerKind::Kdpm2 => Box::new(kdpm2::Kdpm2::new(self, steps, false)?),
            SchedulerKind::Kdpm2Ancestral => Box::new(kdpm2::Kdpm2::new(self, steps, true)?),
            SchedulerKind::Lms => Box::new(lms::Lms::new(self, steps)?),
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(self, steps)?),
            SchedulerKind::DpmSolverMultistep => {
                Box::new(dpm_multistep::DpmMultistep::new(self, steps)?)
            }
            SchedulerKind::UniPc => Box::new(unipc::UniPc::new(self, steps)?),
            SchedulerKind::DpmSolverSinglestep => {
                Box::new(dpm_singlestep::DpmSinglestep::new(self, steps)?)
            }
            SchedulerKind::Lcm => Box::new(lcm::Lcm::new(self, steps)?),
            SchedulerKind::Tcd => Box::new(tcd::Tcd::new(self, steps)?),
        })
    }
}

impl SchedulerConfig {
    /// Why `custom` timesteps cannot run `steps` steps of this config's scheduler, as
    /// diffusers' `set_timesteps(timesteps=...)` would refuse them (and, beyond diffusers,
    /// timesteps that do not decrease or lie outside the training range).
    pub fn check_custom_timesteps(
        &self,
        custom: &[i64],
        steps: usize,
    ) -> std::result::Result<(), String> {
        self.takes_custom(
            "timesteps",
            SchedulerKind::takes_custom_timesteps,
            "Euler, Heun, DPM-Solver multistep and singlestep, LCM and TCD do",
        )?;
        if custom.len() != steps {
            return Err(format!(
                "{} custom timesteps for {steps} steps",
                custom.len()
            ));
        }
        let train = self.num_train_timesteps;
        match first_out_of_order(custom, |t| (0..train).contains(t), ToString::to_string) {
            Some(offence) => Err(format!(
                "custom timesteps must decrease strictly within 0..{train}, got {offence}"
            )),
            None => Ok(()),
        }
    }

    /// Why this config's scheduler cannot take a custom schedule of `what` (timesteps or
    /// sigmas): its kind does not (`takes`; `takers` name those that do), or its schedule
    /// is respaced.
    fn takes_custom(
        &self,
        what: &str,
        takes: fn(SchedulerKind) -> bool,
        takers: &str,
    ) -> std::result::Result<(), String> {
        let kind = self.kind()?;
        if !takes(kind) {
            return Err(format!(
                "scheduler {} does not take custom {what} ({takers})",
                kind.class_name()
            ));
        }
        if self.sigma_spacing() != sigmas::SigmaSpacing::Default {
            return Err(format!(
                "custom {what} cannot be respaced (Karras, exponential or beta sigmas)"
            ));
        }
        Ok(())
    }

    /// Why `custom` sigmas (the final one included) cannot run `steps` steps of this
    /// config's scheduler, as diffusers' `set_timesteps(sigmas=...)` would refuse them
    /// (and, beyond diffusers, sigmas that do not decrease, are not finite, lie outside
    /// [0, MAX_CUSTOM_SIGMA] or would replace a respaced schedule, which diffusers
    /// ignores then).
    pub fn check_custom_sigmas(
        &self,
        custom: &[f64],
        steps: usize,
    ) -> std::result::Result<(), String> {
        self.takes_custom("sigmas", SchedulerKind::takes_custom_sigmas, "Euler does")?;
        if self.timesteps.is_some() {
            return Err("custom sigmas and custom timesteps cannot both be set".into());
        }
        if custom.len() < 2 || custom.len() - 1 != steps {
            return Err(format!(
                "{} custom sigmas (the final one included) for {steps} steps",
                custom.len()
            ));
        }
        let in_range = |s: &f64| (0.0..=MAX_CUSTOM_SIGMA).contains(s);
        // Told in single precision, as the contract carries them (0.1, not 0.100000001…).
        let told = |s: &f64| (*s as f32).to_string();
        match first_out_of_order(custom, in_range, told) {
            Some(offence) => Err(format!(
                "custom sigmas must decrease strictly within [0, {MAX_CUSTOM_SIGMA}], got {offence}"
            )),
            None => Ok(()),
        }
    }
}

/// The first entry of a custom schedule that is out of range or not below the one
/// before it, told as the client sent it ("NaN at index 0", "5 after 3 at index 2").
fn first_out_of_order<T: PartialOrd>(
    schedule: &[T],
    in_range: impl Fn(&T) -> bool,
    told: impl Fn(&T) -> String,
) -> Option<String> {
    schedule.iter().enumerate().find_map(|(i, value)| {
        if !in_range(value) {
            return Some(format!("{} at index {i}", told(value)));
        }
        let previous = &schedule[i.checked_sub(1)?];
        (value >= previous)
            .then(|| format!("{} after {} at index {i}", told(value), told(previous)))
    })
}

/// The largest custom sigma taken (SDXL's training sigmas reach 14.6; EDM-style
/// schedules start at 80 or so).
pub const MAX_CUSTOM_SIGMA: f64 = 1000.0;

/// Inference timesteps for `steps` steps under `config`'s spacing (float32 values, in
/// decreasing order), as diffusers' discrete schedulers place them; a request's custom
/// timesteps in their place.
pub fn spaced_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    if let Some(custom) = &config.timesteps {
        return custom.iter().map(|&t| t as f32 as f64).collect();
    }
    let train = config.num_train_timesteps;
    let n = steps as i64;
    match config.timestep_spacing {
        TimestepSpacing::Linspace => {
            let last = (train - 1) as f64;
            (0..n)
                .map(|i| {
                    let v = if n == 1 {
                        0.0
                    } else {
                        last * i as f64 / (n - 1) as f64
                    };
                    v as f32 as f64
                })
                .rev()
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| ((i * ratio) as f32 + config.steps_offset as f32) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            // numpy: arange(train, 0, -ratio).round() - 1, with arange's length rule.
            let ratio = train as f64 / n as f64;
            let len = (train as f64 / ratio).ceil() as i64;
            (0..len)
                .map(|i| {
                    let t = train as f64 - i as f64 * ratio;
                    ((t.round_ties_even() as f32) - 1.0) as f64
                })
                .collect()
        }
    }
}

/// numpy's `interp` on the integer grid 0..len.
pub fn interp(x: f64, table: &[f32]) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    if x <= 0.0 {
        return table[0] as f64;
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last] as f64;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    let (a, b) = (table[i] as f64, table[i + 1] as f64);
    // numpy: slope * (x - xp[j]) + fp[j]
    (b - a) * frac + a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_custom_schedule_names_its_first_offending_entry() {
        let config = sdxl();
        let sigmas = |custom: &[f64]| {
            config
                .check_custom_sigmas(custom, custom.len() - 1)
                .expect_err("refused")
        };
        assert!(sigmas(&[f64::NAN, 0.0]).ends_with("got NaN at index 0"));
        assert!(sigmas(&[5.0, f64::INFINITY, 0.0]).ends_with("got inf at index 1"));
        let widened = f64::from(0.1f32);
        assert!(sigmas(&[5.0, widened, widened]).ends_with("got 0.1 after 0.1 at index 2"));
        assert!(sigmas(&[1.0, 2.5, 0.0]).ends_with("got 2.5 after 1 at index 1"));
        let timesteps = config
            .check_custom_timesteps(&[999, 500, 1000], 3)
            .expect_err("refused");
        assert!(timesteps.ends_with("got 1000 at index 2"), "{timesteps}");
    }

    fn sdxl() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                "timestep_spacing": "leading"}"#,
        )
        .expect("valid config")
    }

    #[test]
    fn zero_terminal_snr_leaves_the_clean_image_undefined_only_where_it_divides() {
        let with = |class: &str, clip: Option<bool>, prediction| {
            let mut c = sdxl();
            c.class_name = Some(class.into());
            c.rescale_betas_zero_snr = true;
            c.clip_sample = clip;
            c.prediction_type = prediction;
            c
        };
        let eps = PredictionType::Epsilon;
        // DDIM clamps by default (diffusers' DDIMScheduler), LCM does not, TCD never.
        for (class, clip, undefined) in [
            ("DDIMScheduler", None, false),
            ("DDIMScheduler", Some(false), true),
            ("LCMScheduler", None, true),
            ("LCMScheduler", Some(true), false),
            ("TCDScheduler", Some(true), true),
            ("EulerDiscreteScheduler", Some(false), false),
            ("UniPCMultistepScheduler", Some(false), false),
        ] {
            let c = with(class, clip, eps);
            assert_eq!(
                c.clean_image_undefined_at(999.0),
                undefined,
                "{class} {clip:?}"
            );
            assert!(!c.clean_image_undefined_at(998.0), "{class}");
        }
        for prediction in [PredictionType::VPrediction, PredictionType::Sample] {
            let c = with("TCDScheduler", None, prediction);
            assert!(!c.clean_image_undefined_at(999.0), "{prediction:?}");
        }
        let mut plain = with("TCDScheduler", None, eps);
        plain.rescale_betas_zero_snr = false;
        assert!(!plain.clean_image_undefined_at(999.0));
    }

    #[test]
    fn leading_spacing_matches_diffusers() {
        assert_eq!(spaced_timesteps(&sdxl(), 4), vec![751.0, 501.0, 251.0, 1.0]);
    }

    #[test]
    fn trailing_spacing_matches_diffusers() {
        let mut c = sdxl();
        c.timestep_spacing = TimestepSpacing::Trailing;
        assert_eq!(spaced_timesteps(&c, 3), vec![999.0, 666.0, 332.0]);
        assert_eq!(spaced_timesteps(&c, 7)[4..], [428.0, 285.0, 142.0]);
        assert_eq!(spaced_timesteps(&c, 30).len(), 30);
    }

    #[test]
    fn linspace_spacing_matches_diffusers() {
        let mut c = sdxl();
        c.timestep_spacing = TimestepSpacing::Linspace;
        assert_eq!(spaced_timesteps(&c, 3), vec![999.0, 499.5, 0.0]);
    }
}
