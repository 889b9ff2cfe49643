//! An image prompt's pixels as transformers' `CLIPImageProcessor` makes them for the image
//! encoder: transparency composited onto white as Pillow's `alpha_composite` does, the
//! short side resized to the encoder's input size with antialiased bicubic on 8-bit
//! pixels (torch's `_upsample_bicubic2d_aa`, which the processor calls), the centre
//! square cropped, then scaled to [0, 1] and normalised with CLIP's mean and deviation.

use image::{DynamicImage, RgbImage};
use tch::{Device, Kind, Tensor};

/// OpenAI CLIP's per-channel mean and standard deviation.
const MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Pillow's `Image.alpha_composite(white, image)`: its 7-bit fixed-point blend, exact.
pub fn composite_over_white(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    const BITS: u32 = 7;
    let shift_div_255 = |a: u32| ((a >> 8) + a) >> 8;
    let rgba = image.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, pixel) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(pixel[3]);
        if alpha == 0 {
            out.0 = [255, 255, 255];
            continue;
        }
        let blend = 255 * (255 - alpha);
        let out_alpha_255 = alpha * 255 + blend;
        let coef1 = alpha * 255 * 255 * (1 << BITS) / out_alpha_255;
        let coef2 = 255 * (1 << BITS) - coef1;
        for c in 0..3 {
            let mixed = u32::from(pixel[c]) * coef1 + 255 * coef2;
            out[c] = (shift_div_255(mixed + (0x80 << BITS)) >> BITS) as u8;
        }
    }
    rgb
}

/// The size the short side is resized to `size` at, the long side scaled and truncated
/// (transformers' `get_resize_output_image_size`): (height, width).
fn resized(width: u32, height: u32, size: i64) -> (i64, i64) {
    let (w, h) = (i64::from(width), i64::from(height));
    let scaled = |long: i64, short: i64| (size as f64 * long as f64 / short as f64) as i64;
    if h <= w {
        (size, scaled(w, h))
    } else {
        (scaled(h, w), size)
    }
}

/// The encoder's input for `image`: [1, 3, size, size] float32 on `device`.
pub fn clip_pixels(image: &RgbImage, size: i64, device: Device) -> Tensor {
    let (width, height) = image.dimensions();
    let (h, w) = resized(width, height, size);
    // NCHW over the row-major RGB bytes: channels-last, the layout torch's 8-bit
    // antialiased kernels take.
    let bytes = Tensor::from_slice(image.as_raw())
        .view([1, i64::from(height), i64::from(width), 3])
        .permute([0, 3, 1, 2]);
    let resized = if (h, w) == (i64::from(height), i64::from(width)) {
        bytes
    } else {
        bytes.internal_upsample_bicubic2d_aa([h, w], false, None, None)
    };
    // transformers' centre crop: offsets truncated.
    let (top, left) = ((h - size) / 2, (w - size) / 2);
    let cropped = resized.narrow(2, top, size).narrow(3, left, size);
    let mean = Tensor::from_slice(&MEAN).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&STD).view([1, 3, 1, 1]);
    let unit = cropped.to_kind(Kind::Float) / 255.0;
    ((unit - mean.to_kind(Kind::Float)) / std.to_kind(Kind::Float))
        .contiguous()
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_side_becomes_the_size_and_the_long_side_is_truncated() {
        assert_eq!(resized(100, 75, 224), (224, 298));
        assert_eq!(resized(61, 130, 56), (119, 56));
        assert_eq!(resized(64, 64, 224), (224, 224));
    }

    #[test]
    fn opaque_and_transparent_pixels_keep_their_colour_or_become_white() {
        let image = image::RgbaImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgba([10, 20, 30, 255])
            } else {
                image::Rgba([10, 20, 30, 0])
            }
        });
        let rgb = composite_over_white(&DynamicImage::ImageRgba8(image));
        assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 255]);
    }
}
