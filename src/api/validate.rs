//! Proto to domain: every rule of the contract, every violation reported at once with its
//! proto field path (`spec.loras[1].weight`). Static ranges are `validator` rules on the
//! domain input types; limits from the configuration and cross-field rules follow.

use std::collections::BTreeMap;

use validator::{Validate, ValidationErrors, ValidationErrorsKind};

use crate::api::status::ApiError;
use crate::config::Limits;
use crate::engine::pipeline::{GenerateParams, RefinerMode, RefinerParams, SchedulerOverrides};
use crate::engine::registry::{check_name, ModelKind, Registry, RegistryError};
use crate::engine::schedulers::SchedulerKind;
use crate::jobs::{JobSpec, LoraJob, OutputSpec, RefinerJob, VaeJob};
use crate::output::OutputFormat;
use crate::proto::v1 as pb;

/// The float a client meant: proto floats are f32, and 0.7f32 widened is 0.69999998,
/// which truncates differently (int(steps * strength)) than the 0.7 diffusers gets.
fn decimal(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

/// Seeds are below 2^53 so that JSON clients (JavaScript, C# doubles) keep them exact.
pub const MAX_SEED: u64 = (1 << 53) - 1;
/// Most LoRA adapters in one request.
pub const MAX_LORAS: usize = 16;

#[derive(Validate)]
struct SizeInput {
    #[validate(range(min = 1, max = 16384, message = "must be between 1 and 16384"))]
    width: u32,
    #[validate(range(min = 1, max = 16384, message = "must be between 1 and 16384"))]
    height: u32,
}

#[derive(Validate)]
struct PointInput {
    #[validate(range(max = 16384, message = "must be at most 16384"))]
    x: u32,
    #[validate(range(max = 16384, message = "must be at most 16384"))]
    y: u32,
}

#[derive(Validate)]
struct MicroConditioningInput {
    #[validate(nested)]
    original_size: Option<SizeInput>,
    #[validate(nested)]
    crop_top_left: Option<PointInput>,
    #[validate(nested)]
    target_size: Option<SizeInput>,
    #[validate(nested)]
    negative_original_size: Option<SizeInput>,
    #[validate(nested)]
    negative_crop_top_left: Option<PointInput>,
    #[validate(nested)]
    negative_target_size: Option<SizeInput>,
    #[validate(range(min = 0.0, max = 10.0, message = "must be between 0 and 10"))]
    aesthetic_score: Option<f32>,
    #[validate(range(min = 0.0, max = 10.0, message = "must be between 0 and 10"))]
    negative_aesthetic_score: Option<f32>,
}

#[derive(Validate)]
struct SchedulerOptionsInput {
    #[validate(range(max = 10, message = "must be at most 10"))]
    steps_offset: Option<u32>,
    #[validate(range(min = 1, max = 3, message = "must be between 1 and 3"))]
    solver_order: Option<u32>,
    #[validate(range(min = 0.0, max = 1.0, message = "must be between 0 and 1"))]
    eta: Option<f32>,
}

#[derive(Validate)]
struct RefinerInput {
    #[validate(range(
        exclusive_min = 0.0,
        exclusive_max = 1.0,
        message = "must be strictly between 0 and 1"
    ))]
    high_noise_fraction: Option<f32>,
    #[validate(range(exclusive_min = 0.0, max = 1.0, message = "must be in (0, 1]"))]
    strength: Option<f32>,
    #[validate(range(min = 0.0, max = 30.0, message = "must be between 0 and 30"))]
    guidance_scale: Option<f32>,
    #[validate(range(min = 0.0, max = 10.0, message = "must be between 0 and 10"))]
    aesthetic_score: Option<f32>,
    #[validate(range(min = 0.0, max = 10.0, message = "must be between 0 and 10"))]
    negative_aesthetic_score: Option<f32>,
    #[validate(nested)]
    scheduler_options: SchedulerOptionsInput,
}

#[derive(Validate)]
struct LoraInput {
    #[validate(length(min = 1, message = "is required"))]
    name: String,
    #[validate(range(min = -2.0, max = 2.0, message = "must be between -2 and 2"))]
    weight: f32,
}

#[derive(Validate)]
struct PreprocessorParamsInput {
    #[validate(range(max = 255, message = "must be at most 255"))]
    low_threshold: Option<u32>,
    #[validate(range(max = 255, message = "must be at most 255"))]
    high_threshold: Option<u32>,
}

#[derive(Validate)]
struct ControlNetInput {
    #[validate(length(min = 1, message = "is required"))]
    model: String,
    #[validate(length(min = 1, message = "is required"))]
    image: Vec<u8>,
    #[validate(nested)]
    preprocessor_params: PreprocessorParamsInput,
    #[validate(range(min = 0.0, max = 2.0, message = "must be between 0 and 2"))]
    conditioning_scale: Option<f32>,
    #[validate(range(min = 0.0, exclusive_max = 1.0, message = "must be in [0, 1)"))]
    guidance_start: f32,
    #[validate(range(exclusive_min = 0.0, max = 1.0, message = "must be in (0, 1]"))]
    guidance_end: Option<f32>,
}

#[derive(Validate)]
struct InitImageInput {
    #[validate(length(min = 1, message = "is required"))]
    image: Vec<u8>,
    #[validate(range(exclusive_min = 0.0, max = 1.0, message = "must be in (0, 1]"))]
    strength: Option<f32>,
    #[validate(range(max = 64, message = "must be at most 64"))]
    mask_blur: u32,
    #[validate(range(
        exclusive_min = 0.0,
        exclusive_max = 1.0,
        message = "must be strictly between 0 and 1"
    ))]
    denoising_start: Option<f32>,
}

#[derive(Validate)]
struct UpscaleInput {
    #[validate(length(min = 1, message = "is required"))]
    model: String,
    #[validate(range(min = 2, max = 4, message = "must be 2 or 4"))]
    factor: u32,
    #[validate(range(max = 2048, message = "must be at most 2048"))]
    tile_size: u32,
}

#[derive(Validate)]
struct OutputInput {
    #[validate(range(max = 100, message = "must be between 1 and 100 (0 for the default)"))]
    quality: u32,
    #[validate(range(max = 1000, message = "must be at most 1000"))]
    preview_every_n_steps: u32,
}

/// The statically checked part of a GenerationSpec.
#[derive(Validate)]
struct SpecInput {
    #[validate(range(min = 0.0, max = 30.0, message = "must be between 0 and 30"))]
    guidance_scale: f32,
    #[validate(range(min = 0.0, max = 1.0, message = "must be between 0 and 1"))]
    guidance_rescale: f32,
    #[validate(range(max = 10, message = "must be at most 10"))]
    clip_skip: u32,
    #[validate(range(max = 9007199254740991u64, message = "must be below 2^53"))]
    seed: Option<u64>,
    #[validate(nested)]
    micro_conditioning: Option<MicroConditioningInput>,
    #[validate(nested)]
    scheduler_options: SchedulerOptionsInput,
    #[validate(nested)]
    refiner: Option<RefinerInput>,
    #[validate(nested)]
    loras: Vec<LoraInput>,
    #[validate(nested)]
    controlnets: Vec<ControlNetInput>,
    #[validate(nested)]
    init_image: Option<InitImageInput>,
    #[validate(nested)]
    upscales: Vec<UpscaleInput>,
    #[validate(nested)]
    output: OutputInput,
    #[validate(length(max = 128, message = "must be at most 128 characters"))]
    client_job_id: String,
}

/// Collected violations: (proto field path, description).
#[derive(Debug, Default)]
pub struct Violations(pub Vec<(String, String)>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        let field = field.into();
        let description = description.into();
        self.0
            .push((field.clone(), format!("`{field}` {description}")));
    }

    /// Flattens validator's tree into proto paths under `prefix`.
    fn extend_from(
        &mut self,
        prefix: &str,
        errors: &ValidationErrors,
        renames: &BTreeMap<&str, &str>,
    ) {
        for (field, kind) in errors.errors() {
            let name = renames
                .get(field.as_ref())
                .copied()
                .unwrap_or(field.as_ref());
            let path = format!("{prefix}.{name}");
            match kind {
                ValidationErrorsKind::Field(list) => {
                    for error in list {
                        let message = error
                            .message
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_else(|| format!("is invalid ({})", error.code));
                        let got = error
                            .params
                            .get("value")
                            .map(|v| match v {
                                serde_json::Value::String(s) => {
                                    format!(", got {} characters", s.chars().count())
                                }
                                serde_json::Value::Array(a) => format!(", got {} bytes", a.len()),
                                other => format!(", got {other}"),
                            })
                            .unwrap_or_default();
                        self.add(path.clone(), format!("{message}{got}"));
                    }
                }
                ValidationErrorsKind::Struct(inner) => self.extend_from(&path, inner, renames),
                ValidationErrorsKind::List(items) => {
                    for (index, inner) in items {
                        self.extend_from(&format!("{path}[{index}]"), inner, renames);
                    }
                }
            }
        }
    }
}

fn decode_enum<E: TryFrom<i32>>(value: i32, field: &str, violations: &mut Violations) -> Option<E> {
    match E::try_from(value) {
        Ok(v) => Some(v),
        Err(_) => {
            violations.add(field, format!("has an unknown enum value {value}"));
            None
        }
    }
}

fn check_image(
    bytes: &[u8],
    field: &str,
    max_pixels: u64,
    violations: &mut Violations,
) -> Option<(u32, u32)> {
    if bytes.is_empty() {
        return None;
    }
    let reader = match image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format() {
        Ok(r) => r,
        Err(e) => {
            violations.add(field, format!("is not a decodable image ({e})"));
            return None;
        }
    };
    match reader.into_dimensions() {
        Ok((w, h)) if u64::from(w) * u64::from(h) > max_pixels => {
            violations.add(
                field,
                format!("is {w}x{h}, larger than the {max_pixels}-pixel limit"),
            );
            None
        }
        Ok((w, h)) => Some((w, h)),
        Err(e) => {
            violations.add(field, format!("is not a decodable image ({e})"));
            None
        }
    }
}

fn check_model_name(name: &str, field: &str, violations: &mut Violations) {
    if let Err(RegistryError::InvalidName { reason, .. }) = check_name(name) {
        violations.add(field, format!("is not a valid model name ({reason})"));
    }
}

/// Which SchedulerOptions fields each scheduler has (the diffusers class's config keys).
fn option_applies(scheduler: pb::Scheduler, option: &str) -> bool {
    use pb::Scheduler as S;
    if matches!(option, "sigma_schedule" | "prediction_type") {
        return true;
    }
    let keys: &[&str] = match scheduler {
        S::Unspecified | S::Euler => &[
            "timestep_spacing",
            "steps_offset",
            "final_sigmas_type",
            "rescale_betas_zero_snr",
        ],
        S::EulerAncestral => &["timestep_spacing", "steps_offset", "rescale_betas_zero_snr"],
        S::Heun | S::Kdpm2 | S::Kdpm2Ancestral | S::Lms => &["timestep_spacing", "steps_offset"],
        S::Ddim => &[
            "timestep_spacing",
            "steps_offset",
            "eta",
            "rescale_betas_zero_snr",
        ],
        S::DpmSolverMultistep => &[
            "timestep_spacing",
            "steps_offset",
            "solver_order",
            "algorithm_type",
            "solver_type",
            "lower_order_final",
            "euler_at_final",
            "final_sigmas_type",
            "rescale_betas_zero_snr",
        ],
        S::DpmSolverSinglestep => &[
            "solver_order",
            "algorithm_type",
            "solver_type",
            "lower_order_final",
            "final_sigmas_type",
        ],
        S::Unipc => &[
            "timestep_spacing",
            "steps_offset",
            "solver_order",
            "solver_type",
            "lower_order_final",
            "final_sigmas_type",
            "rescale_betas_zero_snr",
        ],
    };
    keys.contains(&option)
}

/// The sigma schedules a scheduler accepts (DEFAULT for all; Karras, exponential and beta
/// where the diffusers class has them).
pub fn sigma_schedules(scheduler: pb::Scheduler) -> Vec<pb::SigmaSchedule> {
    use pb::Scheduler as S;
    match scheduler {
        S::EulerAncestral | S::Ddim => vec![pb::SigmaSchedule::Default],
        _ => vec![
            pb::SigmaSchedule::Default,
            pb::SigmaSchedule::Karras,
            pb::SigmaSchedule::Exponential,
            pb::SigmaSchedule::Beta,
        ],
    }
}

/// The SchedulerOptions fields that are set.
fn options_set(o: &pb::SchedulerOptions) -> Vec<&'static str> {
    let mut set = Vec::new();
    let mut mark = |cond: bool, name| {
        if cond {
            set.push(name)
        }
    };
    mark(o.sigma_schedule != 0, "sigma_schedule");
    mark(o.timestep_spacing != 0, "timestep_spacing");
    mark(o.steps_offset.is_some(), "steps_offset");
    mark(o.solver_order.is_some(), "solver_order");
    mark(o.algorithm_type != 0, "algorithm_type");
    mark(o.solver_type != 0, "solver_type");
    mark(o.lower_order_final.is_some(), "lower_order_final");
    mark(o.euler_at_final.is_some(), "euler_at_final");
    mark(o.final_sigmas_type != 0, "final_sigmas_type");
    mark(o.eta.is_some(), "eta");
    mark(o.rescale_betas_zero_snr.is_some(), "rescale_betas_zero_snr");
    mark(o.prediction_type != 0, "prediction_type");
    set
}

/// Every scheduler option name, in proto order.
pub const SCHEDULER_OPTIONS: [&str; 12] = [
    "sigma_schedule",
    "timestep_spacing",
    "steps_offset",
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "final_sigmas_type",
    "eta",
    "rescale_betas_zero_snr",
    "prediction_type",
];

/// The options `scheduler` accepts.
pub fn scheduler_options(scheduler: pb::Scheduler) -> Vec<String> {
    SCHEDULER_OPTIONS
        .iter()
        .filter(|o| option_applies(scheduler, o))
        .map(|o| o.to_string())
        .collect()
}

/// Whether this server implements a scheduler.
pub fn scheduler_supported(scheduler: pb::Scheduler) -> bool {
    scheduler_kind(scheduler).is_some() || scheduler == pb::Scheduler::Unspecified
}

/// The engine's scheduler for a contract scheduler, where implemented.
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
        S::Unspecified => return None,
    })
}

/// The contract scheduler of an engine scheduler.
pub fn scheduler_pb(kind: SchedulerKind) -> pb::Scheduler {
    match kind {
        SchedulerKind::Euler => pb::Scheduler::Euler,
        SchedulerKind::EulerAncestral => pb::Scheduler::EulerAncestral,
        SchedulerKind::Heun => pb::Scheduler::Heun,
        SchedulerKind::Kdpm2 => pb::Scheduler::Kdpm2,
        SchedulerKind::Kdpm2Ancestral => pb::Scheduler::Kdpm2Ancestral,
        SchedulerKind::Lms => pb::Scheduler::Lms,
        SchedulerKind::Ddim => pb::Scheduler::Ddim,
        SchedulerKind::DpmSolverMultistep => pb::Scheduler::DpmSolverMultistep,
        SchedulerKind::UniPc => pb::Scheduler::Unipc,
        SchedulerKind::DpmSolverSinglestep => pb::Scheduler::DpmSolverSinglestep,
    }
}

fn check_scheduler_options(
    scheduler: pb::Scheduler,
    options: &pb::SchedulerOptions,
    prefix: &str,
    violations: &mut Violations,
) {
    for option in options_set(options) {
        if !option_applies(scheduler, option) {
            violations.add(
                format!("{prefix}.{option}"),
                format!("does not apply to scheduler {}", scheduler.as_str_name()),
            );
        }
    }
    decode_enum::<pb::SigmaSchedule>(
        options.sigma_schedule,
        &format!("{prefix}.sigma_schedule"),
        violations,
    );
    decode_enum::<pb::TimestepSpacing>(
        options.timestep_spacing,
        &format!("{prefix}.timestep_spacing"),
        violations,
    );
    decode_enum::<pb::AlgorithmType>(
        options.algorithm_type,
        &format!("{prefix}.algorithm_type"),
        violations,
    );
    decode_enum::<pb::SolverType>(
        options.solver_type,
        &format!("{prefix}.solver_type"),
        violations,
    );
    decode_enum::<pb::FinalSigmasType>(
        options.final_sigmas_type,
        &format!("{prefix}.final_sigmas_type"),
        violations,
    );
    decode_enum::<pb::PredictionType>(
        options.prediction_type,
        &format!("{prefix}.prediction_type"),
        violations,
    );
}

fn options_input(o: &pb::SchedulerOptions) -> SchedulerOptionsInput {
    SchedulerOptionsInput {
        steps_offset: o.steps_offset,
        solver_order: o.solver_order,
        eta: o.eta,
    }
}

fn size_input(s: &Option<pb::Size>) -> Option<SizeInput> {
    s.as_ref().map(|s| SizeInput {
        width: s.width,
        height: s.height,
    })
}

fn point_input(p: &Option<pb::Point>) -> Option<PointInput> {
    p.as_ref().map(|p| PointInput { x: p.x, y: p.y })
}

fn finite(value: f32, field: &str, violations: &mut Violations) {
    if !value.is_finite() {
        violations.add(field, "must be a finite number");
    }
}

/// A1111's name for a scheduler and sigma schedule ("Euler a", "DPM2 Karras").
fn sampler_name(kind: SchedulerKind, options: &pb::SchedulerOptions) -> String {
    let suffix = match pb::SigmaSchedule::try_from(options.sigma_schedule) {
        Ok(pb::SigmaSchedule::Karras) => " Karras",
        Ok(pb::SigmaSchedule::Exponential) => " Exponential",
        Ok(pb::SigmaSchedule::Beta) => " Beta",
        _ => "",
    };
    format!("{}{suffix}", kind.a1111_name())
}

/// The scheduler class and diffusers config keys a request's scheduler and options set.
fn scheduler_overrides(
    scheduler: pb::Scheduler,
    options: &pb::SchedulerOptions,
) -> SchedulerOverrides {
    let mut overrides = SchedulerOverrides {
        class: scheduler_kind(scheduler),
        ..SchedulerOverrides::default()
    };
    match pb::SigmaSchedule::try_from(options.sigma_schedule) {
        Ok(pb::SigmaSchedule::Default) => {
            overrides.set("use_karras_sigmas", false);
            overrides.set("use_exponential_sigmas", false);
            overrides.set("use_beta_sigmas", false);
        }
        Ok(pb::SigmaSchedule::Karras) => overrides.set("use_karras_sigmas", true),
        Ok(pb::SigmaSchedule::Exponential) => overrides.set("use_exponential_sigmas", true),
        Ok(pb::SigmaSchedule::Beta) => overrides.set("use_beta_sigmas", true),
        _ => {}
    }
    match pb::TimestepSpacing::try_from(options.timestep_spacing) {
        Ok(pb::TimestepSpacing::Leading) => overrides.set("timestep_spacing", "leading"),
        Ok(pb::TimestepSpacing::Trailing) => overrides.set("timestep_spacing", "trailing"),
        Ok(pb::TimestepSpacing::Linspace) => overrides.set("timestep_spacing", "linspace"),
        _ => {}
    }
    if let Some(offset) = options.steps_offset {
        overrides.set("steps_offset", offset);
    }
    match pb::FinalSigmasType::try_from(options.final_sigmas_type) {
        Ok(pb::FinalSigmasType::Zero) => overrides.set("final_sigmas_type", "zero"),
        Ok(pb::FinalSigmasType::SigmaMin) => overrides.set("final_sigmas_type", "sigma_min"),
        _ => {}
    }
    if let Some(rescale) = options.rescale_betas_zero_snr {
        overrides.set("rescale_betas_zero_snr", rescale);
    }
    if let Some(eta) = options.eta {
        overrides.set("eta", decimal(eta));
    }
    if let Some(order) = options.solver_order {
        overrides.set("solver_order", order);
    }
    match pb::AlgorithmType::try_from(options.algorithm_type) {
        Ok(pb::AlgorithmType::DpmsolverPlusPlus) => overrides.set("algorithm_type", "dpmsolver++"),
        Ok(pb::AlgorithmType::SdeDpmsolverPlusPlus) => {
            overrides.set("algorithm_type", "sde-dpmsolver++")
        }
        _ => {}
    }
    match pb::SolverType::try_from(options.solver_type) {
        Ok(pb::SolverType::Midpoint) => overrides.set("solver_type", "midpoint"),
        Ok(pb::SolverType::Heun) => overrides.set("solver_type", "heun"),
        Ok(pb::SolverType::Bh1) => overrides.set("solver_type", "bh1"),
        Ok(pb::SolverType::Bh2) => overrides.set("solver_type", "bh2"),
        _ => {}
    }
    if let Some(v) = options.lower_order_final {
        overrides.set("lower_order_final", v);
    }
    if let Some(v) = options.euler_at_final {
        overrides.set("euler_at_final", v);
    }
    match pb::PredictionType::try_from(options.prediction_type) {
        Ok(pb::PredictionType::Epsilon) => overrides.set("prediction_type", "epsilon"),
        Ok(pb::PredictionType::VPrediction) => overrides.set("prediction_type", "v_prediction"),
        _ => {}
    }
    overrides
}

/// Validates a request and resolves it into a job. `seed` is used when the request has
/// none. Every violated field is reported at once.
pub fn to_job_spec(
    spec: Option<pb::GenerationSpec>,
    limits: &Limits,
    registry: &Registry,
    seed: u64,
) -> Result<JobSpec, ApiError> {
    let Some(mut spec) = spec else {
        return Err(ApiError::invalid("spec", "`spec` is required"));
    };
    let mut v = Violations::default();

    // 1. static rules on the domain inputs
    let output = spec.output.unwrap_or_default();
    let input = SpecInput {
        guidance_scale: spec.guidance_scale.unwrap_or(5.0),
        guidance_rescale: spec.guidance_rescale,
        clip_skip: spec.clip_skip,
        seed: spec.seed,
        micro_conditioning: spec
            .micro_conditioning
            .as_ref()
            .map(|m| MicroConditioningInput {
                original_size: size_input(&m.original_size),
                crop_top_left: point_input(&m.crop_top_left),
                target_size: size_input(&m.target_size),
                negative_original_size: size_input(&m.negative_original_size),
                negative_crop_top_left: point_input(&m.negative_crop_top_left),
                negative_target_size: size_input(&m.negative_target_size),
                aesthetic_score: m.aesthetic_score,
                negative_aesthetic_score: m.negative_aesthetic_score,
            }),
        scheduler_options: options_input(&spec.scheduler_options.unwrap_or_default()),
        refiner: spec.refiner.as_ref().map(|r| RefinerInput {
            high_noise_fraction: r.high_noise_fraction,
            strength: r.strength,
            guidance_scale: r.guidance_scale,
            aesthetic_score: r.aesthetic_score,
            negative_aesthetic_score: r.negative_aesthetic_score,
            scheduler_options: options_input(&r.scheduler_options.unwrap_or_default()),
        }),
        loras: spec
            .loras
            .iter()
            .map(|l| LoraInput {
                name: l.name.clone(),
                weight: l.weight.unwrap_or(1.0),
            })
            .collect(),
        controlnets: spec
            .controlnets
            .iter()
            .map(|c| ControlNetInput {
                model: c.model.clone(),
                image: c.image.clone(),
                preprocessor_params: PreprocessorParamsInput {
                    low_threshold: c.preprocessor_params.as_ref().and_then(|p| p.low_threshold),
                    high_threshold: c
                        .preprocessor_params
                        .as_ref()
                        .and_then(|p| p.high_threshold),
                },
                conditioning_scale: c.conditioning_scale,
                guidance_start: c.guidance_start,
                guidance_end: c.guidance_end,
            })
            .collect(),
        init_image: spec.init_image.as_ref().map(|i| InitImageInput {
            image: i.image.clone(),
            strength: i.strength,
            mask_blur: i.mask_blur,
            denoising_start: i.denoising_start,
        }),
        upscales: spec
            .post_processing
            .iter()
            .map(|p| match &p.step {
                Some(pb::post_process_step::Step::Upscale(u)) => UpscaleInput {
                    model: u.model.clone(),
                    factor: u.factor,
                    tile_size: u.tile_size,
                },
                // Reported below as a step that names nothing.
                None => UpscaleInput {
                    model: "-".into(),
                    factor: 2,
                    tile_size: 0,
                },
            })
            .collect(),
        output: OutputInput {
            quality: output.quality,
            preview_every_n_steps: output.preview_every_n_steps,
        },
        client_job_id: spec.client_job_id.clone(),
    };
    if let Err(errors) = input.validate() {
        let renames: BTreeMap<&str, &str> = [("upscales", "post_processing")].into_iter().collect();
        v.extend_from("spec", &errors, &renames);
        // `post_processing[i].upscale.*`: validator saw the upscale fields one level up.
        for (field, message) in v.0.iter_mut() {
            if field.starts_with("spec.post_processing[") {
                if let Some(pos) = field.find("].") {
                    let fixed = format!("{}].upscale.{}", &field[..pos], &field[pos + 2..]);
                    *message = message.replacen(field.as_str(), &fixed, 1);
                    *field = fixed;
                }
            }
        }
    }

    // 2. limits, enums, names, images and cross-field rules
    let max_chars = limits.max_prompt_chars as usize;
    for (field, text) in [
        ("spec.prompt", Some(&spec.prompt)),
        ("spec.prompt_2", spec.prompt_2.as_ref()),
        ("spec.negative_prompt", spec.negative_prompt.as_ref()),
        ("spec.negative_prompt_2", spec.negative_prompt_2.as_ref()),
    ] {
        if let Some(text) = text {
            let n = text.chars().count();
            if n > max_chars {
                v.add(
                    field,
                    format!("must be at most {max_chars} characters, got {n}"),
                );
            }
        }
    }
    if let Some(g) = spec.guidance_scale {
        finite(g, "spec.guidance_scale", &mut v);
    }
    finite(spec.guidance_rescale, "spec.guidance_rescale", &mut v);

    // The model decides default sizes, so resolve it first.
    let mut model = None;
    let mut model_error = None;
    if spec.model.is_empty() {
        model = Some(registry.default_model().clone());
    } else if let Err(RegistryError::InvalidName { reason, .. }) = check_name(&spec.model) {
        v.add(
            "spec.model",
            format!("is not a valid model name ({reason})"),
        );
    } else {
        match registry.resolve(&spec.model) {
            Ok(m) => model = Some(m),
            Err(RegistryError::NotFound(_)) => {}
            Err(RegistryError::InvalidName { reason, .. }) => v.add(
                "spec.model",
                format!("is not a valid model name ({reason})"),
            ),
            Err(RegistryError::Pickle { name, file }) => {
                model_error = Some(ApiError::PickleModel { name, file })
            }
        }
    }
    let default_size = model.as_ref().map_or(1024, |m| m.default_size);
    // Image to image: the init image's size is the output size unless one is given.
    let init_size = spec.init_image.as_ref().and_then(|i| {
        image::ImageReader::new(std::io::Cursor::new(&i.image))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok())
    });
    let width = match (spec.width, init_size) {
        (0, Some((w, _))) => w,
        (0, None) => default_size,
        (w, _) => w,
    };
    let height = match (spec.height, init_size) {
        (0, Some((_, h))) => h,
        (0, None) => default_size,
        (h, _) => h,
    };
    if let Some((w, h)) = init_size {
        if (w, h) != (width, height) {
            v.add(
                "spec.init_image.image",
                format!("is {w}x{h} but the requested size is {width}x{height} (leave width and height at 0 to use the image's)"),
            );
        }
    }
    for (field, value, max) in [
        ("spec.width", width, limits.max_width),
        ("spec.height", height, limits.max_height),
    ] {
        if value % 8 != 0 || value < 64 || value > max {
            v.add(
                field,
                format!("must be a multiple of 8 between 64 and {max}, got {value}"),
            );
        }
    }
    let steps = if spec.steps == 0 { 30 } else { spec.steps };
    if steps > limits.max_steps {
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
    let scheduler = decode_enum::<pb::Scheduler>(spec.scheduler, "spec.scheduler", &mut v);
    let options = spec.scheduler_options.unwrap_or_default();
    if let Some(s) = scheduler {
        check_scheduler_options(s, &options, "spec.scheduler_options", &mut v);
    }
    if let Some(m) = &spec.micro_conditioning {
        if m.negative_original_size.is_some() != m.negative_target_size.is_some() {
            v.add(
                "spec.micro_conditioning.negative_target_size",
                "must be set together with negative_original_size",
            );
        }
    }
    if !spec.vae.is_empty() {
        check_model_name(&spec.vae, "spec.vae", &mut v);
    }
    if let Some(r) = &spec.refiner {
        if !r.model.is_empty() {
            check_model_name(&r.model, "spec.refiner.model", &mut v);
            if decode_enum::<pb::RefinerMode>(r.mode, "spec.refiner.mode", &mut v)
                == Some(pb::RefinerMode::Unspecified)
            {
                v.add(
                    "spec.refiner.mode",
                    "is required when a refiner model is named",
                );
            }
        }
        if r.steps > limits.max_steps {
            v.add(
                "spec.refiner.steps",
                format!("must be at most {}, got {}", limits.max_steps, r.steps),
            );
        }
        if let Some(s) = decode_enum::<pb::Scheduler>(r.scheduler, "spec.refiner.scheduler", &mut v)
        {
            check_scheduler_options(
                s,
                &r.scheduler_options.unwrap_or_default(),
                "spec.refiner.scheduler_options",
                &mut v,
            );
        }
    }
    if spec.loras.len() > MAX_LORAS {
        v.add(
            "spec.loras",
            format!("has {} adapters; at most {MAX_LORAS}", spec.loras.len()),
        );
    }
    for (i, lora) in spec.loras.iter().enumerate() {
        if !lora.name.is_empty() {
            check_model_name(&lora.name, &format!("spec.loras[{i}].name"), &mut v);
            if spec.loras[..i].iter().any(|l| l.name == lora.name) {
                v.add(
                    format!("spec.loras[{i}].name"),
                    format!(
                        "names `{}` a second time (give one adapter one weight)",
                        lora.name
                    ),
                );
            }
        }
        if let Some(w) = lora.weight {
            finite(w, &format!("spec.loras[{i}].weight"), &mut v);
        }
    }
    let max_pixels = u64::from(limits.max_width) * u64::from(limits.max_height) * 4;
    for (i, unit) in spec.controlnets.iter().enumerate() {
        let prefix = format!("spec.controlnets[{i}]");
        if !unit.model.is_empty() {
            check_model_name(&unit.model, &format!("{prefix}.model"), &mut v);
        }
        check_image(&unit.image, &format!("{prefix}.image"), max_pixels, &mut v);
        decode_enum::<pb::Preprocessor>(
            unit.preprocessor,
            &format!("{prefix}.preprocessor"),
            &mut v,
        );
        if let Some(p) = &unit.preprocessor_params {
            if p.detect_resolution != 0 && !(64..=2048).contains(&p.detect_resolution) {
                v.add(
                    format!("{prefix}.preprocessor_params.detect_resolution"),
                    format!(
                        "must be 0 or between 64 and 2048, got {}",
                        p.detect_resolution
                    ),
                );
            }
        }
        let end = unit.guidance_end.unwrap_or(1.0);
        if unit.guidance_start >= end {
            v.add(
                format!("{prefix}.guidance_end"),
                format!(
                    "must be greater than guidance_start ({} >= {end})",
                    unit.guidance_start
                ),
            );
        }
    }
    if let Some(init) = &spec.init_image {
        if init.denoising_start.is_some() && !init.mask.is_empty() {
            v.add(
                "spec.init_image.denoising_start",
                "does not apply to inpainting (a mask is set)",
            );
        }
        let image_size = check_image(&init.image, "spec.init_image.image", max_pixels, &mut v);
        let mask_size = check_image(&init.mask, "spec.init_image.mask", max_pixels, &mut v);
        if let (Some(a), Some(b)) = (image_size, mask_size) {
            if a != b {
                v.add(
                    "spec.init_image.mask",
                    format!("is {}x{} but the image is {}x{}", b.0, b.1, a.0, a.1),
                );
            }
        }
    }
    for (i, step) in spec.post_processing.iter().enumerate() {
        match &step.step {
            None => v.add(format!("spec.post_processing[{i}]"), "names no step"),
            Some(pb::post_process_step::Step::Upscale(u)) => {
                if u.factor == 3 {
                    v.add(
                        format!("spec.post_processing[{i}].upscale.factor"),
                        "must be 2 or 4, got 3",
                    );
                }
                if u.tile_size != 0 && u.tile_size < 64 {
                    v.add(
                        format!("spec.post_processing[{i}].upscale.tile_size"),
                        format!("must be 0 or between 64 and 2048, got {}", u.tile_size),
                    );
                }
                if !u.model.is_empty() {
                    check_model_name(
                        &u.model,
                        &format!("spec.post_processing[{i}].upscale.model"),
                        &mut v,
                    );
                }
            }
        }
    }
    let format = decode_enum::<pb::ImageFormat>(output.format, "spec.output.format", &mut v);
    if !v.0.is_empty() {
        return Err(ApiError::InvalidArgument(v.0));
    }

    // 3. a valid request naming what this server cannot do yet
    let refiner_named = spec.refiner.as_ref().is_some_and(|r| !r.model.is_empty());
    let unimplemented =
        |field: &str, what: &str| Err(ApiError::Unimplemented(field.to_string(), what.to_string()));
    let scheduler = scheduler.unwrap_or(pb::Scheduler::Unspecified);
    if !scheduler_supported(scheduler) {
        return unimplemented(
            "spec.scheduler",
            &format!(
                "scheduler {} is not implemented yet",
                scheduler.as_str_name()
            ),
        );
    }
    if refiner_named && spec.init_image.as_ref().is_some_and(|i| !i.mask.is_empty()) {
        return unimplemented(
            "spec.refiner",
            "the refiner stage after inpainting is not implemented yet",
        );
    }
    if !spec.controlnets.is_empty() {
        return unimplemented("spec.controlnets", "ControlNet is not implemented yet");
    }
    if spec.init_image.as_ref().is_some_and(|i| i.mask_blur > 0) {
        return unimplemented(
            "spec.init_image.mask_blur",
            "mask blur is not implemented yet",
        );
    }
    if !spec.post_processing.is_empty() {
        return unimplemented("spec.post_processing", "upscaling is not implemented yet");
    }
    if let Some(error) = model_error {
        return Err(error);
    }
    let Some(model) = model else {
        return Err(ApiError::ModelNotFound(spec.model.clone()));
    };
    let vae = match spec.vae.as_str() {
        "" => None,
        name => match registry.resolve_kind(ModelKind::Vae, name) {
            Ok(model) => Some(VaeJob {
                sha256: registry.sha256(&model),
                model,
            }),
            Err(_) => return Err(ApiError::ModelNotFound(name.to_string())),
        },
    };
    let mut loras = Vec::with_capacity(spec.loras.len());
    for lora in &spec.loras {
        let model = registry
            .resolve_kind(ModelKind::Lora, &lora.name)
            .map_err(|_| ApiError::ModelNotFound(lora.name.clone()))?;
        loras.push(LoraJob {
            sha256: registry.sha256(&model),
            model,
            weight: lora.weight.unwrap_or(1.0),
        });
    }
    let refiner_model = match spec.refiner.as_ref().filter(|r| !r.model.is_empty()) {
        Some(r) => match registry.resolve_kind(ModelKind::Refiner, &r.model) {
            Ok(m) => Some(m),
            Err(_) => return Err(ApiError::ModelNotFound(r.model.clone())),
        },
        None => None,
    };

    // 4. the resolved job
    let seed = spec.seed.unwrap_or(seed % (MAX_SEED + 1));
    let guidance = spec.guidance_scale.unwrap_or(5.0);
    let pair = |s: &Option<pb::Size>| {
        s.as_ref()
            .map(|s| (i64::from(s.height), i64::from(s.width)))
    };
    let point = |p: &Option<pb::Point>| {
        p.as_ref()
            .map_or((0, 0), |p| (i64::from(p.y), i64::from(p.x)))
    };
    let micro = spec.micro_conditioning.unwrap_or_default();
    let overrides = scheduler_overrides(scheduler, &options);
    let init_image = match &spec.init_image {
        Some(init) => {
            let strength = decimal(init.strength.unwrap_or(0.8));
            if init.denoising_start.is_none() && (f64::from(steps) * strength) < 1.0 {
                return Err(ApiError::invalid(
                    "spec.init_image.strength",
                    &format!("`spec.init_image.strength` {strength} x {steps} steps leaves no step to run"),
                ));
            }
            let image =
                crate::engine::pipeline::InitImage::decode(&init.image, strength).map_err(|e| {
                    ApiError::invalid(
                        "spec.init_image.image",
                        &format!("`spec.init_image.image` {e}"),
                    )
                })?;
            let image = crate::engine::pipeline::InitImage {
                denoising_start: init.denoising_start.map(decimal),
                ..image
            };
            if init.mask.is_empty() {
                Some(image)
            } else {
                Some(image.with_mask(&init.mask).map_err(|e| {
                    ApiError::invalid(
                        "spec.init_image.mask",
                        &format!("`spec.init_image.mask` {e}"),
                    )
                })?)
            }
        }
        None => None,
    };
    let params = GenerateParams {
        batch_first_seed: None,
        init_image,
        prompt: spec.prompt.clone(),
        prompt_2: spec.prompt_2.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        negative_prompt_2: spec.negative_prompt_2.clone(),
        guidance_scale: decimal(guidance),
        guidance_rescale: decimal(spec.guidance_rescale),
        clip_skip: (spec.clip_skip > 0).then_some(i64::from(spec.clip_skip)),
        width: i64::from(width),
        height: i64::from(height),
        steps: steps as usize,
        seed,
        num_images: num_images as usize,
        original_size: pair(&micro.original_size),
        crops_coords_top_left: point(&micro.crop_top_left),
        target_size: pair(&micro.target_size),
        negative_original_size: pair(&micro.negative_original_size),
        negative_crops_coords_top_left: point(&micro.negative_crop_top_left),
        negative_target_size: pair(&micro.negative_target_size),
        scheduler_overrides: overrides,
        denoising_end: None,
        aesthetic_score: micro.aesthetic_score.map_or(6.0, decimal),
        negative_aesthetic_score: micro.negative_aesthetic_score.map_or(2.5, decimal),
    };
    let refiner = match (refiner_model, &spec.refiner) {
        (Some(model), Some(r)) => {
            let mode = match pb::RefinerMode::try_from(r.mode) {
                Ok(pb::RefinerMode::Img2img) => RefinerMode::Img2Img {
                    strength: decimal(r.strength.unwrap_or(0.3)),
                },
                _ => RefinerMode::EnsembleOfExperts {
                    high_noise_fraction: decimal(r.high_noise_fraction.unwrap_or(0.8)),
                },
            };
            let refiner_scheduler = pb::Scheduler::try_from(r.scheduler).unwrap_or_default();
            let refiner_options = r.scheduler_options.unwrap_or_default();
            let steps = if r.steps == 0 {
                params.steps
            } else {
                r.steps as usize
            };
            if let RefinerMode::Img2Img { strength } = mode {
                if (steps as f64 * strength) < 1.0 {
                    return Err(ApiError::invalid(
                        "spec.refiner.strength",
                        &format!("`spec.refiner.strength` {strength} x {steps} steps leaves no step to run"),
                    ));
                }
            }
            Some(RefinerJob {
                sha256: registry.sha256(&model),
                model,
                params: RefinerParams {
                    mode,
                    steps,
                    guidance_scale: r.guidance_scale.map_or(params.guidance_scale, decimal),
                    scheduler_overrides: scheduler_overrides(refiner_scheduler, &refiner_options),
                    aesthetic_score: r.aesthetic_score.map_or(6.0, decimal),
                    negative_aesthetic_score: r.negative_aesthetic_score.map_or(2.5, decimal),
                },
            })
        }
        _ => None,
    };
    let format = match format.unwrap_or(pb::ImageFormat::Unspecified) {
        pb::ImageFormat::Unspecified | pb::ImageFormat::Png => OutputFormat::Png,
        pb::ImageFormat::Jpeg => OutputFormat::Jpeg,
        pb::ImageFormat::Webp => OutputFormat::Webp,
        pb::ImageFormat::LatentsSafetensors => OutputFormat::Latents,
    };
    let quality = if output.quality == 0 {
        90
    } else {
        output.quality as u8
    };

    // The resolved request, as the PNG metadata records it.
    spec.seed = Some(seed);
    spec.width = width;
    spec.height = height;
    spec.steps = steps;
    spec.num_images = num_images;
    spec.guidance_scale = Some(guidance);
    spec.model = model.name.clone();
    let client_job_id = (!spec.client_job_id.is_empty()).then(|| spec.client_job_id.clone());
    Ok(JobSpec {
        params,
        model_sha256: registry.sha256(&model),
        model,
        output: OutputSpec {
            format,
            quality,
            embed_metadata: output.embed_metadata.unwrap_or(true),
            preview_every: output.preview_every_n_steps,
        },
        resolved: spec,
        sampler_name: sampler_name(
            scheduler_kind(scheduler).unwrap_or(SchedulerKind::Euler),
            &options,
        ),
        client_job_id,
        refiner,
        vae,
        loras,
    })
}
