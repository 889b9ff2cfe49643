//! Sampling: prompts, guidance, steps, seeds, the scheduler with its options, and the
//! micro-conditioning.

use crate::api::validate::fields::{
    at_most, enum_value, first_seed, float, optional_float, Range, Violations,
};
use crate::config::Limits;
use crate::engine::request::{FreeU, Seamless};
use crate::engine::schedulers::options::{AlgorithmType, SolverType};
use crate::engine::schedulers::sigmas::SigmaSpacing;
use crate::engine::schedulers::solver::SOLVER_ORDERS;
use crate::engine::schedulers::{
    FinalSigmasType, PredictionType, SchedulerConfig, SchedulerKind, SchedulerOptions,
    TimestepSpacing,
};
use crate::proto::v1 as pb;

/// Guidance scales, base and refiner.
pub const GUIDANCE: Range = Range::closed(0.0, 30.0);
/// Aesthetic scores.
pub const AESTHETIC: Range = Range::closed(0.0, 10.0);

/// The prompts by field path (`None`: not given): the four of the first pass and the
/// hires pass's own.
fn prompt_fields(spec: &pb::GenerationSpec) -> Vec<(&'static str, Option<&String>)> {
    let mut fields = vec![
        ("spec.prompt", Some(&spec.prompt)),
        ("spec.prompt_2", spec.prompt_2.as_ref()),
        ("spec.negative_prompt", spec.negative_prompt.as_ref()),
        ("spec.negative_prompt_2", spec.negative_prompt_2.as_ref()),
    ];
    if let Some(h) = &spec.hires {
        fields.extend([
            ("spec.hires.prompt", h.prompt.as_ref()),
            ("spec.hires.prompt_2", h.prompt_2.as_ref()),
            ("spec.hires.negative_prompt", h.negative_prompt.as_ref()),
            ("spec.hires.negative_prompt_2", h.negative_prompt_2.as_ref()),
        ]);
    }
    fields
}

/// The prompts, each at most `limits.max_prompt_chars` characters.
pub fn prompts(spec: &pb::GenerationSpec, limits: &Limits, v: &mut Violations) {
    let max_chars = limits.max_prompt_chars as usize;
    for (field, text) in prompt_fields(spec) {
        let n = text.map_or(0, |t| t.chars().count());
        if n > max_chars {
            v.add(
                field,
                format!("must be at most {max_chars} characters, got {n}"),
            );
        }
    }
}

/// The counts of a request: steps (0: 30), images (0: 1) and the seed of image 0
/// (`drawn` when the request has none), every image's seed below 2^53.
pub fn counts(
    spec: &pb::GenerationSpec,
    limits: &Limits,
    drawn: u64,
    v: &mut Violations,
) -> (u32, u32, u64) {
    let custom = match (spec.timesteps.len(), spec.sigmas.len()) {
        (0, sigmas) => sigmas.saturating_sub(1) as u32,
        (timesteps, _) => timesteps as u32,
    };
    let steps = match spec.steps {
        // Custom timesteps or sigmas count the steps (their own rule bounds them).
        0 if custom > 0 => custom,
        0 => 30,
        steps => steps,
    };
    if steps > limits.max_steps && custom == 0 {
        v.add(
            "spec.steps",
            format!("must be between 1 and {}, got {steps}", limits.max_steps),
        );
    }
    let num_images = spec.num_images.max(1);
    if num_images > limits.max_num_images {
        v.add(
            "spec.num_images",
            format!(
                "must be between 1 and {}, got {num_images}",
                limits.max_num_images
            ),
        );
    }
    let last = u64::from(num_images.min(limits.max_num_images).max(1)) - 1;
    let seed = first_seed(v, "spec.seed", spec.seed, (num_images, last), drawn);
    (steps, num_images, seed)
}

/// `spec.timesteps`: custom timesteps (`None` when there are none), checked by the rule
/// the scheduler of `config` (the model's, as the request changes it; `None`: unknown
/// here, and the run decides) places them by.
pub fn custom_timesteps(
    spec: &pb::GenerationSpec,
    config: Option<&SchedulerConfig>,
    limits: &Limits,
    v: &mut Violations,
) -> Option<Vec<i64>> {
    if spec.timesteps.is_empty() {
        return None;
    }
    let custom: Vec<i64> = spec.timesteps.iter().map(|&t| i64::from(t)).collect();
    let field = "spec.timesteps";
    let (n, max) = (custom.len(), limits.max_steps as usize);
    if n > max {
        v.add(field, format!("must hold at most {max} timesteps, got {n}"));
    }
    if spec.steps != 0 && spec.steps as usize != n {
        v.add(
            "spec.steps",
            format!(
                "must be 0 or the number of timesteps ({n}), got {}",
                spec.steps
            ),
        );
    }
    if let Some(Err(problem)) = config.map(|c| c.check_custom_timesteps(&custom, n)) {
        v.add(field, problem);
    }
    Some(custom)
}

/// `spec.sigmas`: custom sigmas (`None` when there are none), checked by the rule of the
/// scheduler of `config` (as for [`custom_timesteps`]).
pub fn custom_sigmas(
    spec: &pb::GenerationSpec,
    config: Option<&SchedulerConfig>,
    limits: &Limits,
    v: &mut Violations,
) -> Option<Vec<f64>> {
    if spec.sigmas.is_empty() {
        return None;
    }
    let custom: Vec<f64> = spec.sigmas.iter().map(|&s| f64::from(s)).collect();
    let field = "spec.sigmas";
    if !spec.timesteps.is_empty() {
        v.add(field, "cannot be set with spec.timesteps");
        return None;
    }
    let (n, max) = (custom.len(), limits.max_steps as usize + 1);
    if n > max {
        v.add(field, format!("must hold at most {max} sigmas, got {n}"));
    }
    let steps = n.saturating_sub(1);
    if spec.steps != 0 && spec.steps as usize != steps {
        v.add(
            "spec.steps",
            format!(
                "must be 0 or the number of sigmas less one ({steps}), got {}",
                spec.steps
            ),
        );
    }
    if let Some(Err(problem)) = config.map(|c| c.check_custom_sigmas(&custom, steps)) {
        v.add(field, problem);
    }
    Some(custom)
}

/// `guidance_scale` (default 5) and `guidance_rescale`.
pub fn guidance(spec: &pb::GenerationSpec, v: &mut Violations) -> (f64, f64) {
    let scale = optional_float(v, "spec.guidance_scale", spec.guidance_scale, GUIDANCE, 5.0);
    let rescale = float(
        v,
        "spec.guidance_rescale",
        spec.guidance_rescale,
        Range::closed(0.0, 1.0),
    )
    .unwrap_or(0.0);
    (scale, rescale)
}

/// `spec.freeu`: each factor in (0, 10], unset ones at the published SDXL values (0
/// would turn FreeU off in diffusers, which enables it only when all four are non-zero).
pub fn freeu(f: Option<&pb::FreeU>, v: &mut Violations) -> Option<FreeU> {
    let f = f?;
    let range = Range::open_closed(0.0, 10.0);
    let mut factor = |name: &str, value: Option<f32>, default: f64| {
        optional_float(v, &format!("spec.freeu.{name}"), value, range, default)
    };
    Some(FreeU {
        b1: factor("b1", f.b1, 1.3),
        b2: factor("b2", f.b2, 1.4),
        s1: factor("s1", f.s1, 0.9),
        s2: factor("s2", f.s2, 0.2),
    })
}

/// `spec.tiling`: the axes along which the image tiles seamlessly.
pub fn seamless(spec: &pb::GenerationSpec, v: &mut Violations) -> Option<Seamless> {
    match enum_value::<pb::Tiling>(v, "spec.tiling", spec.tiling)? {
        pb::Tiling::Unspecified => None,
        pb::Tiling::Both => Some(Seamless::BOTH),
        pb::Tiling::X => Some(Seamless { x: true, y: false }),
        pb::Tiling::Y => Some(Seamless { x: false, y: true }),
    }
}

/// The engine's scheduler for a contract scheduler (`None` for the model's own).
pub fn scheduler_kind(scheduler: pb::Scheduler) -> Option<SchedulerKind> {
    use pb::Scheduler as S;
    Some(match scheduler {
        S::Euler => SchedulerKind::Euler,
        S::EulerAncestral => SchedulerKind::EulerAncestral,
        S::Heun => SchedulerKind::Heun,
        S::Kdpm2 => SchedulerKind::Kdpm2,
        S::Kdpm2Ancestral => SchedulerKind::Kdpm2Ancestral,
        S::Lms => SchedulerKind::Lms,
        S::Ddim => SchedulerKind::Ddim,
        S::DpmSolverMultistep => SchedulerKind::DpmSolverMultistep,
        S::Unipc => SchedulerKind::UniPc,
        S::DpmSolverSinglestep => SchedulerKind::DpmSolverSinglestep,
        S::Lcm => SchedulerKind::Lcm,
        S::Tcd => SchedulerKind::Tcd,
        S::Unspecified => return None,
    })
}

/// A scheduler and its options at `prefix` (`spec` or `spec.refiner`): the scheduler
/// asked for (`None`: the model's own, `model_default`) and the options, each checked
/// against what that scheduler offers.
pub fn scheduler(
    prefix: &str,
    scheduler: i32,
    options: Option<&pb::SchedulerOptions>,
    model_default: Option<SchedulerKind>,
    v: &mut Violations,
) -> (Option<SchedulerKind>, SchedulerOptions) {
    let asked = enum_value::<pb::Scheduler>(v, &format!("{prefix}.scheduler"), scheduler)
        .and_then(scheduler_kind);
    let default = pb::SchedulerOptions::default();
    let options = options.unwrap_or(&default);
    let at = |name: &str| format!("{prefix}.scheduler_options.{name}");
    let typed = options_of(options, &at, v);
    // The options must fit the scheduler that will run.
    let runs = asked.or(model_default).unwrap_or(SchedulerKind::Euler);
    for option in typed.set() {
        if !runs.options().contains(&option) {
            v.add(
                at(option.name()),
                format!("does not apply to scheduler {}", runs.class_name()),
            );
        }
    }
    if let Some(spacing) = typed.sigma_schedule {
        if runs
            .options()
            .contains(&crate::engine::schedulers::SchedulerOption::SigmaSchedule)
            && !runs.sigma_schedules().contains(&spacing)
        {
            v.add(
                at("sigma_schedule"),
                format!(
                    "{spacing:?} is not offered by scheduler {} (it offers {:?})",
                    runs.class_name(),
                    runs.sigma_schedules()
                ),
            );
        }
    }
    if let Some(solver) = typed.solver_type {
        if !runs.solver_types().is_empty() && !runs.solver_types().contains(&solver) {
            v.add(
                at("solver_type"),
                format!(
                    "{solver:?} is not a solver type of scheduler {} (it has {:?})",
                    runs.class_name(),
                    runs.solver_types()
                ),
            );
        }
    }
    (asked, typed)
}

/// The typed options of `o`, each value checked on its own.
fn options_of(
    o: &pb::SchedulerOptions,
    at: &dyn Fn(&str) -> String,
    v: &mut Violations,
) -> SchedulerOptions {
    use pb::{AlgorithmType as A, FinalSigmasType as F, PredictionType as P};
    use pb::{SigmaSchedule as G, SolverType as T, TimestepSpacing as S};
    if let Some(offset) = o.steps_offset {
        at_most(v, &at("steps_offset"), offset, 10);
    }
    if let Some(steps) = o.original_inference_steps {
        if !(1..=1000).contains(&steps) {
            v.add(
                at("original_inference_steps"),
                format!("must be between 1 and 1000, got {steps}"),
            );
        }
    }
    if let Some(order) = o
        .solver_order
        .filter(|&order| !SOLVER_ORDERS.contains(&(order as usize)))
    {
        v.add(
            at("solver_order"),
            format!("must be between 1 and 3, got {order}"),
        );
    }
    SchedulerOptions {
        sigma_schedule: match enum_value(v, &at("sigma_schedule"), o.sigma_schedule) {
            Some(G::Default) => Some(SigmaSpacing::Default),
            Some(G::Karras) => Some(SigmaSpacing::Karras),
            Some(G::Exponential) => Some(SigmaSpacing::Exponential),
            Some(G::Beta) => Some(SigmaSpacing::Beta),
            Some(G::Unspecified) | None => None,
        },
        timestep_spacing: match enum_value(v, &at("timestep_spacing"), o.timestep_spacing) {
            Some(S::Leading) => Some(TimestepSpacing::Leading),
            Some(S::Trailing) => Some(TimestepSpacing::Trailing),
            Some(S::Linspace) => Some(TimestepSpacing::Linspace),
            Some(S::Unspecified) | None => None,
        },
        steps_offset: o.steps_offset,
        solver_order: o.solver_order,
        algorithm_type: match enum_value(v, &at("algorithm_type"), o.algorithm_type) {
            Some(A::DpmsolverPlusPlus) => Some(AlgorithmType::DpmSolverPlusPlus),
            Some(A::SdeDpmsolverPlusPlus) => Some(AlgorithmType::SdeDpmSolverPlusPlus),
            Some(A::Unspecified) | None => None,
        },
        solver_type: match enum_value(v, &at("solver_type"), o.solver_type) {
            Some(T::Midpoint) => Some(SolverType::Midpoint),
            Some(T::Heun) => Some(SolverType::Heun),
            Some(T::Bh1) => Some(SolverType::Bh1),
            Some(T::Bh2) => Some(SolverType::Bh2),
            Some(T::Unspecified) | None => None,
        },
        lower_order_final: o.lower_order_final,
        euler_at_final: o.euler_at_final,
        final_sigmas_type: match enum_value(v, &at("final_sigmas_type"), o.final_sigmas_type) {
            Some(F::Zero) => Some(FinalSigmasType::Zero),
            Some(F::SigmaMin) => Some(FinalSigmasType::SigmaMin),
            Some(F::Unspecified) | None => None,
        },
        eta: o
            .eta
            .and_then(|eta| float(v, &at("eta"), eta, Range::closed(0.0, 1.0))),
        rescale_betas_zero_snr: o.rescale_betas_zero_snr,
        prediction_type: match enum_value(v, &at("prediction_type"), o.prediction_type) {
            Some(P::Epsilon) => Some(PredictionType::Epsilon),
            Some(P::VPrediction) => Some(PredictionType::VPrediction),
            Some(P::Unspecified) | None => None,
        },
        original_inference_steps: o.original_inference_steps,
    }
}

/// SDXL's micro-conditioning: sizes as (height, width), crops as (y, x), and the
/// aesthetic scores (defaults 6 and 2.5).
pub struct Micro {
    /// The original size the model is told.
    pub original_size: Option<(i64, i64)>,
    /// The crop's top-left corner.
    pub crop_top_left: (i64, i64),
    /// The target size.
    pub target_size: Option<(i64, i64)>,
    /// The negative original size.
    pub negative_original_size: Option<(i64, i64)>,
    /// The negative crop's top-left corner.
    pub negative_crop_top_left: (i64, i64),
    /// The negative target size.
    pub negative_target_size: Option<(i64, i64)>,
    /// Aesthetic-score conditioning.
    pub aesthetic_score: f64,
    /// Negative aesthetic-score conditioning.
    pub negative_aesthetic_score: f64,
}

/// `spec.micro_conditioning`.
pub fn micro_conditioning(m: Option<&pb::MicroConditioning>, v: &mut Violations) -> Micro {
    let default = pb::MicroConditioning::default();
    let m = m.unwrap_or(&default);
    let prefix = "spec.micro_conditioning";
    let mut size = |name: &str, s: &Option<pb::Size>| {
        let s = s.as_ref()?;
        for (axis, value) in [("width", s.width), ("height", s.height)] {
            if !(1..=16384).contains(&value) {
                v.add(
                    format!("{prefix}.{name}.{axis}"),
                    format!("must be between 1 and 16384, got {value}"),
                );
            }
        }
        Some((i64::from(s.height), i64::from(s.width)))
    };
    let original_size = size("original_size", &m.original_size);
    let target_size = size("target_size", &m.target_size);
    let negative_original_size = size("negative_original_size", &m.negative_original_size);
    let negative_target_size = size("negative_target_size", &m.negative_target_size);
    let mut point = |name: &str, p: &Option<pb::Point>| {
        let Some(p) = p else { return (0, 0) };
        for (axis, value) in [("x", p.x), ("y", p.y)] {
            at_most(v, &format!("{prefix}.{name}.{axis}"), value, 16384);
        }
        (i64::from(p.y), i64::from(p.x))
    };
    let crop_top_left = point("crop_top_left", &m.crop_top_left);
    let negative_crop_top_left = point("negative_crop_top_left", &m.negative_crop_top_left);
    if m.negative_original_size.is_some() != m.negative_target_size.is_some() {
        v.add(
            format!("{prefix}.negative_target_size"),
            "must be set together with negative_original_size",
        );
    }
    Micro {
        original_size,
        crop_top_left,
        target_size,
        negative_original_size,
        negative_crop_top_left,
        negative_target_size,
        aesthetic_score: optional_float(
            v,
            &format!("{prefix}.aesthetic_score"),
            m.aesthetic_score,
            AESTHETIC,
            6.0,
        ),
        negative_aesthetic_score: optional_float(
            v,
            &format!("{prefix}.negative_aesthetic_score"),
            m.negative_aesthetic_score,
            AESTHETIC,
            2.5,
        ),
    }
}
