//! Encoding finished images and previews for clients (off the device thread).

use crate::engine::error::EngineError;
use crate::engine::profile;
use crate::jobs::events::{EncodedImage, FinishedImage, ImageContent, RgbImage};
use crate::output::{encode_latents, encode_rgb, OutputFormat};

/// Encodes a finished image in its requested format.
pub fn encode(image: &FinishedImage) -> Result<EncodedImage, EngineError> {
    let _stage = profile::span("image_encode");
    match &image.content {
        ImageContent::Latents(latents) => Ok(EncodedImage {
            data: encode_latents(latents)?,
            mime_type: OutputFormat::Latents.mime_type(),
            width: image.width,
            height: image.height,
        }),
        ImageContent::Rgb(rgb) => Ok(EncodedImage {
            data: encode_rgb(
                &rgb.pixels,
                rgb.width,
                rgb.height,
                image.format,
                image.quality,
                image.metadata.as_ref(),
            )?,
            mime_type: image.format.mime_type(),
            width: rgb.width,
            height: rgb.height,
        }),
    }
}

/// A preview as a PNG without metadata.
pub fn encode_preview(rgb: &RgbImage) -> Option<EncodedImage> {
    let data = encode_rgb(
        &rgb.pixels,
        rgb.width,
        rgb.height,
        OutputFormat::Png,
        0,
        None,
    )
    .ok()?;
    Some(EncodedImage {
        data,
        mime_type: OutputFormat::Png.mime_type(),
        width: rgb.width,
        height: rgb.height,
    })
}
