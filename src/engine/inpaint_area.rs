//! Inpainting only the masked area, as diffusers' inpainting pipelines do with
//! `padding_mask_crop` (A1111's "Inpaint area: Only masked"): the mask's bounding box,
//! padded and widened to the generation's aspect ratio (`VaeImageProcessor.
//! get_crop_region`), is cut from the image and the mask and resized to the generation
//! size (`resize_mode="fill"`); the result goes back into the original image through the
//! mask (`apply_overlay`, Pillow's paste, premultiplied-alpha conversions and
//! alpha_composite, bit for bit).

use image::{imageops, RgbImage};

use crate::engine::control::{fit, ResizeMode};
use crate::engine::request::InitImage;

/// A rectangle of the original image, `[x1, x2) × [y1, y2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRegion {
    /// Left edge.
    pub x1: u32,
    /// Top edge.
    pub y1: u32,
    /// Right edge (exclusive).
    pub x2: u32,
    /// Bottom edge (exclusive).
    pub y2: u32,
}

impl CropRegion {
    /// Its width.
    pub fn width(&self) -> u32 {
        self.x2 - self.x1
    }

    /// Its height.
    pub fn height(&self) -> u32 {
        self.y2 - self.y1
    }
}

/// What puts a generation of the cropped area back into the original image.
#[derive(Debug, Clone, PartialEq)]
pub struct PasteBack {
    /// The original image.
    pub original: RgbImage,
    /// The original mask's luminance (as the pipeline read it: blurred when asked).
    pub mask: Vec<u8>,
    /// Where the generation goes.
    pub region: CropRegion,
    /// The padding around the mask the region was found with.
    pub padding: u32,
}

/// The region of a `w` × `h` `mask` (luminance, row-major) to generate at `width` ×
/// `height`: every non-zero pixel inside, `pad` pixels more on each side within the
/// image, then widened (or heightened) evenly to `width / height`, shifted back inside
/// the image. `None` when the mask has no non-zero pixel.
pub fn crop_region(
    mask: &[u8],
    (w, h): (u32, u32),
    (width, height): (u32, u32),
    pad: u32,
) -> Option<CropRegion> {
    let (w, h) = (i64::from(w), i64::from(h));
    let at = |x: i64, y: i64| mask[(y * w + x) as usize];
    let column_set = |x: i64| (0..h).any(|y| at(x, y) != 0);
    let row_set = |y: i64| (0..w).any(|x| at(x, y) != 0);
    let left = (0..w).find(|&x| column_set(x))?;
    let right = (0..w).rev().find(|&x| column_set(x))? + 1;
    let top = (0..h).find(|&y| row_set(y))?;
    let bottom = (0..h).rev().find(|&y| row_set(y))? + 1;
    let pad = i64::from(pad);
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + pad).min(w), (bottom + pad).min(h));
    // diffusers compares the ratios as floats and truncates the size difference.
    let ratio_region = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = f64::from(width) / f64::from(height);
    if ratio_region > ratio_processing {
        let desired = (x2 - x1) as f64 / ratio_processing;
        let diff = (desired - (y2 - y1) as f64) as i64;
        (y1, y2) = widened(y1, y2, diff, h);
    } else {
        let desired = (y2 - y1) as f64 * ratio_processing;
        let diff = (desired - (x2 - x1) as f64) as i64;
        (x1, x2) = widened(x1, x2, diff, w);
    }
    let side = |v: i64| v as u32;
    Some(CropRegion {
        x1: side(x1),
        y1: side(y1),
        x2: side(x2),
        y2: side(y2),
    })
}

/// `[a, b)` grown by `diff` (half before, the rest after), shifted back inside `[0,
/// size)` and clipped to it, as `get_crop_region` does.
fn widened(mut a: i64, mut b: i64, diff: i64, size: i64) -> (i64, i64) {
    a -= diff.div_euclid(2);
    b += diff - diff.div_euclid(2);
    if b >= size {
        let over = b - size;
        b -= over;
        a -= over;
    }
    if a < 0 {
        b -= a;
        a = 0;
    }
    if b >= size {
        b = size;
    }
    (a, b)
}

/// `init` (its pixels as `original`, and its mask) cut to `region` and resized to
/// `width` × `height` the "fill" way (Lanczos inside, the edge lines stretched over the
/// bands), as the pipeline's image and mask processors prepare them.
pub fn crop_init(
    init: &InitImage,
    original: &RgbImage,
    region: CropRegion,
    (width, height): (u32, u32),
) -> InitImage {
    let pixels = crop_map(original, region, original.dimensions(), (width, height)).into_raw();
    let mask = init.mask.as_ref().map(|mask| {
        // The mask is resized as an RGB image of three equal channels: Pillow resamples
        // each channel alone, so each equals the luminance resized.
        let stride = original.width() as usize;
        let cropped = RgbImage::from_fn(region.width(), region.height(), |x, y| {
            let at = (y + region.y1) as usize * stride + (x + region.x1) as usize;
            let l = mask.get(at).copied().unwrap_or(0);
            image::Rgb([l, l, l])
        });
        let fitted = fit(&cropped, width, height, ResizeMode::ResizeAndFill);
        fitted.pixels().map(|p| p[0]).collect()
    });
    InitImage {
        width: i64::from(width),
        height: i64::from(height),
        pixels,
        strength: init.strength,
        mask,
        denoising_start: init.denoising_start,
    }
}

/// A control map of an `image`-sized picture cut to `region` (scaled to the map's own
/// size when it has another) and resized to `width` × `height` the "fill" way, as
/// diffusers' ControlNet inpainting pipeline prepares control images with the crop.
pub fn crop_map(
    map: &RgbImage,
    region: CropRegion,
    image: (u32, u32),
    (width, height): (u32, u32),
) -> RgbImage {
    let (x1, x2) = scaled_span(region.x1, region.x2, image.0, map.width());
    let (y1, y2) = scaled_span(region.y1, region.y2, image.1, map.height());
    let cropped = imageops::crop_imm(map, x1, y1, x2 - x1, y2 - y1).to_image();
    fit(&cropped, width, height, ResizeMode::ResizeAndFill)
}

/// `[a, b)` of a side `from` pixels long, as the same fraction of a side `to` pixels
/// long (rounded to the nearest pixel, at least one pixel wide).
fn scaled_span(a: u32, b: u32, from: u32, to: u32) -> (u32, u32) {
    if from == to || from == 0 {
        return (a.min(to), b.min(to));
    }
    let scale =
        |v: u32| ((u64::from(v) * u64::from(to) + u64::from(from) / 2) / u64::from(from)) as u32;
    let start = scale(a).min(to.saturating_sub(1));
    (start, scale(b).clamp(start + 1, to.max(start + 1)))
}

/// `generated` (of the cropped area, at the generation size) put back into the original
/// image: resized to the region the "crop" way, placed there on black, and the original
/// laid over it where the mask is below 255 (diffusers' `apply_overlay`).
pub fn paste_back(back: &PasteBack, generated: &RgbImage) -> RgbImage {
    let region = back.region;
    let placed = fit(
        generated,
        region.width(),
        region.height(),
        ResizeMode::CropAndResize,
    );
    let mut canvas = RgbImage::new(back.original.width(), back.original.height());
    imageops::replace(
        &mut canvas,
        &placed,
        i64::from(region.x1),
        i64::from(region.y1),
    );
    for ((out, original), &m) in canvas
        .pixels_mut()
        .zip(back.original.pixels())
        .zip(&back.mask)
    {
        // The opaque original pasted onto transparent black through the inverted mask
        // (premultiplied, each byte blended by the mask), then converted back to
        // straight alpha.
        let weight = 255 - u32::from(m);
        let alpha = div255(255 * weight);
        let straight = original
            .0
            .map(|c| unpremultiply(div255(u32::from(c) * weight), alpha));
        out.0 = composite_over(straight, alpha, out.0);
    }
    canvas
}

/// Pillow's `DIV255`: `(a + 128) / 255` rounded as its shifts round.
fn div255(a: u32) -> u32 {
    let t = a + 128;
    ((t >> 8) + t) >> 8
}

/// Pillow's RGBa to RGBA conversion of one channel.
fn unpremultiply(c: u32, alpha: u32) -> u32 {
    if alpha == 0 || alpha == 255 {
        c
    } else {
        ((255 * c) / alpha).min(255)
    }
}

/// Pillow's `alpha_composite` of a straight-alpha `src` over an opaque `dst`.
fn composite_over(src: [u32; 3], alpha: u32, dst: [u8; 3]) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return dst;
    }
    let out_a255 = alpha * 255 + 255 * (255 - alpha);
    let coef1 = alpha * 255 * 255 * (1 << PRECISION_BITS) / out_a255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let shift_div255 = |a: u32| ((a >> 8) + a) >> 8;
    std::array::from_fn(|i| {
        let t = src[i] * coef1 + u32::from(dst[i]) * coef2 + (0x80 << PRECISION_BITS);
        (shift_div255(t) >> PRECISION_BITS) as u8
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_with(w: u32, h: u32, rect: (u32, u32, u32, u32)) -> Vec<u8> {
        let (x1, y1, x2, y2) = rect;
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| {
                if x >= x1 && x < x2 && y >= y1 && y < y2 {
                    255
                } else {
                    0
                }
            })
            .collect()
    }

    #[test]
    fn regions_widen_to_the_generation_ratio_inside_the_image() {
        // A 10×4 box in a 100×80 image, 2 pixels of padding, generated square.
        let mask = mask_with(100, 80, (40, 30, 50, 34));
        let region = crop_region(&mask, (100, 80), (64, 64), 2).expect("a region");
        assert_eq!(
            region,
            CropRegion {
                x1: 38,
                y1: 25,
                x2: 52,
                y2: 39
            }
        );
        // At the right edge the region shifts back inside.
        let mask = mask_with(100, 80, (95, 10, 100, 70));
        let region = crop_region(&mask, (100, 80), (64, 64), 0).expect("a region");
        assert_eq!((region.x2, region.width(), region.height()), (100, 60, 60));
        assert_eq!(
            crop_region(&vec![0; 100 * 80], (100, 80), (64, 64), 8),
            None
        );
    }

    #[test]
    fn maps_of_another_size_are_cut_at_the_same_fraction_of_the_picture() {
        assert_eq!(scaled_span(38, 52, 100, 100), (38, 52));
        assert_eq!(scaled_span(38, 52, 100, 200), (76, 104));
        assert_eq!(scaled_span(25, 39, 76, 38), (13, 20));
        // A region one pixel wide keeps a pixel on a much smaller map, inside it.
        assert_eq!(scaled_span(99, 100, 100, 10), (9, 10));
        assert_eq!(scaled_span(0, 1, 100, 10), (0, 1));
        // The map of a picture cut at its own size is the picture's crop, fitted.
        let map = RgbImage::from_fn(20, 10, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let region = CropRegion {
            x1: 4,
            y1: 2,
            x2: 12,
            y2: 10,
        };
        let cut = crop_map(&map, region, (20, 10), (8, 8));
        assert_eq!(cut, imageops::crop_imm(&map, 4, 2, 8, 8).to_image());
        let twice = imageops::resize(&map, 40, 20, imageops::FilterType::Nearest);
        let cut = crop_map(&twice, region, (20, 10), (16, 16));
        assert_eq!(cut, imageops::crop_imm(&twice, 8, 4, 16, 16).to_image());
    }

    #[test]
    fn a_binary_mask_keeps_the_original_outside_and_the_generation_inside() {
        let original = RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        let back = PasteBack {
            original,
            mask: mask_with(8, 8, (2, 2, 6, 6)),
            region: CropRegion {
                x1: 2,
                y1: 2,
                x2: 6,
                y2: 6,
            },
            padding: 0,
        };
        let out = paste_back(
            &back,
            &RgbImage::from_pixel(4, 4, image::Rgb([200, 100, 50])),
        );
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(3, 3).0, [200, 100, 50]);
    }
}
