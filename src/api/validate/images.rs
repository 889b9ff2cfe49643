//! Image inputs: each decoded once, its size read from the header and checked against
//! the pixel limit before any pixel is decoded.

use std::io::Cursor;

use crate::api::validate::fields::{at_most, optional_float, Range, Violations};
use crate::engine::request::InitImage;
use crate::proto::v1 as pb;

/// An image's pixels, 8-bit RGB.
pub struct Decoded {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB bytes.
    pub rgb: Vec<u8>,
}

fn reader(bytes: &[u8], max_pixels: u64) -> Result<image::ImageReader<Cursor<&[u8]>>, String> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    // Room for the largest allowed image in any pixel format the decoders produce.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(64 << 20));
    reader.limits(limits);
    Ok(reader)
}

fn check_size(
    size: (u32, u32),
    field: &str,
    max_pixels: u64,
    v: &mut Violations,
) -> Option<(u32, u32)> {
    let (w, h) = size;
    if u64::from(w) * u64::from(h) > max_pixels {
        v.add(
            field,
            format!("is {w}x{h}, larger than the {max_pixels}-pixel limit"),
        );
        return None;
    }
    Some(size)
}

/// Decodes `bytes` (PNG, JPEG or WebP) into RGB; a violation when it does not decode or
/// is larger than `max_pixels`.
pub fn decode(bytes: &[u8], field: &str, max_pixels: u64, v: &mut Violations) -> Option<Decoded> {
    let image = decode_image(bytes, field, max_pixels, v)?;
    Some(Decoded {
        width: image.width(),
        height: image.height(),
        rgb: image.to_rgb8().into_raw(),
    })
}

/// The most pixels an image in a request may have: four times the largest output.
pub fn max_image_pixels(limits: &crate::config::Limits) -> u64 {
    u64::from(limits.max_width) * u64::from(limits.max_height) * 4
}

/// A required image field: "is required" when empty, else [`decode_image`].
pub fn required_image(
    bytes: &[u8],
    field: &str,
    max_pixels: u64,
    v: &mut Violations,
) -> Option<image::DynamicImage> {
    if bytes.is_empty() {
        v.add(field, "is required");
        return None;
    }
    decode_image(bytes, field, max_pixels, v)
}

/// Decodes `bytes` (PNG, JPEG or WebP) as stored (grey, alpha and 16-bit kept); a
/// violation when it does not decode or is larger than `max_pixels`.
pub fn decode_image(
    bytes: &[u8],
    field: &str,
    max_pixels: u64,
    v: &mut Violations,
) -> Option<image::DynamicImage> {
    let decoded = reader(bytes, max_pixels)
        .and_then(|r| r.into_decoder().map_err(|e| e.to_string()))
        .map(|decoder| (image::ImageDecoder::dimensions(&decoder), decoder));
    let (size, decoder) = match decoded {
        Ok(d) => d,
        Err(e) => {
            v.add(field, format!("is not a decodable image ({e})"));
            return None;
        }
    };
    check_size(size, field, max_pixels, v)?;
    match image::DynamicImage::from_decoder(decoder) {
        Ok(image) => Some(image),
        Err(e) => {
            v.add(field, format!("is not a decodable image ({e})"));
            None
        }
    }
}

/// An init image's strength must leave a step of the `steps` to run (one entered at a
/// denoising start is the window's rule); a bad strength or start is named once, for
/// itself, not again for the default that stood in for it.
pub fn strength_steps(init: Option<&InitImage>, steps: u32, v: &mut Violations) {
    let field = "spec.init_image.strength";
    if v.names(field) || v.names("spec.init_image.denoising_start") {
        return;
    }
    if let Some(init) = init.filter(|i| i.denoising_start.is_none()) {
        if f64::from(steps) * init.strength < 1.0 {
            v.add(
                field,
                format!("{} x {steps} steps leaves no step to run", init.strength),
            );
        }
    }
}

/// `spec.init_image`: the image, its strength or denoising start, and the mask.
pub fn init_image(init: &pb::InitImage, max_pixels: u64, v: &mut Violations) -> Option<InitImage> {
    let strength = optional_float(
        v,
        "spec.init_image.strength",
        init.strength,
        Range::open_closed(0.0, 1.0),
        0.8,
    );
    at_most(v, "spec.init_image.mask_blur", init.mask_blur, 64);
    if init.mask_blur > 0 && init.mask.is_empty() {
        v.add(
            "spec.init_image.mask_blur",
            "applies to a mask; none is set",
        );
    }
    let denoising_start = init.denoising_start.and_then(|d| {
        crate::api::validate::fields::float(
            v,
            "spec.init_image.denoising_start",
            d,
            Range::open(0.0, 1.0),
        )
    });
    if let Some(pad) = init.padding_mask_crop {
        at_most(v, "spec.init_image.padding_mask_crop", pad, 4096);
        if init.mask.is_empty() {
            v.add(
                "spec.init_image.padding_mask_crop",
                "applies to a mask; none is set",
            );
        }
    }
    if init.denoising_start.is_some() && !init.mask.is_empty() {
        v.add(
            "spec.init_image.denoising_start",
            "does not apply to inpainting (a mask is set)",
        );
    }
    if init.image.is_empty() {
        v.add("spec.init_image.image", "is required");
        return None;
    }
    let image = decode(&init.image, "spec.init_image.image", max_pixels, v);
    let mask = (!init.mask.is_empty())
        .then(|| decode(&init.mask, "spec.init_image.mask", max_pixels, v))
        .flatten();
    let image = image?;
    let mut result = InitImage::new(image.width, image.height, image.rgb, strength);
    result.denoising_start = denoising_start;
    match mask {
        Some(mask) if (mask.width, mask.height) != (image.width, image.height) => {
            v.add(
                "spec.init_image.mask",
                format!(
                    "is {}x{} but the image is {}x{}",
                    mask.width, mask.height, image.width, image.height
                ),
            );
            None
        }
        Some(mask) => Some(result.with_blurred_mask_rgb(&mask.rgb, init.mask_blur)),
        None => Some(result),
    }
}
