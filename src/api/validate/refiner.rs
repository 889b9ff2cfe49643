//! `spec.refiner`: the refiner model, how it takes over, its steps, scheduler, guidance
//! and aesthetic scores.

use crate::api::validate::fields::{enum_value, model_name, optional_float, Range, Violations};
use crate::api::validate::model::named;
use crate::api::validate::sampling::{scheduler, AESTHETIC, GUIDANCE};
use crate::api::validate::Deferred;
use crate::config::Limits;
use crate::engine::registry::{ModelKind, Registry};
use crate::engine::request::{RefinerMode, RefinerParams};
use crate::jobs::RefinerJob;
use crate::proto::v1 as pb;

/// What the base request contributes to the refiner's defaults.
pub struct BaseDefaults {
    /// The base's steps.
    pub steps: u32,
    /// The base's guidance scale.
    pub guidance_scale: f64,
}

/// The refiner stage, when a refiner model is named and resolves.
pub fn refiner(
    r: &pb::RefinerStage,
    base: &BaseDefaults,
    registry: &Registry,
    limits: &Limits,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<RefinerJob> {
    let p = "spec.refiner";
    let high_noise_fraction = optional_float(
        v,
        &format!("{p}.high_noise_fraction"),
        r.high_noise_fraction,
        Range::open(0.0, 1.0),
        0.8,
    );
    let strength = optional_float(
        v,
        &format!("{p}.strength"),
        r.strength,
        Range::open_closed(0.0, 1.0),
        0.3,
    );
    let guidance_scale = optional_float(
        v,
        &format!("{p}.guidance_scale"),
        r.guidance_scale,
        GUIDANCE,
        base.guidance_scale,
    );
    let aesthetic_score = optional_float(
        v,
        &format!("{p}.aesthetic_score"),
        r.aesthetic_score,
        AESTHETIC,
        6.0,
    );
    let negative_aesthetic_score = optional_float(
        v,
        &format!("{p}.negative_aesthetic_score"),
        r.negative_aesthetic_score,
        AESTHETIC,
        2.5,
    );
    if r.steps > limits.max_steps {
        v.add(
            format!("{p}.steps"),
            format!("must be at most {}, got {}", limits.max_steps, r.steps),
        );
    }
    let mode = enum_value::<pb::RefinerMode>(v, &format!("{p}.mode"), r.mode);
    let model = if r.model.is_empty() {
        None
    } else {
        if mode == Some(pb::RefinerMode::Unspecified) {
            v.add(
                format!("{p}.mode"),
                "is required when a refiner model is named",
            );
        }
        model_name(v, &format!("{p}.model"), &r.model)
            .then(|| {
                named(
                    registry,
                    ModelKind::Refiner,
                    &r.model,
                    &format!("{p}.model"),
                    v,
                    deferred,
                )
            })
            .flatten()
    };
    let model_default = model
        .as_ref()
        .and_then(|m| m.pipeline.as_ref())
        .and_then(|f| f.scheduler());
    let (kind, options) = scheduler(
        p,
        r.scheduler,
        r.scheduler_options.as_ref(),
        model_default,
        v,
    );
    let steps = if r.steps == 0 { base.steps } else { r.steps } as usize;
    let mode = match mode? {
        pb::RefinerMode::Img2img => RefinerMode::Img2Img { strength },
        _ => RefinerMode::EnsembleOfExperts {
            high_noise_fraction,
        },
    };
    if let RefinerMode::Img2Img { strength } = mode {
        if !v.names(&format!("{p}.strength")) && (steps as f64 * strength) < 1.0 {
            v.add(
                format!("{p}.strength"),
                format!("{strength} x {steps} steps leaves no step to run"),
            );
        }
    }
    Some(RefinerJob {
        model: model?,
        params: RefinerParams {
            mode,
            steps,
            guidance_scale,
            scheduler_overrides: options.overrides(kind),
            aesthetic_score,
            negative_aesthetic_score,
        },
    })
}
