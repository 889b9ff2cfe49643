//! Encoding results for clients: PNG (with metadata chunks), JPEG and WebP images,
//! safetensors latents, and latent previews.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};

/// The path of image `index` for an output path: `out.png`, `out-1.png`, `out-2.png`, ...
pub fn numbered_path(path: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    path.with_file_name(name)
}

/// Writes latents as a safetensors file holding one float32 tensor named `latents`.
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("latents".to_string(), latents.shallow_clone());
    crate::engine::demo::save_safetensors(path, &tensors)
}

#[cfg(test)]
mod tests {
    use super::numbered_path;
    use std::path::Path;

    #[test]
    fn numbered_paths_keep_the_extension() {
        assert_eq!(
            numbered_path(Path::new("a/out.png"), 0),
            Path::new("a/out.png")
        );
        assert_eq!(
            numbered_path(Path::new("a/out.png"), 2),
            Path::new("a/out-2.png")
        );
        assert_eq!(numbered_path(Path::new("out"), 1), Path::new("out-1"));
    }

    #[test]
    fn png_keeps_every_pixel_and_both_metadata_chunks() {
        use super::{encode_rgb, OutputFormat, PngMetadata, REQUEST_CHUNK};

        // Odd sizes, a gradient and noise: every filter and run length the encoder meets.
        for (width, height) in [(1, 1), (37, 5), (64, 48), (300, 200)] {
            let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(width * height);
            let pixels: Vec<u8> = (0..width * height * 3)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if (i / 3 / width) % 2 == 0 {
                        (i % 251) as u8
                    } else {
                        (state >> 56) as u8
                    }
                })
                .collect();
            let meta = PngMetadata {
                parameters: "a lighthouse\nSteps: 2".into(),
                request_json: "{\"prompt\":\"a lighthouse\"}".into(),
            };
            let png = encode_rgb(&pixels, width, height, OutputFormat::Png, 100, Some(&meta))
                .expect("encode");
            let mut reader = png::Decoder::new(std::io::Cursor::new(png))
                .read_info()
                .expect("a PNG");
            let mut decoded = vec![0; reader.output_buffer_size().expect("size")];
            let frame = reader.next_frame(&mut decoded).expect("frame");
            assert_eq!((frame.width, frame.height), (width, height));
            assert_eq!(frame.color_type, png::ColorType::Rgb);
            assert!(
                decoded[..frame.buffer_size()] == pixels[..],
                "{width}x{height}"
            );
            let texts: Vec<_> = reader
                .info()
                .utf8_text
                .iter()
                .map(|c| (c.keyword.clone(), c.get_text().expect("text")))
                .collect();
            assert_eq!(
                texts,
                [
                    ("parameters".to_string(), meta.parameters.clone()),
                    (REQUEST_CHUNK.to_string(), meta.request_json.clone())
                ]
            );
        }
    }
}

/// How images are encoded for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// PNG, optionally with metadata chunks.
    Png,
    /// JPEG at a quality in [1, 100].
    Jpeg,
    /// Lossy WebP at a quality in [1, 100].
    Webp,
    /// The latents as safetensors bytes.
    Latents,
}

impl OutputFormat {
    /// The MIME type of the encoding.
    pub fn mime_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
            OutputFormat::Latents => "application/vnd.safetensors",
        }
    }
}

/// Text chunks embedded in PNG output.
#[derive(Debug, Clone, Default)]
pub struct PngMetadata {
    /// A1111's `parameters` text.
    pub parameters: String,
    /// The resolved request as proto3 JSON (chunk `sdxld`).
    pub request_json: String,
}

/// The iTXt keyword of the resolved-request chunk.
pub const REQUEST_CHUNK: &str = "sdxld";

/// Encodes an 8-bit RGB image (`width * height * 3` bytes, row-major).
pub fn encode_rgb(
    pixels: &[u8],
    width: u32,
    height: u32,
    format: OutputFormat,
    quality: u8,
    metadata: Option<&PngMetadata>,
) -> Result<Vec<u8>> {
    let fail =
        |what: &str, e: String| EngineError::InvalidRequest(format!("cannot encode {what}: {e}"));
    match format {
        OutputFormat::Png => {
            let mut out = Vec::new();
            {
                let mut encoder = png::Encoder::new(&mut out, width, height);
                encoder.set_color(png::ColorType::Rgb);
                encoder.set_depth(png::BitDepth::Eight);
                // fdeflate: on 1024² photographs about 35 times faster than the zlib-like
                // default, with files within a few per cent of its size (`cargo bench
                // --bench encode`).
                encoder.set_compression(png::Compression::Fast);
                if let Some(meta) = metadata {
                    encoder
                        .add_itxt_chunk("parameters".into(), meta.parameters.clone())
                        .map_err(|e| fail("PNG", e.to_string()))?;
                    // An upscaled client image has no request that replays it.
                    if !meta.request_json.is_empty() {
                        encoder
                            .add_itxt_chunk(REQUEST_CHUNK.into(), meta.request_json.clone())
                            .map_err(|e| fail("PNG", e.to_string()))?;
                    }
                }
                let mut writer = encoder
                    .write_header()
                    .map_err(|e| fail("PNG", e.to_string()))?;
                writer
                    .write_image_data(pixels)
                    .map_err(|e| fail("PNG", e.to_string()))?;
                writer.finish().map_err(|e| fail("PNG", e.to_string()))?;
            }
            Ok(out)
        }
        OutputFormat::Jpeg => {
            let mut out = Cursor::new(Vec::new());
            let encoder =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            image::ImageEncoder::write_image(
                encoder,
                pixels,
                width,
                height,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| fail("JPEG", e.to_string()))?;
            Ok(out.into_inner())
        }
        OutputFormat::Webp => {
            let encoder = webp::Encoder::from_rgb(pixels, width, height);
            Ok(encoder.encode(f32::from(quality.clamp(1, 100))).to_vec())
        }
        OutputFormat::Latents => Err(EngineError::InvalidRequest(
            "latents are encoded with encode_latents".into(),
        )),
    }
}

/// One image's latents [C, h, w] as safetensors bytes: one float32 tensor `latents` of
/// shape [1, C, h, w].
pub fn encode_latents(latents: &Tensor) -> Result<Vec<u8>> {
    let tensor = latents.to_kind(Kind::Float).unsqueeze(0).contiguous();
    let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
    let values: Vec<f32> = Vec::try_from(tensor.flatten(0, -1))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
    safetensors::tensor::serialize([("latents", view)], None)
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))
}

/// A cheap RGB preview of SDXL latents [C, h, w] at latent resolution: a fixed linear map
/// from the four latent channels to RGB (the approximation preview tools use for SDXL).
/// `None` for latents that do not have four channels.
pub fn latent_preview(latents: &Tensor) -> Option<Tensor> {
    if latents.size().first() != Some(&4) {
        return None;
    }
    let factors = Tensor::from_slice(&[
        0.3651f32, 0.4232, 0.4341, -0.2533, -0.0042, 0.1068, 0.1076, 0.1111, -0.0362, -0.3165,
        -0.2492, -0.2188,
    ])
    .reshape([4, 3]);
    let bias = Tensor::from_slice(&[0.1084f32, -0.0175, -0.0011]);
    let rgb = latents
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
        .permute([1, 2, 0])
        .matmul(&factors)
        + bias;
    Some(
        ((rgb + 1.0) * 127.5)
            .clamp(0.0, 255.0)
            .round()
            .to_kind(Kind::Uint8),
    )
}
