//! Pillow's resampling (`Image.resize`, `_imaging`'s `Resample.c`) on 8-bit RGB:
//! separable passes, each output pixel a sum of input pixels times fixed-point
//! coefficients (22 fractional bits) of a Lanczos or bicubic window stretched by the
//! downscaling factor. diffusers' image processor resizes control maps this way (Lanczos,
//! and Pillow's default bicubic for the bands of its resize-and-fill), so maps of another
//! size give diffusers' bytes.

use std::ops::Range;

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

/// One fixed-point unit: a tap of this weight copies its input.
const ONE: i64 = 1 << PRECISION_BITS;

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the span `[from, to)` of
/// `input` pixels to `output` along one axis, for the output pixels `window` only.
fn taps(
    filter: Filter,
    input: usize,
    (from, to): (f64, f64),
    output: u64,
    window: Range<u64>,
) -> Vec<Taps> {
    let scale = (to - from) / output as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    window
        .map(|xx| {
            let center = from + (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let min = ((center - support + 0.5) as i64).max(0) as usize;
            let max = ((center + support + 0.5) as i64).min(input as i64).max(0) as usize;
            let raw: Vec<f64> = (min..max.max(min))
                .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = ONE as f64;
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

/// `taps` reading from an intermediate that starts at input `start`.
fn shift(taps: &mut [Taps], start: usize) {
    for tap in taps {
        tap.first -= start;
    }
}

/// The pixels `columns` x `rows` of `src` ([h][w][3] bytes), copied.
fn cut(src: &[u8], w: usize, columns: Range<usize>, rows: Range<usize>) -> Vec<u8> {
    rows.flat_map(|y| &src[(y * w + columns.start) * 3..(y * w + columns.end) * 3])
        .copied()
        .collect()
}

/// The inputs `taps` read: `[first, end)`.
fn read_span(taps: &[Taps]) -> Range<usize> {
    let first = taps.iter().map(|t| t.first).min().unwrap_or(0);
    let end = taps
        .iter()
        .map(|t| t.first + t.weights.len())
        .max()
        .unwrap_or(first);
    first..end.max(first)
}

/// A fixed-point sum back to 8 bits (Pillow's `clip8`).
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass of `taps` along rows (`horizontal`) or columns of `src` ([h][w][3] bytes),
/// over the lines `lines` across it only: [lines][taps] pixels along rows,
/// [taps][lines] along columns.
fn pass(
    src: &[u8],
    (w, _h): (usize, usize),
    taps: &[Taps],
    horizontal: bool,
    lines: Range<usize>,
) -> Vec<u8> {
    let (out_w, out_h) = if horizontal {
        (taps.len(), lines.len())
    } else {
        (lines.len(), taps.len())
    };
    let mut out = vec![0u8; out_w * out_h * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for (l, line) in lines.enumerate() {
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
            let (x, y) = if horizontal { (o, l) } else { (l, o) };
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
    let whole = Window::whole(u64::from(width.max(1)), u64::from(height.max(1)));
    lanczos_window(image, (u64::from(width), u64::from(height)), whole)
}

/// The pixels `window` of `image` resized to `width` x `height` with Lanczos, computed
/// without the rest: the same bytes as [`lanczos_resize`] cut to the window, for sizes
/// too large to hold (a thin map scaled to cover an output).
pub fn lanczos_window(image: &RgbImage, (width, height): (u64, u64), window: Window) -> RgbImage {
    let full = [
        0.0,
        0.0,
        f64::from(image.width()),
        f64::from(image.height()),
    ];
    resample(Filter::Lanczos, image, (width, height), full, window)
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
    let (width, height) = (u64::from(width.max(1)), u64::from(height.max(1)));
    resample(
        filter,
        image,
        (width, height),
        box_,
        Window::whole(width, height),
    )
}

/// A rectangle of output pixels: columns `x`, rows `y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub x: Range<u64>,
    pub y: Range<u64>,
}

impl Window {
    /// All of a `width` x `height` output.
    pub fn whole(width: u64, height: u64) -> Self {
        Self {
            x: 0..width,
            y: 0..height,
        }
    }
}

/// `window` of the region `box_` of `image` resized to `width` x `height` (sides of 0
/// taken as 1), Pillow's way: each pass only over the lines the next one reads.
fn resample(
    filter: Filter,
    image: &RgbImage,
    (width, height): (u64, u64),
    box_: [f64; 4],
    window: Window,
) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width.max(1), height.max(1));
    let (window_w, window_h) = (
        window.x.end.saturating_sub(window.x.start) as u32,
        window.y.end.saturating_sub(window.y.start) as u32,
    );
    if w == 0 || h == 0 || window_w == 0 || window_h == 0 {
        return RgbImage::new(window_w, window_h);
    }
    let [left, top, right, bottom] = box_;
    // Pillow's conditions for each pass.
    let horizontal = out_w != w as u64 || left != 0.0 || right != out_w as f64;
    let vertical = out_h != h as u64 || top != 0.0 || bottom != out_h as f64;
    let span = |r: &Range<u64>| r.start as usize..r.end as usize;
    let (columns, rows) = (span(&window.x), span(&window.y));
    let x_taps = horizontal.then(|| taps(filter, w, (left, right), out_w, window.x));
    let y_taps = vertical.then(|| taps(filter, h, (top, bottom), out_h, window.y));
    // The pass order changes the 8-bit intermediate. Pillow 13 runs the vertical pass
    // first when it shrinks while the horizontal one grows, else the horizontal first (its
    // choice for images shrunk along both axes depends on more than this: there the two
    // can differ by a few levels on sharp edges). An axis it does not resample is cut.
    let vertical_first = horizontal && vertical && out_w > w as u64 && out_h < h as u64;
    let pixels = match (x_taps, y_taps) {
        (Some(mut x_taps), Some(y_taps)) if vertical_first => {
            let read = read_span(&x_taps);
            let between = pass(image.as_raw(), (w, h), &y_taps, false, read.clone());
            shift(&mut x_taps, read.start);
            pass(
                &between,
                (read.len(), rows.len()),
                &x_taps,
                true,
                0..rows.len(),
            )
        }
        (x_taps, y_taps) => {
            let read = y_taps.as_deref().map_or(rows, read_span);
            let between = match &x_taps {
                Some(x_taps) => pass(image.as_raw(), (w, h), x_taps, true, read.clone()),
                None => cut(image.as_raw(), w, columns.clone(), read.clone()),
            };
            match y_taps {
                Some(mut y_taps) => {
                    shift(&mut y_taps, read.start);
                    let size = (columns.len(), read.len());
                    pass(&between, size, &y_taps, false, 0..columns.len())
                }
                None => between,
            }
        }
    };
    RgbImage::from_raw(window_w, window_h, pixels)
        .unwrap_or_else(|| RgbImage::new(window_w, window_h))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of hashed pixels, so that every tap's weight shows.
    fn noise(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).rotate_left(7);
            image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        })
    }

    /// Windows of a resize equal the whole resize cut there, through either pass order,
    /// with an axis resampled or copied.
    #[test]
    fn a_window_equals_the_whole_resize_cut_there() {
        let cases = [
            ((37, 23), (90, 61)),  // both grow
            ((90, 61), (37, 23)),  // both shrink
            ((40, 90), (100, 30)), // wider, shorter: the vertical pass first
            ((40, 30), (40, 77)),  // the width copied
            ((51, 30), (13, 30)),  // the height copied
        ];
        for ((w, h), (out_w, out_h)) in cases {
            let image = noise(w, h);
            let whole = lanczos_resize(&image, out_w, out_h);
            let (out_w, out_h) = (u64::from(out_w), u64::from(out_h));
            for (x, y) in [(0..out_w, 0..out_h), (3..9, 5..6), (out_w - 4..out_w, 0..2)] {
                let window = Window {
                    x: x.clone(),
                    y: y.clone(),
                };
                let part = lanczos_window(&image, (out_w, out_h), window);
                let cut = image::imageops::crop_imm(
                    &whole,
                    x.start as u32,
                    y.start as u32,
                    (x.end - x.start) as u32,
                    (y.end - y.start) as u32,
                )
                .to_image();
                assert!(part == cut, "{w}x{h} to {out_w}x{out_h}, {x:?} x {y:?}");
            }
        }
    }

    /// A window of a resize too large to hold is computed from the lines it reads only.
    #[test]
    fn a_window_of_a_huge_resize_reads_only_its_lines() {
        let image = noise(1, 200_000);
        let scaled = (64, 12_800_000);
        let window = Window {
            x: 0..64,
            y: 6_399_968..6_400_032,
        };
        let part = lanczos_window(&image, scaled, window);
        assert_eq!(part.dimensions(), (64, 64));
        // Each source row grows to 64 rows and the single column to 64 equal columns.
        let row = |y: u32| -> Vec<[u8; 3]> { (0..64).map(|x| part.get_pixel(x, y).0).collect() };
        assert!(row(0).iter().all(|p| *p == part.get_pixel(0, 0).0));
        assert_ne!(row(0), row(63));
    }
}
