//! What a request may change in a scheduler: typed options, which of them each
//! scheduler takes (its diffusers class's config keys), and the A1111 sampler names that
//! stand for a scheduler with options.

use crate::engine::schedulers::config::SchedulerOverrides;
use crate::engine::schedulers::sigmas::SigmaSpacing;
pub use crate::engine::schedulers::solver::{AlgorithmType, SolverType};
use crate::engine::schedulers::{FinalSigmasType, PredictionType, SchedulerKind, TimestepSpacing};

/// One option of [`SchedulerOptions`], named as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerOption {
    /// `sigma_schedule`.
    SigmaSchedule,
    /// `timestep_spacing`.
    TimestepSpacing,
    /// `steps_offset`.
    StepsOffset,
    /// `solver_order`.
    SolverOrder,
    /// `algorithm_type`.
    AlgorithmType,
    /// `solver_type`.
    SolverType,
    /// `lower_order_final`.
    LowerOrderFinal,
    /// `euler_at_final`.
    EulerAtFinal,
    /// `final_sigmas_type`.
    FinalSigmasType,
    /// `eta`.
    Eta,
    /// `rescale_betas_zero_snr`.
    RescaleBetasZeroSnr,
    /// `prediction_type`.
    PredictionType,
    /// `original_inference_steps`.
    OriginalInferenceSteps,
}

impl SchedulerOption {
    /// Every option, in the contract's order.
    pub const ALL: [SchedulerOption; 13] = [
        SchedulerOption::SigmaSchedule,
        SchedulerOption::TimestepSpacing,
        SchedulerOption::StepsOffset,
        SchedulerOption::SolverOrder,
        SchedulerOption::AlgorithmType,
        SchedulerOption::SolverType,
        SchedulerOption::LowerOrderFinal,
        SchedulerOption::EulerAtFinal,
        SchedulerOption::FinalSigmasType,
        SchedulerOption::Eta,
        SchedulerOption::RescaleBetasZeroSnr,
        SchedulerOption::PredictionType,
        SchedulerOption::OriginalInferenceSteps,
    ];

    /// The contract's field name.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerOption::SigmaSchedule => "sigma_schedule",
            SchedulerOption::TimestepSpacing => "timestep_spacing",
            SchedulerOption::StepsOffset => "steps_offset",
            SchedulerOption::SolverOrder => "solver_order",
            SchedulerOption::AlgorithmType => "algorithm_type",
            SchedulerOption::SolverType => "solver_type",
            SchedulerOption::LowerOrderFinal => "lower_order_final",
            SchedulerOption::EulerAtFinal => "euler_at_final",
            SchedulerOption::FinalSigmasType => "final_sigmas_type",
            SchedulerOption::Eta => "eta",
            SchedulerOption::RescaleBetasZeroSnr => "rescale_betas_zero_snr",
            SchedulerOption::PredictionType => "prediction_type",
            SchedulerOption::OriginalInferenceSteps => "original_inference_steps",
        }
    }
}

impl SchedulerKind {
    /// The options this scheduler takes: the config keys of its diffusers class.
    pub fn options(self) -> &'static [SchedulerOption] {
        use SchedulerOption as O;
        match self {
            SchedulerKind::Euler => &[
                O::SigmaSchedule,
                O::TimestepSpacing,
                O::StepsOffset,
                O::FinalSigmasType,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
            SchedulerKind::EulerAncestral => &[
                O::SigmaSchedule,
                O::TimestepSpacing,
                O::StepsOffset,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
            SchedulerKind::Heun
            | SchedulerKind::Kdpm2
            | SchedulerKind::Kdpm2Ancestral
            | SchedulerKind::Lms => &[
                O::SigmaSchedule,
                O::TimestepSpacing,
                O::StepsOffset,
                O::PredictionType,
            ],
            SchedulerKind::Ddim => &[
                O::SigmaSchedule,
                O::TimestepSpacing,
                O::StepsOffset,
                O::Eta,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
            SchedulerKind::DpmSolverMultistep => &[
                O::SigmaSchedule,
                O::TimestepSpacing,
                O::StepsOffset,
                O::SolverOrder,
                O::AlgorithmType,
                O::SolverType,
                O::LowerOrderFinal,
                O::EulerAtFinal,
                O::FinalSigmasType,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
            SchedulerKind::DpmSolverSinglestep => &[
                O::SigmaSchedule,
                O::SolverOrder,
                O::AlgorithmType,
                O::SolverType,
                O::LowerOrderFinal,
                O::FinalSigmasType,
                O::PredictionType,
            ],
            SchedulerKind::UniPc => &[
                O::SigmaSchedule,
                O::TimestepSpacing,
                O::StepsOffset,
                O::SolverOrder,
                O::SolverType,
                O::LowerOrderFinal,
                O::FinalSigmasType,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
            // Their timesteps come from the distillation schedule: no spacing or offset.
            SchedulerKind::Lcm => &[
                O::OriginalInferenceSteps,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
            SchedulerKind::Tcd => &[
                O::OriginalInferenceSteps,
                O::Eta,
                O::RescaleBetasZeroSnr,
                O::PredictionType,
            ],
        }
    }

    /// The sigma schedules it offers (its diffusers class has the `use_*_sigmas` keys).
    pub fn sigma_schedules(self) -> &'static [SigmaSpacing] {
        match self {
            SchedulerKind::EulerAncestral | SchedulerKind::Ddim => &[SigmaSpacing::Default],
            SchedulerKind::Lcm | SchedulerKind::Tcd => &[],
            _ => &[
                SigmaSpacing::Default,
                SigmaSpacing::Karras,
                SigmaSpacing::Exponential,
                SigmaSpacing::Beta,
            ],
        }
    }

    /// The solver types it offers.
    pub fn solver_types(self) -> &'static [SolverType] {
        match self {
            SchedulerKind::DpmSolverMultistep | SchedulerKind::DpmSolverSinglestep => {
                &[SolverType::Midpoint, SolverType::Heun]
            }
            SchedulerKind::UniPc => &[SolverType::Bh1, SolverType::Bh2],
            _ => &[],
        }
    }
}

/// A request's changes to a scheduler; `None` keeps the model's own setting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOptions {
    /// Sigma respacing.
    pub sigma_schedule: Option<SigmaSpacing>,
    /// Timestep placement.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to leading timesteps.
    pub steps_offset: Option<u32>,
    /// Multistep order.
    pub solver_order: Option<u32>,
    /// DPM-Solver's algorithm.
    pub algorithm_type: Option<AlgorithmType>,
    /// The second-order update.
    pub solver_type: Option<SolverType>,
    /// Lower-order final steps.
    pub lower_order_final: Option<bool>,
    /// A first-order last step.
    pub euler_at_final: Option<bool>,
    /// The last sigma.
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// DDIM's eta, TCD's gamma.
    pub eta: Option<f64>,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: Option<bool>,
    /// What the model predicts.
    pub prediction_type: Option<PredictionType>,
    /// The distillation schedule's steps (LCM, TCD).
    pub original_inference_steps: Option<u32>,
}

impl SchedulerOptions {
    /// The options that are set, in the contract's order.
    pub fn set(&self) -> Vec<SchedulerOption> {
        use SchedulerOption as O;
        let set = [
            self.sigma_schedule.is_some(),
            self.timestep_spacing.is_some(),
            self.steps_offset.is_some(),
            self.solver_order.is_some(),
            self.algorithm_type.is_some(),
            self.solver_type.is_some(),
            self.lower_order_final.is_some(),
            self.euler_at_final.is_some(),
            self.final_sigmas_type.is_some(),
            self.eta.is_some(),
            self.rescale_betas_zero_snr.is_some(),
            self.prediction_type.is_some(),
            self.original_inference_steps.is_some(),
        ];
        O::ALL
            .into_iter()
            .zip(set)
            .filter_map(|(o, s)| s.then_some(o))
            .collect()
    }

    /// The diffusers config keys these options set on scheduler `class` (`None` keeps the
    /// model's scheduler), as `XScheduler.from_config(config, **keys)` applies them.
    pub fn overrides(&self, class: Option<SchedulerKind>) -> SchedulerOverrides {
        let mut o = SchedulerOverrides {
            class,
            ..SchedulerOverrides::default()
        };
        if let Some(spacing) = self.sigma_schedule {
            for (key, value) in [
                ("use_karras_sigmas", SigmaSpacing::Karras),
                ("use_exponential_sigmas", SigmaSpacing::Exponential),
                ("use_beta_sigmas", SigmaSpacing::Beta),
            ] {
                // An explicit default turns off what the model's config turned on.
                if spacing == value || spacing == SigmaSpacing::Default {
                    o.set(key, spacing == value);
                }
            }
        }
        if let Some(spacing) = self.timestep_spacing {
            o.set("timestep_spacing", spacing_name(spacing));
        }
        if let Some(offset) = self.steps_offset {
            o.set("steps_offset", offset);
        }
        if let Some(kind) = self.final_sigmas_type {
            let name = match kind {
                FinalSigmasType::Zero => "zero",
                FinalSigmasType::SigmaMin => "sigma_min",
            };
            o.set("final_sigmas_type", name);
        }
        if let Some(rescale) = self.rescale_betas_zero_snr {
            o.set("rescale_betas_zero_snr", rescale);
        }
        if let Some(eta) = self.eta {
            o.set("eta", eta);
        }
        if let Some(order) = self.solver_order {
            o.set("solver_order", order);
        }
        if let Some(algorithm) = self.algorithm_type {
            o.set("algorithm_type", algorithm.name());
        }
        if let Some(solver) = self.solver_type {
            o.set("solver_type", solver.name());
        }
        if let Some(v) = self.lower_order_final {
            o.set("lower_order_final", v);
        }
        if let Some(v) = self.euler_at_final {
            o.set("euler_at_final", v);
        }
        if let Some(prediction) = self.prediction_type {
            let name = match prediction {
                PredictionType::Epsilon => "epsilon",
                PredictionType::VPrediction => "v_prediction",
                PredictionType::Sample => "sample",
            };
            o.set("prediction_type", name);
        }
        if let Some(steps) = self.original_inference_steps {
            o.set("original_inference_steps", steps);
        }
        o
    }
}

fn spacing_name(spacing: TimestepSpacing) -> &'static str {
    match spacing {
        TimestepSpacing::Leading => "leading",
        TimestepSpacing::Trailing => "trailing",
        TimestepSpacing::Linspace => "linspace",
    }
}

/// A1111's sampler name for a scheduler and sigma schedule ("Euler a", "DPM2 Karras",
/// "DPM++ 2M SDE Karras").
pub fn a1111_name(kind: SchedulerKind, options: &SchedulerOptions) -> String {
    let sde = kind == SchedulerKind::DpmSolverMultistep
        && options.algorithm_type == Some(AlgorithmType::SdeDpmSolverPlusPlus);
    let suffix = match options.sigma_schedule {
        Some(SigmaSpacing::Karras) => " Karras",
        Some(SigmaSpacing::Exponential) => " Exponential",
        Some(SigmaSpacing::Beta) => " Beta",
        _ => "",
    };
    let sde = if sde { " SDE" } else { "" };
    format!("{}{sde}{suffix}", kind.a1111_name())
}

/// The scheduler and options an A1111 sampler name (as [`a1111_name`] writes them) or a
/// short name (`euler`, `euler-ancestral`, `dpm-solver-multistep`, ...) stands for.
pub fn from_sampler_name(name: &str) -> Option<(SchedulerKind, SchedulerOptions)> {
    let short = [
        ("euler", SchedulerKind::Euler),
        ("euler-ancestral", SchedulerKind::EulerAncestral),
        ("heun", SchedulerKind::Heun),
        ("kdpm2", SchedulerKind::Kdpm2),
        ("kdpm2-ancestral", SchedulerKind::Kdpm2Ancestral),
        ("lms", SchedulerKind::Lms),
        ("ddim", SchedulerKind::Ddim),
        ("dpm-solver-multistep", SchedulerKind::DpmSolverMultistep),
        ("dpm-solver-singlestep", SchedulerKind::DpmSolverSinglestep),
        ("unipc", SchedulerKind::UniPc),
        ("lcm", SchedulerKind::Lcm),
        ("tcd", SchedulerKind::Tcd),
    ];
    if let Some((_, kind)) = short.iter().find(|(n, _)| *n == name) {
        return Some((*kind, SchedulerOptions::default()));
    }
    // Every A1111 name [`a1111_name`] can write, read back.
    let schedules = [
        None,
        Some(SigmaSpacing::Karras),
        Some(SigmaSpacing::Exponential),
        Some(SigmaSpacing::Beta),
    ];
    let algorithms = [None, Some(AlgorithmType::SdeDpmSolverPlusPlus)];
    for kind in SchedulerKind::ALL {
        for sigma_schedule in schedules {
            for algorithm_type in algorithms {
                let options = SchedulerOptions {
                    sigma_schedule,
                    algorithm_type,
                    ..SchedulerOptions::default()
                };
                if a1111_name(kind, &options) == name {
                    return Some((kind, options));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_names_read_back() {
        for (name, kind) in [
            ("Euler a", SchedulerKind::EulerAncestral),
            ("DPM2 Karras", SchedulerKind::Kdpm2),
            ("DPM++ 2M SDE Karras", SchedulerKind::DpmSolverMultistep),
            ("DPM++ SDE", SchedulerKind::DpmSolverSinglestep),
            ("unipc", SchedulerKind::UniPc),
        ] {
            let (k, options) = from_sampler_name(name).expect(name);
            assert_eq!(k, kind, "{name}");
            if !name.contains(char::is_uppercase) {
                continue;
            }
            assert_eq!(a1111_name(k, &options), name);
        }
        assert!(from_sampler_name("DPM3").is_none());
    }

    #[test]
    fn an_explicit_default_schedule_turns_the_others_off() {
        let options = SchedulerOptions {
            sigma_schedule: Some(SigmaSpacing::Default),
            ..SchedulerOptions::default()
        };
        let o = options.overrides(None);
        assert_eq!(o.keys["use_karras_sigmas"], false);
        assert_eq!(o.keys["use_beta_sigmas"], false);
        let karras = SchedulerOptions {
            sigma_schedule: Some(SigmaSpacing::Karras),
            ..SchedulerOptions::default()
        };
        let o = karras.overrides(Some(SchedulerKind::Heun));
        assert_eq!(o.keys.len(), 1);
        assert_eq!(o.keys["use_karras_sigmas"], true);
    }
}
