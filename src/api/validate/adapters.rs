//! Adapters: LoRA adapters (names, weights) and ControlNet units (checked in full; the
//! feature itself answers UNIMPLEMENTED until it lands).

use crate::api::status::ApiError;
use crate::api::validate::fields::{float, model_name, optional_float, Range, Violations};
use crate::api::validate::images::probe;
use crate::api::validate::model::named;
use crate::api::validate::preprocessor::preprocessor;
use crate::api::validate::Deferred;
use crate::engine::registry::{ModelKind, Registry};
use crate::jobs::LoraJob;
use crate::proto::v1 as pb;

/// Most LoRA adapters in one request.
pub const MAX_LORAS: usize = 16;
/// Most ControlNet units in one request.
pub const MAX_CONTROLNETS: usize = 8;

/// `spec.loras`: each named once, with a weight in [-2, 2] (default 1).
pub fn loras(
    loras: &[pb::LoraAdapter],
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<LoraJob> {
    // The count first: nothing is done per item of an oversized list.
    if loras.len() > MAX_LORAS {
        v.add(
            "spec.loras",
            format!("has {} adapters; at most {MAX_LORAS}", loras.len()),
        );
        return Vec::new();
    }
    let mut jobs = Vec::with_capacity(loras.len());
    let mut seen = std::collections::HashSet::new();
    for (i, lora) in loras.iter().enumerate() {
        let field = format!("spec.loras[{i}]");
        let weight = optional_float(
            v,
            &format!("{field}.weight"),
            lora.weight,
            Range::closed(-2.0, 2.0),
            1.0,
        );
        let name_field = format!("{field}.name");
        if lora.name.is_empty() {
            v.add(name_field, "is required");
            continue;
        }
        if !model_name(v, &name_field, &lora.name) {
            continue;
        }
        if !seen.insert(lora.name.as_str()) {
            v.add(
                name_field,
                format!(
                    "names `{}` a second time (give one adapter one weight)",
                    lora.name
                ),
            );
            continue;
        }
        if let Some(model) = named(
            registry,
            ModelKind::Lora,
            &lora.name,
            &name_field,
            v,
            deferred,
        ) {
            jobs.push(LoraJob {
                model,
                weight: weight as f32,
            });
        }
    }
    jobs
}

/// `spec.controlnets`: every field checked, so that a client learns of a bad unit before
/// it learns the feature is missing.
pub fn controlnets(
    units: &[pb::ControlNetUnit],
    max_pixels: u64,
    v: &mut Violations,
    deferred: &mut Deferred,
) {
    if units.len() > MAX_CONTROLNETS {
        v.add(
            "spec.controlnets",
            format!("has {} units; at most {MAX_CONTROLNETS}", units.len()),
        );
        return;
    }
    for (i, unit) in units.iter().enumerate() {
        let p = format!("spec.controlnets[{i}]");
        if unit.model.is_empty() {
            v.add(format!("{p}.model"), "is required");
        } else {
            model_name(v, &format!("{p}.model"), &unit.model);
        }
        if unit.image.is_empty() {
            v.add(format!("{p}.image"), "is required");
        } else {
            probe(&unit.image, &format!("{p}.image"), max_pixels, v);
        }
        // The unit's own UNIMPLEMENTED covers the preprocessors too, until it lands.
        let mut unit_deferred = Deferred::default();
        preprocessor(
            &format!("{p}."),
            unit.preprocessor,
            unit.preprocessor_params.as_ref(),
            v,
            &mut unit_deferred,
        );
        if let Some(scale) = unit.conditioning_scale {
            float(
                v,
                &format!("{p}.conditioning_scale"),
                scale,
                Range::closed(0.0, 2.0),
            );
        }
        let start = float(
            v,
            &format!("{p}.guidance_start"),
            unit.guidance_start,
            Range::closed_open(0.0, 1.0),
        );
        let end = optional_float(
            v,
            &format!("{p}.guidance_end"),
            unit.guidance_end,
            Range::open_closed(0.0, 1.0),
            1.0,
        );
        if let Some(start) = start.filter(|s| *s >= end) {
            v.add(
                format!("{p}.guidance_end"),
                format!("must be greater than guidance_start ({start} >= {end})"),
            );
        }
    }
    if !units.is_empty() {
        deferred.unimplemented(ApiError::Unimplemented(
            "spec.controlnets".into(),
            "ControlNet is not implemented yet".into(),
        ));
    }
}
