//! LoRA adapters: names and weights.

use crate::api::validate::fields::{model_name, optional_float, Range, Violations};
use crate::api::validate::model::named;
use crate::api::validate::Deferred;
use crate::engine::registry::{ModelKind, Registry};
use crate::jobs::LoraJob;
use crate::proto::v1 as pb;

/// Most LoRA adapters in one request.
pub const MAX_LORAS: usize = 16;

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
