//! Estimates of what a job needs on the device beyond its weights.

use std::path::Path;

use crate::engine::files::read_json;
use crate::engine::pipeline::GenerateParams;

/// Channels of the first UNet and VAE levels of a model (SDXL's when unreadable).
fn first_channels(path: &Path) -> (u64, u64) {
    let first = |v: &serde_json::Value| {
        v.get("block_out_channels")
            .and_then(|c| c.get(0))
            .and_then(serde_json::Value::as_u64)
    };
    if path.is_file() {
        let configs = crate::engine::weights::read_header(path)
            .ok()
            .and_then(|(_, m)| {
                crate::engine::loading::single_file::Configs::from_metadata(path, &m).ok()
            });
        let first = |channels: &[i64]| channels.first().map(|&c| c.max(0) as u64);
        return configs.map_or((320, 128), |c| {
            (
                first(&c.unet.block_out_channels).unwrap_or(320),
                first(&c.vae.block_out_channels).unwrap_or(128),
            )
        });
    }
    let read = |sub: &str| read_json::<serde_json::Value>(&path.join(sub).join("config.json")).ok();
    (
        read("unet").as_ref().and_then(first).unwrap_or(320),
        read("vae").as_ref().and_then(first).unwrap_or(128),
    )
}

/// A rough estimate of the bytes a generation needs beyond the weights: the UNet's
/// widest activations at latent resolution for the guided batch, and the VAE decoder's
/// full-resolution activations, a few tensors of each alive at once.
pub fn activation_estimate(model: &Path, p: &GenerateParams, element_bytes: u64) -> u64 {
    let (unet_channels, vae_channels) = first_channels(model);
    let pixels = (p.width.max(0) as u64) * (p.height.max(0) as u64);
    let latent_pixels = pixels / 64;
    let batch = if p.guidance_scale > 1.0 { 2 } else { 1 };
    let unet = 8 * batch * latent_pixels * unet_channels * 4 * element_bytes;
    let vae = 4 * pixels * vae_channels * element_bytes;
    unet + vae
}
