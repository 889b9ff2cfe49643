//! OpenCV's `cv2.GaussianBlur` with `ksize=(0, 0)` (the kernel size from σ) and
//! `BORDER_REFLECT_101`, in OpenCV's own arithmetic so the results equal its:
//! - float32 images (any number of interleaved channels), as OpenCV's AVX2 build sums
//!   them: each row left to right with fused multiply-adds, except the last few values of
//!   a row (which its scalar tail sums without fusing); then down the columns, the
//!   centre first and each symmetric pair of rows added before its tap, fused except
//!   after the last multiple of eight values;
//! - 8-bit planes bit-exactly, in fixed point.

/// Fractional bits of the 8-bit Gaussian's fixed-point kernel.
const KERNEL_BITS: u32 = 8;

/// OpenCV's kernel size for `sigma`: `cvRound(σ·4·2 + 1) | 1` for float images,
/// `cvRound(σ·3·2 + 1) | 1` for 8-bit ones.
pub fn kernel_size(sigma: f64, float: bool) -> usize {
    let reach = if float { 4.0 } else { 3.0 };
    ((sigma * reach * 2.0 + 1.0).round_ties_even() as usize) | 1
}

/// `borderInterpolate` with `BORDER_REFLECT_101`.
pub fn reflect(p: i64, len: usize) -> usize {
    let len = len as i64;
    if len == 1 {
        return 0;
    }
    let mut p = p;
    while p < 0 || p >= len {
        p = if p < 0 { -p } else { 2 * len - 2 - p };
    }
    p as usize
}

/// `getGaussianKernelBitExact` in double precision: the normalised taps.
pub fn gaussian_kernel(taps: usize, sigma: f64) -> Vec<f64> {
    let centre = (taps - 1) / 2;
    let side: Vec<f64> = (0..centre)
        .map(|i| {
            let x = i as f64 - centre as f64;
            (-(x * x) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum = 2.0 * side.iter().sum::<f64>() + 1.0;
    let mut kernel = vec![0.0; taps];
    for (i, v) in side.iter().enumerate() {
        kernel[i] = v / sum;
        kernel[taps - 1 - i] = v / sum;
    }
    kernel[centre] = 1.0 / sum;
    kernel
}

/// `cv2.GaussianBlur(image, (0, 0), sigma)` of a float32 image of `width`×`height`
/// pixels of `channels` interleaved values.
pub fn blur_f32(values: &[f32], size: (usize, usize), channels: usize, sigma: f64) -> Vec<f32> {
    let kernel: Vec<f32> = gaussian_kernel(kernel_size(sigma, true), sigma)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled with.
        return unsafe { blur_f32_avx2(values, size, channels, &kernel) };
    }
    blur_passes(values, size, channels, &kernel)
}

/// [`blur_passes`] compiled with fused multiply-adds and 256-bit vectors (the same
/// results, faster).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn blur_f32_avx2(
    values: &[f32],
    size: (usize, usize),
    channels: usize,
    kernel: &[f32],
) -> Vec<f32> {
    blur_passes(values, size, channels, kernel)
}

/// The row filter, then the column filter.
#[inline(always)]
fn blur_passes(
    values: &[f32],
    (width, height): (usize, usize),
    channels: usize,
    kernel: &[f32],
) -> Vec<f32> {
    let row_len = width * channels;
    if row_len == 0 || height == 0 {
        return Vec::new();
    }
    let half = kernel.len() / 2;
    let mut padded = vec![0f32; (width + 2 * half) * channels];
    let mut rows = vec![0f32; values.len()];
    for (row, out) in values
        .chunks_exact(row_len)
        .zip(rows.chunks_exact_mut(row_len))
    {
        for (j, pixel) in padded.chunks_exact_mut(channels).enumerate() {
            let source = reflect(j as i64 - half as i64, width) * channels;
            pixel.copy_from_slice(&row[source..source + channels]);
        }
        blur_row(&padded, out, channels, kernel);
    }
    blur_columns(&rows, row_len, height, kernel)
}

/// Where OpenCV's vector loops over a row of `len` values stop: after the 8-wide loop,
/// and after the 4-wide one that follows it in the row filter.
fn vector_ends(len: usize) -> (usize, usize) {
    let eights = len / 8 * 8;
    (eights, eights + (len - eights) / 4 * 4)
}

/// The row filter of one row (`padded` with its reflected borders) into `out`: every tap
/// from the left, fused where OpenCV's vector loops run.
#[inline(always)]
fn blur_row(padded: &[f32], out: &mut [f32], channels: usize, kernel: &[f32]) {
    let (_, fused_end) = vector_ends(out.len());
    for (o, &x) in out.iter_mut().zip(padded) {
        *o = x * kernel[0];
    }
    for (k, &w) in kernel.iter().enumerate().skip(1) {
        let taps = &padded[k * channels..];
        let (fused, tail) = out.split_at_mut(fused_end);
        for (o, &x) in fused.iter_mut().zip(taps) {
            *o = x.mul_add(w, *o);
        }
        for (o, &x) in tail.iter_mut().zip(&taps[fused_end..]) {
            *o += x * w;
        }
    }
}

/// The symmetric column filter: the centre row's product, then each pair of rows at
/// the same distance added and multiplied by its tap, fused where OpenCV's 8-wide
/// vector loop runs.
#[inline(always)]
fn blur_columns(rows: &[f32], row_len: usize, height: usize, kernel: &[f32]) -> Vec<f32> {
    let half = kernel.len() / 2;
    let (fused_end, _) = vector_ends(row_len);
    let mut out = vec![0f32; rows.len()];
    for (y, sums) in out.chunks_exact_mut(row_len).enumerate() {
        let row = |offset: i64| {
            let source = reflect(y as i64 + offset, height);
            &rows[source * row_len..(source + 1) * row_len]
        };
        for (sum, &v) in sums.iter_mut().zip(row(0)) {
            *sum = v * kernel[half];
        }
        for distance in 1..=half {
            let (below, above) = (row(distance as i64), row(-(distance as i64)));
            let w = kernel[half + distance];
            let (fused, tail) = sums.split_at_mut(fused_end);
            for ((sum, &b), &a) in fused.iter_mut().zip(below).zip(above) {
                *sum = (b + a).mul_add(w, *sum);
            }
            let rest = below[fused_end..].iter().zip(&above[fused_end..]);
            for (sum, (&b, &a)) in tail.iter_mut().zip(rest) {
                *sum += (b + a) * w;
            }
        }
    }
    out
}

/// `getGaussianKernelFixedPoint_ED`: the taps in 8 fractional bits, rounded from the
/// outside in with the error carried, the centre taking what makes them sum to one.
fn fixed_kernel(taps: usize, sigma: f64) -> Vec<i64> {
    let kernel = gaussian_kernel(taps, sigma);
    let centre = (taps - 1) / 2;
    let one = 1i64 << KERNEL_BITS;
    let mut fixed = vec![0; taps];
    let mut error = 0.0;
    for i in 0..centre {
        let adjusted = kernel[i] * one as f64 + error;
        let rounded = adjusted.round_ties_even() as i64;
        error = adjusted - rounded as f64;
        fixed[i] = rounded;
        fixed[taps - 1 - i] = rounded;
    }
    fixed[centre] = one - 2 * fixed[..centre].iter().sum::<i64>();
    fixed
}

/// OpenCV's bit-exact `GaussianBlur` of an 8-bit plane.
pub fn blur_u8(values: &[u8], size: (usize, usize), sigma: f64) -> Vec<u8> {
    blur_u8_interleaved(values, size, 1, sigma)
}

/// OpenCV's bit-exact `GaussianBlur` of an 8-bit image of `channels` interleaved values:
/// rows and columns in fixed point (8 fractional bits each, so every sum is exact and
/// its order free), rounded off 16 fractional bits at the end. Both passes run as sums
/// of shifted whole rows, each symmetric pair of taps added before its weight.
pub fn blur_u8_interleaved(
    values: &[u8],
    size: (usize, usize),
    channels: usize,
    sigma: f64,
) -> Vec<u8> {
    if values.is_empty() || size.0 * channels == 0 {
        return Vec::new();
    }
    let kernel: Vec<u16> = fixed_kernel(kernel_size(sigma, false), sigma)
        .into_iter()
        .map(|w| w as u16)
        .collect();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the features the function is compiled with.
        return unsafe { blur_u8_avx2(values, size, channels, &kernel) };
    }
    blur_u8_passes(values, size, channels, &kernel)
}

/// [`blur_u8_passes`] compiled with 256-bit vectors (the same results, faster).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blur_u8_avx2(
    values: &[u8],
    size: (usize, usize),
    channels: usize,
    kernel: &[u16],
) -> Vec<u8> {
    blur_u8_passes(values, size, channels, kernel)
}

/// `out += (a + b) * w`, element by element (no sum leaves 16 bits: see the row pass).
#[inline(always)]
fn add_pair(out: &mut [u16], a: &[u16], b: &[u16], w: u16) {
    let n = out.len();
    let (a, b) = (&a[..n], &b[..n]);
    for i in 0..n {
        out[i] = out[i].wrapping_add(a[i].wrapping_add(b[i]).wrapping_mul(w));
    }
}

/// `sum += (a + b) * w`, widened to 32 bits.
#[inline(always)]
fn add_pair_wide(sum: &mut [u32], a: &[u16], b: &[u16], w: u16) {
    let n = sum.len();
    let (a, b, w) = (&a[..n], &b[..n], u32::from(w));
    for i in 0..n {
        sum[i] = sum[i].wrapping_add((u32::from(a[i]) + u32::from(b[i])).wrapping_mul(w));
    }
}

/// The fixed-point row filter, then the column filter.
#[inline(always)]
fn blur_u8_passes(
    values: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    kernel: &[u16],
) -> Vec<u8> {
    let row_len = width * channels;
    let half = kernel.len() / 2;
    let reflected = |len: usize| -> Vec<usize> {
        (0..len + 2 * half)
            .map(|i| reflect(i as i64 - half as i64, len))
            .collect()
    };
    // Rows: 8-bit values times 8-bit-fraction taps that sum to one stay below 2^16.
    let columns = reflected(width);
    let mut rows = vec![0u16; row_len * height];
    let mut padded = vec![0u16; columns.len() * channels];
    for (source, out) in values
        .chunks_exact(row_len)
        .zip(rows.chunks_exact_mut(row_len))
    {
        for (p, &x) in padded.chunks_exact_mut(channels).zip(&columns) {
            for (v, &s) in p.iter_mut().zip(&source[x * channels..][..channels]) {
                *v = u16::from(s);
            }
        }
        let shifted = |k: usize| &padded[k * channels..][..row_len];
        for (o, &c) in out.iter_mut().zip(shifted(half)) {
            *o = c * kernel[half];
        }
        for (k, &w) in kernel[..half].iter().enumerate() {
            add_pair(out, shifted(k), shifted(kernel.len() - 1 - k), w);
        }
    }
    // Columns: each output row the weighted sum of its reflected source rows.
    let lines = reflected(height);
    let row = |y: usize| &rows[lines[y] * row_len..][..row_len];
    let mut out = vec![0u8; row_len * height];
    let mut sum = vec![0u32; row_len];
    for (y, target) in out.chunks_exact_mut(row_len).enumerate() {
        let centre = u32::from(kernel[half]);
        for (s, &c) in sum.iter_mut().zip(row(y + half)) {
            *s = u32::from(c) * centre;
        }
        for (k, &w) in kernel[..half].iter().enumerate() {
            add_pair_wide(&mut sum, row(y + k), row(y + kernel.len() - 1 - k), w);
        }
        for (t, &s) in target.iter_mut().zip(&sum) {
            *t = ((s + (1 << 15)) >> 16).min(255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::preprocess::xorshift32;

    #[test]
    fn the_8_bit_vector_build_and_the_portable_one_agree_and_channels_stay_apart() {
        let mut words = xorshift32(0x9e37_79b9);
        for (width, height, channels, sigma) in
            [(37, 11, 3, 6.0), (9, 30, 1, 0.6), (64, 5, 3, 20.0)]
        {
            let values: Vec<u8> = words
                .by_ref()
                .take(width * height * channels)
                .map(|w| (w >> 24) as u8)
                .collect();
            let kernel: Vec<u16> = fixed_kernel(kernel_size(sigma, false), sigma)
                .into_iter()
                .map(|w| w as u16)
                .collect();
            let portable = blur_u8_passes(&values, (width, height), channels, &kernel);
            let dispatched = blur_u8_interleaved(&values, (width, height), channels, sigma);
            assert_eq!(portable, dispatched, "{width}x{height}x{channels}");
            // Interleaved channels blur as the planes they are.
            for c in 0..channels {
                let plane: Vec<u8> = values.iter().skip(c).step_by(channels).copied().collect();
                let blurred: Vec<u8> = dispatched
                    .iter()
                    .skip(c)
                    .step_by(channels)
                    .copied()
                    .collect();
                assert_eq!(
                    blur_u8(&plane, (width, height), sigma),
                    blurred,
                    "channel {c}"
                );
            }
        }
    }

    #[test]
    fn the_vector_build_and_the_portable_one_agree_bit_for_bit() {
        let mut words = xorshift32(0x2545_f491);
        for (width, height, channels, sigma) in [(37, 11, 3, 6.0), (9, 30, 1, 3.0), (64, 5, 3, 2.0)]
        {
            let values: Vec<f32> = words
                .by_ref()
                .take(width * height * channels)
                .map(|w| (w % 25_600) as f32 / 100.0)
                .collect();
            let kernel: Vec<f32> = gaussian_kernel(kernel_size(sigma, true), sigma)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let portable = blur_passes(&values, (width, height), channels, &kernel);
            let dispatched = blur_f32(&values, (width, height), channels, sigma);
            assert_eq!(portable, dispatched, "{width}x{height}x{channels}");
        }
    }
}
