//! The base model, the image size (which defaults to the model's or the init image's),
//! and `clip_skip`, bounded by the depth of the text encoders that will see it.

use crate::api::status::ApiError;
use crate::api::validate::fields::{image_side, model_name, Violations};
use crate::api::validate::Deferred;
use crate::config::Limits;
use crate::engine::registry::{ModelEntry, ModelKind, Registry};
use crate::proto::v1 as pb;

/// `spec.model`: the model, when it resolves; a name no root holds (or a pickle file) is
/// deferred until the request is otherwise valid.
pub fn base(
    spec: &pb::GenerationSpec,
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<ModelEntry> {
    if spec.model.is_empty() {
        return Some(registry.default_model().clone());
    }
    if !model_name(v, "spec.model", &spec.model) {
        return None;
    }
    named(
        registry,
        ModelKind::Base,
        &spec.model,
        "spec.model",
        v,
        deferred,
    )
}

/// An inpainting model (its UNet takes a mask and the masked image beside the latents)
/// runs only on an init image with a mask.
pub fn inpainting_inputs(
    spec: &pb::GenerationSpec,
    model: Option<&ModelEntry>,
    v: &mut Violations,
) {
    let Some(model) = model.filter(|m| m.pipeline.as_ref().is_some_and(|f| f.inpainting)) else {
        return;
    };
    let why = format!(
        "is required: `{}` is an inpainting model (its UNet takes a mask and the masked image)",
        model.name
    );
    match &spec.init_image {
        None => v.add("spec.init_image", why),
        Some(init) if init.mask.is_empty() => v.add("spec.init_image.mask", why),
        Some(_) => {}
    }
}

/// A model of `kind` by name: resolved, or a deferred NOT_FOUND / FAILED_PRECONDITION.
pub fn named(
    registry: &Registry,
    kind: ModelKind,
    name: &str,
    field: &str,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<ModelEntry> {
    let resolved = if kind == ModelKind::Base {
        registry.resolve(name)
    } else {
        registry.resolve_kind(kind, name)
    };
    match resolved {
        Ok(model) => Some(model),
        Err(e) => {
            match ApiError::from(e) {
                ApiError::InvalidArgument(_) => {
                    v.add(field, "is not a valid model name");
                }
                error => deferred.missing(error),
            }
            None
        }
    }
}

/// `spec.vae`: a VAE replacing the models' own, if named.
pub fn vae(
    spec: &pb::GenerationSpec,
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<ModelEntry> {
    match spec.vae.as_str() {
        "" => None,
        name if model_name(v, "spec.vae", name) => {
            named(registry, ModelKind::Vae, name, "spec.vae", v, deferred)
        }
        _ => None,
    }
}

/// `spec.width` and `spec.height`: the model's default size, or the init image's (rounded
/// down to multiples of 8 when only its masked area is generated, at any size).
pub fn size(
    spec: &pb::GenerationSpec,
    model: Option<&ModelEntry>,
    init_size: Option<(u32, u32)>,
    limits: &Limits,
    v: &mut Violations,
) -> (u32, u32) {
    let default_size = model.map_or(1024, ModelEntry::default_size);
    let masked_area = crate::api::validate::inpaint_area::asked(spec);
    let pick = |asked: u32, from_image: Option<u32>| match (asked, from_image) {
        (0, Some(size)) if masked_area => (size / 8 * 8).max(64),
        (0, Some(size)) => size,
        (0, None) => default_size,
        (asked, _) => asked,
    };
    let width = pick(spec.width, init_size.map(|s| s.0));
    let height = pick(spec.height, init_size.map(|s| s.1));
    if let Some((w, h)) = init_size.filter(|_| !masked_area) {
        if (w, h) != (width, height) {
            v.add(
                "spec.init_image.image",
                format!("is {w}x{h} but the requested size is {width}x{height} (leave width and height at 0 to use the image's)"),
            );
        }
    }
    image_side(v, "spec.width", width, limits.max_width);
    image_side(v, "spec.height", height, limits.max_height);
    (width, height)
}

/// `spec.clip_skip`: as diffusers reads `hidden_states[-(clip_skip + 2)]` of every text
/// encoder that sees the prompt, at most the shallowest one's depth less one (11 for
/// SDXL). `models` are the pipelines that encode it (the base, and a refiner).
pub fn clip_skip(
    spec: &pb::GenerationSpec,
    models: &[&ModelEntry],
    v: &mut Violations,
) -> Option<i64> {
    if spec.clip_skip == 0 {
        return None;
    }
    let layers = models
        .iter()
        .filter_map(|m| m.pipeline.as_ref())
        .map(|p| p.text_encoder_layers)
        .min();
    // Without readable configs the text encoders refuse it themselves.
    let max = layers.map_or(u32::MAX, |l| l.saturating_sub(1));
    if spec.clip_skip > max {
        v.add(
            "spec.clip_skip",
            format!(
                "must be at most {max} (the text encoders have {} layers), got {}",
                max + 1,
                spec.clip_skip
            ),
        );
        return None;
    }
    Some(i64::from(spec.clip_skip))
}
