//! Pillow's resampling (`Image.resize`, `_imaging`'s `Resample.c`) on 8-bit RGB:
//! separable passes, each output pixel a sum of input pixels times fixed-point
//! coefficients (22 fractional bits) of a Lanczos or bicubic window stretched by the
//! downscaling factor. diffusers' image processor resizes control maps this way (Lanczos,
//! and Pillow's default bicubic for the bands of its resize-and-fill), so maps of another
//! size give diffusers' bytes.

use image::RgbImage;

/// Fractional bits of the fixed-point coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// A resampling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Lanczos, a = 3 (`Image.LANCZOS`).
    Lanczos,
    /// Bicubic, a = -0.5 (`Image.BICUBIC`, `resize`'s default).
    Bicubic,
    /// Triangle (`Image.BILINEAR`).
    Bilinear,
}

impl Filter {
    /// The window's half-width.
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output pixel: the first input index and a coefficient per input.
struct Taps {
    first: usize,
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the span `[from, to)` of
/// `input` pixels to `output` along one axis.
fn taps(filter: Filter, input: usize, (from, to): (f64, f64), output: usize) -> Vec<Taps> {
    let scale = (to - from) / output as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..output)
        .map(|xx| {
            let center = from + (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let min = ((center - support + 0.5) as i64).max(0) as usize;
            let max = ((center + support + 0.5) as i64).min(input as i64).max(0) as usize;
            let raw: Vec<f64> = (min..max.max(min))
                .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            Taps {
                first: min,
                weights,
            }
        })
        .collect()
}

/// A fixed-point sum back to 8 bits (Pillow's `clip8`).
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along rows (`horizontal`) or columns of `src` ([h][w][3] bytes), the span
/// `span` of each to `out_len` pixels.
fn pass(
    filter: Filter,
    src: &[u8],
    (w, h): (usize, usize),
    span: (f64, f64),
    out_len: usize,
    horizontal: bool,
) -> Vec<u8> {
    let (along, across) = if horizontal { (w, h) } else { (h, w) };
    let taps = taps(filter, along, span, out_len);
    let (out_w, out_h) = if horizontal {
        (out_len, h)
    } else {
        (w, out_len)
    };
    let mut out = vec![0u8; out_w * out_h * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for line in 0..across {
        for (o, tap) in taps.iter().enumerate() {
            let mut sums = [half; 3];
            for (k, weight) in tap.weights.iter().enumerate() {
                let i = tap.first + k;
                let (x, y) = if horizontal { (i, line) } else { (line, i) };
                let at = (y * w + x) * 3;
                for (c, sum) in sums.iter_mut().enumerate() {
                    *sum += i64::from(src[at + c]) * weight;
                }
            }
            let (x, y) = if horizontal { (o, line) } else { (line, o) };
            let at = (y * out_w + x) * 3;
            for c in 0..3 {
                out[at + c] = clip8(sums[c]);
            }
        }
    }
    out
}

/// `image` resized to `width` x `height` as Pillow's `resize(..., Image.LANCZOS)` does.
pub fn lanczos_resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let full = [
        0.0,
        0.0,
        f64::from(image.width()),
        f64::from(image.height()),
    ];
    resize_box(Filter::Lanczos, image, width, height, full)
}

/// The region `box_` (left, top, right, bottom; Pillow's `box`, which may be empty along
/// an axis: then the edge there is stretched) of `image` resized to `width` x `height`
/// with `filter`.
pub fn resize_box(
    filter: Filter,
    image: &RgbImage,
    width: u32,
    height: u32,
    box_: [f64; 4],
) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width.max(1) as usize, height.max(1) as usize);
    if w == 0 || h == 0 {
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    let [left, top, right, bottom] = box_;
    // Pillow's conditions for each pass.
    let horizontal = out_w != w || left != 0.0 || right != out_w as f64;
    let vertical = out_h != h || top != 0.0 || bottom != out_h as f64;
    let mut pixels = image.as_raw().clone();
    let mut size = (w, h);
    // The pass order changes the 8-bit intermediate. Pillow 13 runs the vertical pass
    // first when it shrinks while the horizontal one grows, else the horizontal first (its
    // choice for images shrunk along both axes depends on more than this: there the two
    // can differ by a few levels on sharp edges).
    let vertical_first = horizontal && vertical && out_w > w && out_h < h;
    if vertical_first {
        pixels = pass(filter, &pixels, size, (top, bottom), out_h, false);
        size = (w, out_h);
    }
    if horizontal {
        pixels = pass(filter, &pixels, size, (left, right), out_w, true);
        size = (out_w, size.1);
    }
    if vertical && !vertical_first {
        pixels = pass(filter, &pixels, size, (top, bottom), out_h, false);
        size = (size.0, out_h);
    }
    RgbImage::from_raw(size.0 as u32, size.1 as u32, pixels)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}
