//! Adapters: LoRA adapters (names, weights) and ControlNet units (model, image,
//! preprocessor, scale, window, resize and control modes).

use std::sync::Arc;

use crate::api::validate::fields::{
    enum_value, float, model_name, optional_float, Range, Violations,
};
use crate::api::validate::images::decode_image;
use crate::api::validate::model::named;
use crate::api::validate::preprocessor::preprocessor;
use crate::api::validate::Deferred;
use crate::engine::control::{ControlMode, ControlUnit, ResizeMode};
use crate::engine::registry::{ModelKind, Registry};
use crate::jobs::{ConditioningImage, ControlNetJob, LoraJob};
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

/// `spec.controlnets`: every field of every unit checked, each image decoded.
pub fn controlnets(
    units: &[pb::ControlNetUnit],
    registry: &Registry,
    max_pixels: u64,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<ControlNetJob> {
    if units.len() > MAX_CONTROLNETS {
        v.add(
            "spec.controlnets",
            format!("has {} units; at most {MAX_CONTROLNETS}", units.len()),
        );
        return Vec::new();
    }
    units
        .iter()
        .enumerate()
        .filter_map(|(i, unit)| {
            controlnet(
                &format!("spec.controlnets[{i}]"),
                unit,
                registry,
                max_pixels,
                v,
                deferred,
            )
        })
        .collect()
}

/// One unit under field path `p`; the job's unit when every field is valid.
fn controlnet(
    p: &str,
    unit: &pb::ControlNetUnit,
    registry: &Registry,
    max_pixels: u64,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<ControlNetJob> {
    let model_field = format!("{p}.model");
    let model = if unit.model.is_empty() {
        v.add(&model_field, "is required");
        None
    } else if model_name(v, &model_field, &unit.model) {
        named(
            registry,
            ModelKind::ControlNet,
            &unit.model,
            &model_field,
            v,
            deferred,
        )
    } else {
        None
    };
    let image_field = format!("{p}.image");
    let image = if unit.image.is_empty() {
        v.add(&image_field, "is required");
        None
    } else {
        decode_image(&unit.image, &image_field, max_pixels, v)
    };
    let preprocessor = preprocessor(
        &format!("{p}."),
        unit.preprocessor,
        unit.preprocessor_params.as_ref(),
        v,
        deferred,
    );
    let settings = unit_settings(p, unit, v);
    let resize =
        match enum_value::<pb::ResizeMode>(v, &format!("{p}.resize_mode"), unit.resize_mode)? {
            pb::ResizeMode::Unspecified | pb::ResizeMode::JustResize => ResizeMode::JustResize,
            pb::ResizeMode::CropAndResize => ResizeMode::CropAndResize,
            pb::ResizeMode::ResizeAndFill => ResizeMode::ResizeAndFill,
        };
    Some(ControlNetJob {
        model: model?,
        image: ConditioningImage(Arc::new(image?)),
        preprocessor: preprocessor?,
        resize,
        unit: settings?,
    })
}

/// A unit's scale, window and mode.
fn unit_settings(p: &str, unit: &pb::ControlNetUnit, v: &mut Violations) -> Option<ControlUnit> {
    let scale = optional_float(
        v,
        &format!("{p}.conditioning_scale"),
        unit.conditioning_scale,
        Range::closed(0.0, 2.0),
        1.0,
    );
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
    let window = match start {
        Some(start) if start >= end => {
            v.add(
                format!("{p}.guidance_end"),
                format!("must be greater than guidance_start ({start} >= {end})"),
            );
            None
        }
        other => other,
    };
    let mode = enum_value::<pb::ControlMode>(v, &format!("{p}.control_mode"), unit.control_mode)
        .map(|mode| match mode {
            pb::ControlMode::Unspecified | pb::ControlMode::Balanced => ControlMode::Balanced,
            pb::ControlMode::Guess => ControlMode::Guess,
        });
    Some(ControlUnit {
        scale,
        guidance_start: window?,
        guidance_end: end,
        mode: mode?,
    })
}
