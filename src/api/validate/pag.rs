//! `spec.pag`: perturbed-attention guidance's scales, and layers the base model's UNet
//! has, checked before admission; ControlNet units in guess mode are refused with it.

use crate::api::validate::fields::{optional_float, Range, Violations};
use crate::engine::registry::ModelEntry;
use crate::engine::request::{Pag, PagLayer};
use crate::proto::v1 as pb;

/// Layers one request may name.
const MAX_LAYERS: usize = 16;

/// The guidance, when the request asks for it.
pub fn pag(
    spec: &pb::GenerationSpec,
    base: Option<&ModelEntry>,
    v: &mut Violations,
) -> Option<Pag> {
    let wire = spec.pag.as_ref()?;
    let scale = optional_float(
        v,
        "spec.pag.scale",
        wire.scale,
        Range::open_closed(0.0, 100.0),
        3.0,
    );
    let adaptive_scale = optional_float(
        v,
        "spec.pag.adaptive_scale",
        wire.adaptive_scale,
        Range::closed(0.0, 1.0),
        0.0,
    );
    let layers = layers(&wire.layers, base, v);
    guess_mode_units(spec, v);
    Some(Pag {
        scale,
        adaptive_scale,
        layers,
    })
}

/// The layers' patterns (`["mid"]` when none), each finding self-attention layers of the
/// base UNet.
fn layers(patterns: &[String], base: Option<&ModelEntry>, v: &mut Violations) -> Vec<PagLayer> {
    if patterns.len() > MAX_LAYERS {
        v.add(
            "spec.pag.layers",
            format!(
                "must name at most {MAX_LAYERS} layers, got {}",
                patterns.len()
            ),
        );
        return Vec::new();
    }
    if patterns.is_empty() {
        return vec![PagLayer::parse("mid").expect("the default layer parses")];
    }
    let known = base
        .and_then(|m| m.pipeline.as_ref())
        .map(|f| &f.self_attentions);
    let mut layers = Vec::with_capacity(patterns.len());
    for (i, pattern) in patterns.iter().enumerate() {
        let field = format!("spec.pag.layers[{i}]");
        match PagLayer::parse(pattern) {
            Err(why) => v.add(field, why),
            Ok(layer) if known.is_some_and(|names| !layer.finds_any(names)) => v.add(
                field,
                format!("{pattern:?} finds no self-attention layer of the base model's UNet"),
            ),
            Ok(layer) => layers.push(layer),
        }
    }
    layers
}

/// Guess mode: diffusers' PAG pipelines run every ControlNet on the whole batch.
fn guess_mode_units(spec: &pb::GenerationSpec, v: &mut Violations) {
    for (i, unit) in spec.controlnets.iter().enumerate() {
        if unit.control_mode == pb::ControlMode::Guess as i32 {
            v.add(
                format!("spec.controlnets[{i}].control_mode"),
                "CONTROL_MODE_GUESS does not combine with spec.pag (the PAG pipelines have no guess mode)",
            );
        }
    }
}
