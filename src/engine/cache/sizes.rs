//! Estimates of what a job needs on the device beyond its weights.

use std::path::Path;

use crate::engine::files::read_json;
use crate::engine::pipeline::GenerateParams;
use crate::engine::preprocess::detector::DetectorNetwork;

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
/// widest activations at latent resolution for the guided batch of a run of
/// `p.num_images` images, and the VAE decoder's full-resolution activations for one image
/// (images are decoded one at a time), a few tensors of each alive at once.
pub fn activation_estimate(model: &Path, p: &GenerateParams, element_bytes: u64) -> u64 {
    let (unet_channels, vae_channels) = first_channels(model);
    let pixels = (p.width.max(0) as u64) * (p.height.max(0) as u64);
    let latent_pixels = pixels / 64;
    let guided = if p.guidance_scale > 1.0 { 2 } else { 1 };
    let batch = guided * p.num_images.max(1) as u64;
    let unet = [batch, latent_pixels, unet_channels, 4, element_bytes]
        .into_iter()
        .fold(8u64, u64::saturating_mul);
    let vae = [pixels, vae_channels, element_bytes]
        .into_iter()
        .fold(4u64, u64::saturating_mul);
    unet.saturating_add(vae)
}

/// A rough estimate of the bytes encoding a prompt pair takes beyond the weights: the
/// widest text encoder's residual stream, attention projections and MLP for two
/// sequences of its full length, and their attention maps.
pub fn text_encoding_estimate(model: &Path, element_bytes: u64) -> u64 {
    // SDXL's OpenCLIP ViT-bigG: hidden size, MLP size, heads, tokens.
    let sdxl = (1280, 5120, 20, 77);
    let read = |sub: &str| {
        let config = read_json::<serde_json::Value>(&model.join(sub).join("config.json")).ok()?;
        let field = |name: &str| config.get(name).and_then(serde_json::Value::as_u64);
        Some((
            field("hidden_size")?,
            field("intermediate_size")?,
            field("num_attention_heads")?,
            field("max_position_embeddings")?,
        ))
    };
    let (hidden, mlp, heads, tokens) = if model.is_file() {
        sdxl
    } else {
        read("text_encoder_2")
            .or_else(|| read("text_encoder"))
            .unwrap_or(sdxl)
    };
    2 * (tokens * (4 * hidden + 2 * mlp) + heads * tokens * tokens) * element_bytes
}

/// A rough estimate of the bytes a detector needs beyond its weights on a
/// `width`×`height` image (at the detection size): the elements alive at its peak, a
/// fixed part where the network runs at its processor's size and a part per image pixel
/// (a few tensors of its widest full-resolution level, or the maps it brings back to the
/// image).
pub fn detector_activation_estimate(
    network: DetectorNetwork,
    (width, height): (u64, u64),
    element_bytes: u64,
) -> u64 {
    let pixels = width * height;
    let (fixed, per_pixel): (u64, u64) = match network {
        // Three 64-channel tensors at full resolution.
        DetectorNetwork::Lineart | DetectorNetwork::Hed => (0, 192),
        // 128 channels at half resolution, three alive.
        DetectorNetwork::LineartAnime => (0, 96),
        // The network's 64-channel first level on the image scaled to a height of 184
        // (three tensors alive), and the 57 heatmaps and fields at the image's size in
        // float and double precision.
        DetectorNetwork::OpenPose => (192 * 184 * 184 * width / height.max(1), 57 * 3),
        // The full-resolution refinement: 132 channels in, 128 wide, a few alive.
        DetectorNetwork::NormalBae => (0, 600),
        // The head at the 518² input (64 channels, three alive); the depth resized back.
        DetectorNetwork::DepthAnything => (518 * 518 * 192, 3),
        // The head at the 384² input (128 channels, three alive); the depth resized back.
        DetectorNetwork::Dpt => (384 * 384 * 384, 3),
        // 512-channel features at a quarter of 512², six alive; 150 class logits resized
        // to the image, twice.
        DetectorNetwork::UperNet => (128 * 128 * 512 * 6, 300),
    };
    (fixed + per_pixel * pixels) * element_bytes
}
