//! Estimates of what a job needs on the device beyond its weights.

use std::path::Path;

use crate::engine::files::read_json;
use crate::engine::guidance::BatchLayout;
use crate::engine::pipeline::GenerateParams;
use crate::engine::preprocess::detector::DetectorNetwork;

/// What the estimates read of a model's configs (SDXL's values where unreadable).
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Channels of the UNet's first level.
    unet_channels: u64,
    /// Channels of the VAE's first level.
    vae_channels: u64,
    /// The VAE's levels (its latents are 2^(levels - 1) times smaller than the image).
    vae_levels: u32,
    /// The image size the VAE tiles at (its `sample_size`), if any.
    vae_sample_size: Option<u64>,
}

const SDXL: Shape = Shape {
    unet_channels: 320,
    vae_channels: 128,
    vae_levels: 4,
    vae_sample_size: Some(1024),
};

fn shape(path: &Path) -> Shape {
    if path.is_file() {
        let configs = crate::engine::weights::read_header(path)
            .ok()
            .and_then(|(_, m)| {
                crate::engine::loading::single_file::Configs::from_metadata(path, &m).ok()
            });
        let first = |channels: &[i64]| channels.first().map(|&c| c.max(0) as u64);
        return configs.map_or(SDXL, |c| Shape {
            unet_channels: first(&c.unet.block_out_channels).unwrap_or(SDXL.unet_channels),
            vae_channels: first(&c.vae.block_out_channels).unwrap_or(SDXL.vae_channels),
            vae_levels: c.vae.block_out_channels.len().max(1) as u32,
            vae_sample_size: c.vae.sample_size.and_then(|s| u64::try_from(s).ok()),
        });
    }
    let read = |sub: &str| read_json::<serde_json::Value>(&path.join(sub).join("config.json")).ok();
    let channels = |v: &serde_json::Value| {
        v.get("block_out_channels")
            .and_then(serde_json::Value::as_array)
            .cloned()
    };
    let first = |v: &serde_json::Value| channels(v)?.first()?.as_u64();
    let (unet, vae) = (read("unet"), read("vae"));
    let unet_channels = unet.as_ref().and_then(first).unwrap_or(SDXL.unet_channels);
    match vae {
        Some(vae) => Shape {
            unet_channels,
            vae_channels: first(&vae).unwrap_or(SDXL.vae_channels),
            vae_levels: channels(&vae).map_or(SDXL.vae_levels, |c| c.len().max(1) as u32),
            vae_sample_size: vae.get("sample_size").and_then(serde_json::Value::as_u64),
        },
        None => Shape {
            unet_channels,
            ..SDXL
        },
    }
}

/// Rough estimates of the bytes a generation needs beyond the weights, a few tensors of
/// each stage's widest level alive at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerationEstimate {
    /// The UNet's activations at latent resolution for the guided batch of a run of
    /// `num_images` images.
    pub denoising: u64,
    /// The VAE decoder's at full resolution for one image (images are decoded one at a
    /// time).
    pub decoding: u64,
    /// The VAE decoder's tile by tile (diffusers' tiled decode: one tile's activations
    /// and every decoded tile kept for blending); `decoding` where the image fits one
    /// tile.
    pub tiled_decoding: u64,
}

impl GenerationEstimate {
    /// With each image decoded whole.
    pub fn whole(&self) -> u64 {
        self.denoising.saturating_add(self.decoding)
    }

    /// With each image decoded tile by tile.
    pub fn tiled(&self) -> u64 {
        self.denoising.saturating_add(self.tiled_decoding)
    }

    /// The larger of each part of two estimates (of passes that run one after the
    /// other).
    pub fn max(self, other: Self) -> Self {
        Self {
            denoising: self.denoising.max(other.denoising),
            decoding: self.decoding.max(other.decoding),
            tiled_decoding: self.tiled_decoding.max(other.tiled_decoding),
        }
    }
}

fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |a, &b| a.saturating_mul(b))
}

/// The decoder's activations tile by tile, as `AutoencoderKL::decode_tiled` runs: tiles
/// of `sample_size` pixels every three quarters of a tile.
fn tiled_decoding(shape: Shape, (width, height): (u64, u64), element_bytes: u64) -> Option<u64> {
    let factor = 1u64 << shape.vae_levels.saturating_sub(1).min(16);
    let tile = shape.vae_sample_size? / factor;
    let stride = (tile * 3 / 4).max(1);
    let tile_pixels = tile * factor;
    if tile == 0 || (width <= tile_pixels && height <= tile_pixels) {
        return None;
    }
    let (latent_w, latent_h) = (width / factor, height / factor);
    let tiles = latent_w.div_ceil(stride) * latent_h.div_ceil(stride);
    let one_tile = product(&[
        4,
        width.min(tile_pixels),
        height.min(tile_pixels),
        shape.vae_channels,
        element_bytes,
    ]);
    let kept = product(&[
        3,
        element_bytes,
        product(&[tiles, tile_pixels, tile_pixels]).saturating_add(2 * width * height),
    ]);
    Some(one_tile.saturating_add(kept))
}

/// The activation estimates of a generation with `p` on `model`.
pub fn generation_estimate(
    model: &Path,
    p: &GenerateParams,
    element_bytes: u64,
) -> GenerationEstimate {
    let shape = shape(model);
    let (width, height) = (p.width.max(0) as u64, p.height.max(0) as u64);
    let pixels = width * height;
    let latent_pixels = pixels / 64;
    let layout = BatchLayout {
        negative: p.guidance_scale > 1.0,
        prompts: p.prompt_parts() as i64,
        perturbed: p.pag.is_some(),
    };
    let batch = layout.parts() as u64 * p.num_images.max(1) as u64;
    let denoising = product(&[
        8,
        batch,
        latent_pixels,
        shape.unet_channels,
        4,
        element_bytes,
    ]);
    let decoding = product(&[4, pixels, shape.vae_channels, element_bytes]);
    // An image that tiles seamlessly is decoded whole (tiles would not wrap around).
    let tiled_decoding = tiled_decoding(shape, (width, height), element_bytes)
        .filter(|_| p.seamless.is_none())
        .map_or(decoding, |tiled| tiled.min(decoding));
    GenerationEstimate {
        denoising,
        decoding,
        tiled_decoding,
    }
}

/// A rough estimate of the bytes a generation needs beyond the weights with its images
/// decoded whole (see [`generation_estimate`]).
pub fn activation_estimate(model: &Path, p: &GenerateParams, element_bytes: u64) -> u64 {
    generation_estimate(model, p, element_bytes).whole()
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
        // A face at a time: the 64-channel first level of its 384² crop (three alive).
        DetectorNetwork::FaceNet => (192 * 384 * 384, 0),
        // A hand at a time, its largest scale: the 64-channel first level of a 736² input
        // (three alive).
        DetectorNetwork::HandPose => (192 * 736 * 736, 0),
        // The full-resolution refinement: 132 channels in, 128 wide, a few alive.
        DetectorNetwork::NormalBae => (0, 600),
        // At half resolution: 96-channel expansions and the 128-channel joins, a few
        // alive (about 40 channels a pixel), then the output and the canvas.
        DetectorNetwork::Mlsd => (0, 160),
        // The first stage's 60 channels at full resolution, three alive, then the five
        // edge maps.
        DetectorNetwork::PiDiNet => (0, 200),
        // The fusion's 24 channels at full resolution, twice, and the branches' 16 and 32
        // at half resolution (Anyline's line pass, after the network, needs about 40
        // bytes a pixel).
        DetectorNetwork::Teed => (0, 96),
        // The head at the 518² input (64 channels, three alive); the depth resized back.
        DetectorNetwork::DepthAnything => (518 * 518 * 192, 3),
        // The head at the 384² input (128 channels, three alive); the depth resized back.
        DetectorNetwork::Dpt => (384 * 384 * 384, 3),
        // The metric head at the 384×512 input, twice (the mirrored pass): the relative
        // head's 128 channels, the 161-channel condition and its MLP, and the bins'
        // distribution (64 bins, several alive); the depth resized back and mapped.
        DetectorNetwork::ZoeDepth => (384 * 512 * 512, 8),
        // The decoder's last fusion doubled to half resolution (256 channels, a quarter
        // of the pixels: 64 a pixel) beside the output block's 128 and the finest
        // features, a few alive; the depth and its 16- and 8-bit maps.
        DetectorNetwork::Leres => (0, 240),
        // 512-channel features at a quarter of 512², six alive; 150 class logits resized
        // to the image, twice.
        DetectorNetwork::UperNet => (128 * 128 * 512 * 6, 300),
    };
    (fixed + per_pixel * pixels) * element_bytes
}
