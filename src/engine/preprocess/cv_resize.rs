//! OpenCV's `cv2.resize` on 8-bit RGB for the filters controlnet_aux uses:
//! `INTER_AREA` to shrink and `INTER_LANCZOS4` to enlarge (its `resize_image`),
//! `INTER_LINEAR` (its detectors' maps back to the image size) and `INTER_CUBIC` (the
//! anime line-art detector's network size), with OpenCV's arithmetic (fixed-point taps
//! of 11 fractional bits for Lanczos, bilinear and area's bilinear stand-in, float32
//! overlap weights for true area averaging), so detection runs on the bytes
//! controlnet_aux hands its detectors. Bicubic is the exception: the OpenCV wheels
//! users run hand it to Intel's IPP, whose float32 arithmetic is reproduced here to
//! within one level on a few pixels in 10^5 rather than bit for bit.

use image::RgbImage;

use super::cv_area_halves;

/// Colour channels.
const CN: usize = 3;
/// Fractional bits of OpenCV's fixed-point resize coefficients.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// A filter of `cv2.resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// `INTER_AREA`: pixel-area averaging when no axis grows.
    Area,
    /// `INTER_LANCZOS4`: an 8×8 Lanczos window.
    Lanczos4,
    /// `INTER_LINEAR`: bilinear, pixel centres aligned.
    Linear,
    /// `INTER_CUBIC`: Keys' bicubic (a = -0.75), pixel centres aligned.
    Cubic,
}

/// `cv2.resize(image, (width, height), interpolation)`.
pub fn resize(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    let source = Plane::of(image);
    let (dw, dh) = (width as usize, height as usize);
    // OpenCV's scales: the inverse of the inverse, as doubles.
    let inv_x = dw as f64 / source.width as f64;
    let inv_y = dh as f64 / source.height as f64;
    let (scale_x, scale_y) = (1.0 / inv_x, 1.0 / inv_y);
    let pixels = match interpolation {
        Interpolation::Area if scale_x >= 1.0 && scale_y >= 1.0 => {
            let integer = |s: f64| (s - s.round_ties_even()).abs() < f64::EPSILON;
            if integer(scale_x) && integer(scale_y) {
                let (sx, sy) = (scale_x.round() as usize, scale_y.round() as usize);
                area_integer(&source, dw, dh, sx, sy)
            } else {
                area_weighted(&source, dw, dh, scale_x, scale_y)
            }
        }
        Interpolation::Area => {
            let x = linear_taps(Some(source.width), dw, scale_x, inv_x);
            let y = linear_taps(None, dh, scale_y, inv_y);
            separable(&source, dw, &x, &y, vertical_linear)
        }
        Interpolation::Linear => {
            let x = bilinear_taps(Some(source.width), dw, scale_x);
            let y = bilinear_taps(None, dh, scale_y);
            separable(&source, dw, &x, &y, vertical_linear)
        }
        Interpolation::Lanczos4 => {
            let x = lanczos_taps(dw, scale_x);
            let y = lanczos_taps(dh, scale_y);
            separable(&source, dw, &x, &y, vertical_lanczos)
        }
        Interpolation::Cubic => {
            let values: Vec<f32> = source.pixels.iter().map(|&v| f32::from(v)).collect();
            let size = (source.width, source.height);
            cubic(&values, CN, size, (dw, dh))
                .into_iter()
                .map(saturate)
                .collect()
        }
    };
    RgbImage::from_raw(width, height, pixels).unwrap_or_else(|| RgbImage::new(width, height))
}

/// An interleaved 8-bit RGB image.
struct Plane<'a> {
    width: usize,
    height: usize,
    pixels: &'a [u8],
}

impl<'a> Plane<'a> {
    fn of(image: &'a RgbImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            pixels: image.as_raw(),
        }
    }

    fn row(&self, y: usize) -> &'a [u8] {
        let stride = self.width * CN;
        &self.pixels[y * stride..(y + 1) * stride]
    }
}

/// `cvRound` of a float to 8 bits: half to even, saturated.
fn saturate(value: f32) -> u8 {
    value.round_ties_even().clamp(0.0, 255.0) as u8
}

/// Integer factors (`resizeAreaFast_`): block sums; 2×2 blocks as `(sum + 2) >> 2`, others
/// as the sum times the float reciprocal of the block's area, rounded.
fn area_integer(source: &Plane, dw: usize, dh: usize, sx: usize, sy: usize) -> Vec<u8> {
    if (sx, sy) == (2, 2) {
        return cv_area_halves::halve(source.pixels, source.width, dw, dh);
    }
    let mut out = vec![0u8; dw * dh * CN];
    let reciprocal = 1.0f32 / (sx * sy) as f32;
    // Each block row's columns summed down first, then each block's columns across.
    let mut columns = vec![0u32; dw * sx * CN];
    for (y, target) in out.chunks_exact_mut(dw * CN).enumerate() {
        columns.fill(0);
        for k in 0..sy {
            let row = &source.row(y * sy + k)[..columns.len()];
            for (sum, &v) in columns.iter_mut().zip(row) {
                *sum += u32::from(v);
            }
        }
        let blocks = columns.chunks_exact(sx * CN);
        for (pixel, block) in target.chunks_exact_mut(CN).zip(blocks) {
            let mut sums = [0u32; CN];
            for source_pixel in block.chunks_exact(CN) {
                for (sum, &v) in sums.iter_mut().zip(source_pixel) {
                    *sum += v;
                }
            }
            for (value, sum) in pixel.iter_mut().zip(sums) {
                *value = saturate(sum as f32 * reciprocal);
            }
        }
    }
    out
}

/// One source pixel's weight in one destination pixel (`DecimateAlpha`).
pub(super) struct Overlap {
    pub(super) source: usize,
    pub(super) destination: usize,
    pub(super) weight: f32,
}

/// `computeResizeAreaTab`: the source cells each destination cell covers, weighted by
/// the covered fraction of the destination cell.
pub(super) fn overlaps(source: usize, destination: usize, scale: f64) -> Vec<Overlap> {
    let mut table = Vec::with_capacity(source * 2);
    for d in 0..destination {
        let start = d as f64 * scale;
        let end = start + scale;
        let cell = scale.min(source as f64 - start);
        let last = (end.floor() as usize).min(source - 1);
        let first = (start.ceil() as usize).min(last);
        let mut push = |source, weight: f64| {
            table.push(Overlap {
                source,
                destination: d,
                weight: weight as f32,
            })
        };
        if first as f64 - start > 1e-3 {
            push(first - 1, (first as f64 - start) / cell);
        }
        for s in first..last {
            push(s, 1.0 / cell);
        }
        if end - last as f64 > 1e-3 {
            push(last, (end - last as f64).min(1.0).min(cell) / cell);
        }
    }
    table
}

/// The horizontal overlaps regrouped by destination pixel (the table lists them in
/// destination order): each one's source pixels and weights in the table's order,
/// padded to the same count with zero weights (on source pixel 0), which leave a sum of
/// non-negative terms as it is.
struct RowTaps {
    per_pixel: usize,
    sources: Vec<usize>,
    weights: Vec<f32>,
}

impl RowTaps {
    fn of(xs: &[Overlap], destinations: usize) -> Self {
        let groups: Vec<&[Overlap]> = xs.chunk_by(|a, b| a.destination == b.destination).collect();
        let per_pixel = groups.iter().map(|g| g.len()).max().unwrap_or(0);
        let mut sources = vec![0usize; destinations * per_pixel];
        let mut weights = vec![0f32; destinations * per_pixel];
        for group in groups {
            let at = group[0].destination * per_pixel;
            for (k, x) in group.iter().enumerate() {
                sources[at + k] = x.source;
                weights[at + k] = x.weight;
            }
        }
        Self {
            per_pixel,
            sources,
            weights,
        }
    }
}

/// One source row weighted along x into `buffer` (`ResizeArea_Invoker`'s row sums:
/// each destination's terms added in the table's order, here in registers).
fn weight_row(row: &[u8], taps: &RowTaps, buffer: &mut [f32]) {
    let n = taps.per_pixel.max(1);
    let pixels = buffer.chunks_exact_mut(CN);
    for ((target, sources), weights) in pixels
        .zip(taps.sources.chunks_exact(n))
        .zip(taps.weights.chunks_exact(n))
    {
        let mut sum = [0f32; CN];
        for (&source, &weight) in sources.iter().zip(weights) {
            let pixel = &row[source * CN..][..CN];
            for (s, &v) in sum.iter_mut().zip(pixel) {
                *s += f32::from(v) * weight;
            }
        }
        target.copy_from_slice(&sum);
    }
}

/// Non-integer shrinking (`ResizeArea_Invoker`): each source row weighted along x into a
/// float buffer, the buffers weighted along y, both in OpenCV's order of float sums.
fn area_weighted(source: &Plane, dw: usize, dh: usize, sx: f64, sy: f64) -> Vec<u8> {
    let xs = RowTaps::of(&overlaps(source.width, dw, sx), dw);
    let ys = overlaps(source.height, dh, sy);
    let width = dw * CN;
    let mut out = vec![0u8; width * dh];
    let mut sums = vec![0f32; width];
    let mut buffer = vec![0f32; width];
    let mut current = 0;
    // A source row shared by two destination rows is weighted along x once.
    let mut weighted_row = None;
    for y in &ys {
        if weighted_row != Some(y.source) {
            weight_row(source.row(y.source), &xs, &mut buffer);
            weighted_row = Some(y.source);
        }
        if y.destination != current {
            let line = &mut out[current * width..(current + 1) * width];
            for ((o, s), b) in line.iter_mut().zip(sums.iter_mut()).zip(&buffer) {
                *o = saturate(*s);
                *s = y.weight * b;
            }
            current = y.destination;
        } else {
            for (s, b) in sums.iter_mut().zip(&buffer) {
                *s += y.weight * b;
            }
        }
    }
    let line = &mut out[current * width..(current + 1) * width];
    for (o, s) in line.iter_mut().zip(&sums) {
        *o = saturate(*s);
    }
    out
}

/// A destination pixel's first source index (unclamped) and fixed-point coefficients.
struct Taps {
    start: Vec<i64>,
    coefficients: Vec<Vec<i32>>,
}

fn fixed(weights: &[f32]) -> Vec<i32> {
    weights
        .iter()
        .map(|w| (w * COEF_SCALE).round_ties_even() as i32)
        .collect()
}

/// Area's bilinear stand-in where an axis grows: OpenCV's area-mode coefficients. Along
/// x (`source` given) a start past the last pixel takes it whole, as OpenCV clamps there;
/// along y only the rows are clamped.
fn linear_taps(source: Option<usize>, destination: usize, scale: f64, inverse: f64) -> Taps {
    let mut taps = Taps {
        start: Vec::with_capacity(destination),
        coefficients: Vec::with_capacity(destination),
    };
    for d in 0..destination {
        let mut s = (d as f64 * scale).floor() as i64;
        let f = ((d + 1) as f64 - (s + 1) as f64 * inverse) as f32;
        let mut f = if f <= 0.0 { 0.0 } else { f - f.floor() };
        if let Some(last) = source.map(|n| n as i64 - 1).filter(|last| s >= *last) {
            (s, f) = (last, 0.0);
        }
        taps.start.push(s);
        taps.coefficients.push(fixed(&[1.0 - f, f]));
    }
    taps
}

/// `INTER_LINEAR` positions: each destination pixel's first source pixel and the weight
/// of the second, pixel centres aligned; along x (`source` given) a start before the
/// first pixel or at the last takes that pixel whole, as OpenCV clamps there; along y
/// only the rows are clamped.
fn linear_positions(source: Option<usize>, destination: usize, scale: f64) -> Vec<(i64, f32)> {
    (0..destination)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let floor = f.floor();
            let (mut s, mut f) = (floor as i64, f - floor);
            if let Some(last) = source.map(|n| n as i64 - 1) {
                if s < 0 {
                    (s, f) = (0, 0.0);
                }
                if s >= last {
                    (s, f) = (last, 0.0);
                }
            }
            (s, f)
        })
        .collect()
}

/// `INTER_LINEAR` taps for 8 bits: the positions' weights in fixed point.
fn bilinear_taps(source: Option<usize>, destination: usize, scale: f64) -> Taps {
    let (start, coefficients) = linear_positions(source, destination, scale)
        .into_iter()
        .map(|(s, f)| (s, fixed(&[1.0 - f, f])))
        .unzip();
    Taps {
        start,
        coefficients,
    }
}

/// Lanczos4 taps: pixel centres aligned, eight source pixels from three before.
fn lanczos_taps(destination: usize, scale: f64) -> Taps {
    let mut taps = Taps {
        start: Vec::with_capacity(destination),
        coefficients: Vec::with_capacity(destination),
    };
    for d in 0..destination {
        let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
        let s = f.floor();
        taps.start.push(s as i64 - 3);
        taps.coefficients.push(fixed(&lanczos4(f - s)));
    }
    taps
}

/// `interpolateLanczos4`: sin(πx/4)·sin(πx)/(πx/4)² through OpenCV's angle-sum table,
/// normalised to sum to one in float32.
pub(super) fn lanczos4(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let quarter = std::f64::consts::PI * 0.25;
    let y0 = f64::from(-(x + 3.0)) * quarter;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut coefficients = [0f32; 8];
    let mut sum = 0f32;
    for (i, (c, cs)) in coefficients.iter_mut().zip(CS).enumerate() {
        let offset = x + 3.0 - i as f32;
        *c = if offset.abs() >= 1e-6 {
            let y = f64::from(-offset) * quarter;
            ((cs[0] * s0 + cs[1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *c;
    }
    let reciprocal = 1.0 / sum;
    coefficients.map(|c| c * reciprocal)
}

/// Sums of a destination row's source rows times their fixed-point coefficients.
type Vertical = fn(&[&[i32]], &[i32]) -> Vec<u8>;

/// Horizontal taps into integer rows (replicated borders), then the vertical pass.
fn separable(source: &Plane, dw: usize, x: &Taps, y: &Taps, vertical: Vertical) -> Vec<u8> {
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let horizontal = |row: &[u8]| -> Vec<i32> {
        let mut out = Vec::with_capacity(dw * CN);
        for (start, coefficients) in x.start.iter().zip(&x.coefficients) {
            for c in 0..CN {
                let sum = coefficients.iter().enumerate().map(|(k, w)| {
                    let s = clamp(start + k as i64, source.width);
                    i32::from(row[s * CN + c]) * w
                });
                out.push(sum.sum());
            }
        }
        out
    };
    let source_rows =
        |start: i64, taps: usize| (0..taps).map(move |k| clamp(start + k as i64, source.height));
    let mut rows: Vec<Vec<i32>> = vec![Vec::new(); source.height];
    for (start, coefficients) in y.start.iter().zip(&y.coefficients) {
        for s in source_rows(*start, coefficients.len()) {
            if rows[s].is_empty() {
                rows[s] = horizontal(source.row(s));
            }
        }
    }
    let mut out = Vec::with_capacity(dw * y.start.len() * CN);
    for (start, coefficients) in y.start.iter().zip(&y.coefficients) {
        let taps: Vec<&[i32]> = source_rows(*start, coefficients.len())
            .map(|s| rows[s].as_slice())
            .collect();
        out.extend(vertical(&taps, coefficients));
    }
    out
}

/// `VResizeLanczos4` with `FixedPtCast`: the integer sum, rounded off 22 bits.
fn vertical_lanczos(rows: &[&[i32]], coefficients: &[i32]) -> Vec<u8> {
    (0..rows[0].len())
        .map(|i| {
            let sum: i64 = rows
                .iter()
                .zip(coefficients)
                .map(|(r, w)| i64::from(r[i]) * i64::from(*w))
                .sum();
            ((sum + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS)).clamp(0, 255) as u8
        })
        .collect()
}

/// `VResizeLinear` for 8 bits: OpenCV's shifts that keep the products in 32 bits.
fn vertical_linear(rows: &[&[i32]], coefficients: &[i32]) -> Vec<u8> {
    let (b0, b1) = (coefficients[0], coefficients[1]);
    rows[0]
        .iter()
        .zip(rows[1])
        .map(|(s0, s1)| ((((b0 * (s0 >> 4)) >> 16) + ((b1 * (s1 >> 4)) >> 16) + 2) >> 2) as u8)
        .collect()
}

/// `cv2.resize(plane, (width, height), INTER_CUBIC)` of a one-channel float32 plane of
/// `size` (width, height), as the IPP-backed wheels compute it.
pub fn resize_plane_cubic(
    plane: &[f32],
    size: (usize, usize),
    width: usize,
    height: usize,
) -> Vec<f32> {
    cubic(plane, 1, size, (width, height))
}

/// Bicubic taps along one axis: four source pixels from one before, the position in
/// double precision and the weights in float32 (IPP's arithmetic).
fn cubic_taps(source: usize, destination: usize) -> Vec<(i64, [f32; 4])> {
    let ratio = source as f64 / destination as f64;
    (0..destination)
        .map(|d| {
            let f = (d as f64 + 0.5) * ratio - 0.5;
            let s = f.floor();
            (s as i64 - 1, keys_cubic((f - s) as f32))
        })
        .collect()
}

/// `interpolateCubic`: Keys' kernel with a = -0.75 at offsets 1 + x, x, 1 - x, 2 - x.
fn keys_cubic(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// Separable bicubic in float32 on interleaved `channels`: rows along x (replicated
/// borders) into float rows, then those along y.
fn cubic(
    values: &[f32],
    channels: usize,
    (width, height): (usize, usize),
    (dw, dh): (usize, usize),
) -> Vec<f32> {
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let xs = cubic_taps(width, dw);
    let ys = cubic_taps(height, dh);
    let stride = width * channels;
    let horizontal = |y: usize| -> Vec<f32> {
        let row = &values[y * stride..(y + 1) * stride];
        let mut out = Vec::with_capacity(dw * channels);
        for (start, weights) in &xs {
            for c in 0..channels {
                let mut sum = 0f32;
                for (k, w) in weights.iter().enumerate() {
                    sum += row[clamp(start + k as i64, width) * channels + c] * w;
                }
                out.push(sum);
            }
        }
        out
    };
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; height];
    let mut out = Vec::with_capacity(dw * dh * channels);
    for (start, weights) in &ys {
        for k in 0..4 {
            let s = clamp(start + k, height);
            if rows[s].is_none() {
                rows[s] = Some(horizontal(s));
            }
        }
        let taps: Vec<&[f32]> = (0..4)
            .filter_map(|k| rows[clamp(start + k, height)].as_deref())
            .collect();
        for i in 0..dw * channels {
            let mut sum = 0f32;
            for (row, w) in taps.iter().zip(weights) {
                sum += row[i] * w;
            }
            out.push(sum);
        }
    }
    out
}

/// `cv2.resize(plane, (width, height), INTER_LINEAR)` of a one-channel float32 plane of
/// `size` (width, height): float weights, each row along x, then the rows along y.
pub fn resize_plane_linear(
    plane: &[f32],
    (width, height): (usize, usize),
    dw: usize,
    dh: usize,
) -> Vec<f32> {
    let xs = linear_positions(Some(width), dw, 1.0 / (dw as f64 / width as f64));
    let ys = linear_positions(None, dh, 1.0 / (dh as f64 / height as f64));
    let horizontal = |y: usize| -> Vec<f32> {
        let row = &plane[y * width..(y + 1) * width];
        xs.iter()
            .map(|&(s, f)| {
                let s = s as usize;
                if f == 0.0 {
                    row[s]
                } else {
                    row[s] * (1.0 - f) + row[s + 1] * f
                }
            })
            .collect()
    };
    let clamp = |i: i64| i.clamp(0, height as i64 - 1) as usize;
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; height];
    let mut out = Vec::with_capacity(dw * dh);
    for &(s, f) in &ys {
        let (a, b) = (clamp(s), clamp(s + 1));
        for r in [a, b] {
            if rows[r].is_none() {
                rows[r] = Some(horizontal(r));
            }
        }
        if let (Some(top), Some(bottom)) = (&rows[a], &rows[b]) {
            out.extend(top.iter().zip(bottom).map(|(t, u)| t * (1.0 - f) + u * f));
        }
    }
    out
}
