//! IP-Adapter image prompts: the adapter, its image encoder, its images, their masks, the
//! scale and the layers.

use std::sync::Arc;

use crate::api::validate::fields::enum_value;
use crate::api::validate::fields::{model_name, optional_float, Range, Violations};
use crate::api::validate::images::required_image;
use crate::api::validate::model::named;
use crate::api::validate::Deferred;
use crate::engine::ip_adapter::pixels::composite_over_white;
use crate::engine::ip_adapter::PromptLayers;
use crate::engine::registry::{ModelEntry, ModelKind, Registry};
use crate::jobs::{IpAdapterJob, PromptImage};
use crate::proto::v1 as pb;

/// Most image prompts in one request.
pub const MAX_IP_ADAPTERS: usize = 4;

/// Most images of one image prompt.
pub const MAX_PROMPT_IMAGES: usize = 4;

/// The most an image prompt's long side may exceed its short side: the short side is
/// resized to the encoder's input size before the centre is cropped, so the long side
/// grows with it (a 1×16384 image would become 224×3670016 pixels).
pub const MAX_ASPECT_RATIO: u32 = 64;

/// `spec.ip_adapters`: each a known adapter and image encoder, 1 to 4 decodable images
/// and a scale in [0, 2].
pub fn ip_adapters(
    prompts: &[pb::ImagePrompt],
    base: Option<&ModelEntry>,
    registry: &Registry,
    max_pixels: u64,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<IpAdapterJob> {
    if prompts.len() > MAX_IP_ADAPTERS {
        v.add(
            "spec.ip_adapters",
            format!(
                "has {} image prompts; at most {MAX_IP_ADAPTERS}",
                prompts.len()
            ),
        );
        return Vec::new();
    }
    let mut jobs = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let field = format!("spec.ip_adapters[{i}]");
        let mut model = |kind, name: &str, field: String| {
            if name.is_empty() {
                v.add(field, "is required");
                return None;
            }
            if !model_name(v, &field, name) {
                return None;
            }
            named(registry, kind, name, &field, v, deferred)
        };
        let adapter = model(
            ModelKind::IpAdapter,
            &prompt.adapter,
            format!("{field}.adapter"),
        );
        let encoder = model(
            ModelKind::ImageEncoder,
            &prompt.image_encoder,
            format!("{field}.image_encoder"),
        );
        let images = prompt_images(&prompt.images, &field, max_pixels, v);
        let scale = optional_float(
            v,
            &format!("{field}.scale"),
            prompt.scale,
            Range::closed(0.0, 2.0),
            1.0,
        );
        let layers = layers(prompt.layers, base, &format!("{field}.layers"), v);
        let masks = masks(prompt, &field, max_pixels, v);
        if let (Some(adapter), Some(encoder), Some(images), Some(layers), Some(masks)) =
            (adapter, encoder, images, layers, masks)
        {
            jobs.push(IpAdapterJob {
                adapter,
                encoder,
                images,
                scale,
                layers,
                masks,
            });
        }
    }
    jobs
}

/// An image prompt's layers, each of which the base model's UNet must have.
fn layers(
    value: i32,
    base: Option<&ModelEntry>,
    field: &str,
    v: &mut Violations,
) -> Option<PromptLayers> {
    let layers = match enum_value::<pb::ImagePromptLayers>(v, field, value)? {
        pb::ImagePromptLayers::Unspecified | pb::ImagePromptLayers::All => PromptLayers::All,
        pb::ImagePromptLayers::Style => PromptLayers::Style,
        pb::ImagePromptLayers::Composition => PromptLayers::Composition,
        pb::ImagePromptLayers::StyleAndComposition => PromptLayers::StyleAndComposition,
    };
    let known = base
        .and_then(|m| m.pipeline.as_ref())
        .map(|f| &f.attentions);
    let missing = layers
        .attentions()
        .into_iter()
        .flatten()
        .find(|a| known.is_some_and(|k| !k.iter().any(|known| known == *a)));
    if let Some(attention) = missing {
        v.add(
            field,
            format!("needs `{attention}`, which the base model's UNet does not have (SDXL's has)"),
        );
        return None;
    }
    Some(layers)
}

/// An image prompt's images, decoded and composited onto white.
fn prompt_images(
    images: &[Vec<u8>],
    field: &str,
    max_pixels: u64,
    v: &mut Violations,
) -> Option<Vec<PromptImage>> {
    let field = format!("{field}.images");
    if images.is_empty() {
        v.add(field, "is required (1 to 4 images)");
        return None;
    }
    if images.len() > MAX_PROMPT_IMAGES {
        v.add(
            field,
            format!("has {} images; at most {MAX_PROMPT_IMAGES}", images.len()),
        );
        return None;
    }
    let decoded: Vec<Option<PromptImage>> = images
        .iter()
        .enumerate()
        .map(|(j, bytes)| {
            let field = format!("{field}[{j}]");
            let image = required_image(bytes, &field, max_pixels, v)?;
            let (w, h) = (image.width(), image.height());
            if w.max(h) > w.min(h).saturating_mul(MAX_ASPECT_RATIO) {
                v.add(
                    field,
                    format!("is {w}x{h}; an image prompt's sides may differ at most {MAX_ASPECT_RATIO}-fold"),
                );
                return None;
            }
            Some(PromptImage(Arc::new(composite_over_white(&image))))
        })
        .collect();
    decoded.into_iter().collect()
}

/// An image prompt's masks: none, or one decodable mask per image.
fn masks(
    prompt: &pb::ImagePrompt,
    field: &str,
    max_pixels: u64,
    v: &mut Violations,
) -> Option<Vec<PromptImage>> {
    let field = format!("{field}.masks");
    let (masks, images) = (prompt.masks.len(), prompt.images.len());
    if masks != 0 && masks != images {
        v.add(
            field,
            format!("has {masks} masks for {images} images: one per image, or none"),
        );
        return None;
    }
    let decoded: Vec<Option<PromptImage>> = prompt
        .masks
        .iter()
        .enumerate()
        .map(|(j, bytes)| {
            let mask = required_image(bytes, &format!("{field}[{j}]"), max_pixels, v)?;
            Some(PromptImage(Arc::new(mask.to_rgb8())))
        })
        .collect();
    decoded.into_iter().collect()
}
