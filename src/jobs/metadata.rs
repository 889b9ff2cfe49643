//! What a PNG says about how it was made: A1111's `parameters` text (which image tools
//! read) and the resolved request that replays it exactly.

use crate::engine::registry::ModelKind;
use crate::engine::request::RefinerMode;
use crate::jobs::events::ModelUsed;
use crate::jobs::JobSpec;
use crate::output::PngMetadata;

/// The first `n` characters of a hash (A1111 shows short hashes).
fn short(hash: &str, n: usize) -> &str {
    &hash[..hash.len().min(n)]
}

/// The hash of the model of `kind` named `name` among those the job used.
fn hash_of<'a>(models: &'a [ModelUsed], kind: ModelKind, name: &str) -> &'a str {
    models
        .iter()
        .find(|m| m.kind == kind && m.name == name)
        .map_or("", |m| m.sha256.as_str())
}

/// The metadata of image `index` (seed `seed`) of `spec`, which used `models`.
pub fn png_metadata(spec: &JobSpec, models: &[ModelUsed], index: usize, seed: u64) -> PngMetadata {
    PngMetadata {
        parameters: a1111_parameters(spec, models, seed),
        request_json: spec.replay.get(index).cloned().unwrap_or_default(),
    }
}

/// A1111's `parameters` text for one image.
fn a1111_parameters(spec: &JobSpec, models: &[ModelUsed], seed: u64) -> String {
    let p = &spec.params;
    let mut text = p.prompt.clone();
    // A1111 writes the LoRAs a prompt used into the prompt itself.
    for lora in &spec.loras {
        text.push_str(&format!(" <lora:{}:{}>", lora.model.name, lora.weight));
    }
    if let Some(negative) = &p.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    let hash = hash_of(models, ModelKind::Base, &spec.model.name);
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}, Version: sdxld {}",
        p.steps,
        spec.sampler_name,
        p.guidance_scale,
        seed,
        p.width,
        p.height,
        short(hash, 10),
        spec.model.name,
        env!("CARGO_PKG_VERSION"),
    ));
    if p.guidance_rescale > 0.0 {
        text.push_str(&format!(", CFG rescale: {}", p.guidance_rescale));
    }
    if let Some(vae) = &spec.vae {
        let hash = hash_of(models, ModelKind::Vae, &vae.name);
        text.push_str(&format!(
            ", VAE hash: {}, VAE: {}",
            short(hash, 10),
            vae.name
        ));
    }
    if !spec.loras.is_empty() {
        let hashes: Vec<String> = spec
            .loras
            .iter()
            .map(|l| {
                let hash = hash_of(models, ModelKind::Lora, &l.model.name);
                format!("{}: {}", l.model.name, short(hash, 12))
            })
            .collect();
        text.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
    }
    if let Some(refiner) = &spec.refiner {
        let hash = hash_of(models, ModelKind::Refiner, &refiner.model.name);
        text.push_str(&format!(
            ", Refiner: {} [{}]",
            refiner.model.name,
            short(hash, 10)
        ));
        match refiner.params.mode {
            RefinerMode::EnsembleOfExperts {
                high_noise_fraction,
            } => text.push_str(&format!(", Refiner switch at: {high_noise_fraction}")),
            RefinerMode::Img2Img { strength } => {
                text.push_str(&format!(", Refiner strength: {strength}"))
            }
        }
    }
    text
}
