//! controlnet_aux's scribble post-processing of a soft-edge map (its `nms` then a blur
//! and a threshold): the map blurred in float32 with a Gaussian of σ 3, a pixel kept
//! where it is the largest of its line of three along any of the four directions and
//! above 127, those strokes blurred with OpenCV's bit-exact 8-bit Gaussian (σ 3) and
//! every pixel above 4 made white. Borders reflect as OpenCV's `BORDER_REFLECT_101`.

use image::GrayImage;

/// The blurs' σ.
const SIGMA: f64 = 3.0;
/// OpenCV's kernel size for σ 3: `cvRound(σ·4·2 + 1) | 1` in float, `cvRound(σ·3·2 + 1) | 1`
/// for 8 bits.
const FLOAT_TAPS: usize = 25;
const BYTE_TAPS: usize = 19;
/// Fractional bits of the 8-bit Gaussian's fixed-point kernel.
const KERNEL_BITS: u32 = 8;

/// The scribble map of a soft-edge map (white strokes on black).
pub fn scribble(soft: &GrayImage) -> GrayImage {
    let (width, height) = (soft.width() as usize, soft.height() as usize);
    let values: Vec<f32> = soft.iter().map(|&v| f32::from(v)).collect();
    let blurred = blur_f32(&values, width, height);
    let strokes = thin(&blurred, width, height, 127.0);
    let spread = blur_u8(&strokes, width, height);
    let out = spread
        .into_iter()
        .map(|v| if v > 4 { 255 } else { 0 })
        .collect();
    GrayImage::from_raw(soft.width(), soft.height(), out).unwrap_or_else(|| GrayImage::new(0, 0))
}

/// `borderInterpolate` with `BORDER_REFLECT_101`.
fn reflect(p: i64, len: usize) -> usize {
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
fn gaussian(taps: usize) -> Vec<f64> {
    let centre = (taps - 1) / 2;
    let side: Vec<f64> = (0..centre)
        .map(|i| {
            let x = i as f64 - centre as f64;
            (-(x * x) / (2.0 * SIGMA * SIGMA)).exp()
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

/// A separable filter: `kernel` along the rows, then along the columns, each output a
/// sum from zero of `product(value, tap)` over the taps in order.
fn separable<T: Copy + Default + std::ops::Add<Output = T>>(
    values: &[T],
    size: (usize, usize),
    kernel: &[T],
    product: impl Fn(T, T) -> T,
) -> Vec<T> {
    let rows = along(values, size, true, kernel, &product);
    along(&rows, size, false, kernel, &product)
}

/// One pass of [`separable`] along x (`horizontal`) or y.
fn along<T: Copy + Default + std::ops::Add<Output = T>>(
    values: &[T],
    (width, height): (usize, usize),
    horizontal: bool,
    kernel: &[T],
    product: &impl Fn(T, T) -> T,
) -> Vec<T> {
    let half = (kernel.len() / 2) as i64;
    let (len, step) = if horizontal {
        (width, 1)
    } else {
        (height, width)
    };
    (0..values.len())
        .map(|i| {
            let position = if horizontal { i % width } else { i / width };
            let start = i - position * step;
            kernel
                .iter()
                .enumerate()
                .fold(T::default(), |sum, (k, &w)| {
                    let source = reflect(position as i64 + k as i64 - half, len);
                    sum + product(values[start + source * step], w)
                })
        })
        .collect()
}

/// `cv2.GaussianBlur` of a float32 plane (σ 3), its kernel in float32.
fn blur_f32(values: &[f32], width: usize, height: usize) -> Vec<f32> {
    let kernel: Vec<f32> = gaussian(FLOAT_TAPS).into_iter().map(|v| v as f32).collect();
    separable(values, (width, height), &kernel, |v, w| v * w)
}

/// `getGaussianKernelFixedPoint_ED`: the taps in 8 fractional bits, rounded from the
/// outside in with the error carried, the centre taking what makes them sum to one.
fn fixed_kernel(taps: usize) -> Vec<i64> {
    let kernel = gaussian(taps);
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

/// OpenCV's bit-exact `GaussianBlur` of an 8-bit plane (σ 3): rows and columns in
/// fixed point, rounded off 16 fractional bits at the end.
fn blur_u8(values: &[u8], width: usize, height: usize) -> Vec<u8> {
    let wide: Vec<i64> = values.iter().map(|&v| i64::from(v)).collect();
    let kernel = fixed_kernel(BYTE_TAPS);
    separable(&wide, (width, height), &kernel, |v, w| v * w)
        .into_iter()
        .map(|v| ((v + (1 << 15)) >> 16).clamp(0, 255) as u8)
        .collect()
}

/// controlnet_aux's `nms` after its blur: 255 where a value is the largest of its line of
/// three (neighbours outside the image ignored, as `cv2.dilate` does) along any of the
/// four directions and above `threshold`.
fn thin(values: &[f32], width: usize, height: usize, threshold: f32) -> Vec<u8> {
    const LINES: [(i64, i64); 4] = [(1, 0), (0, 1), (1, 1), (1, -1)];
    let at = |x: i64, y: i64| {
        let inside = (0..width as i64).contains(&x) && (0..height as i64).contains(&y);
        inside.then(|| values[y as usize * width + x as usize])
    };
    let mut out = vec![0u8; values.len()];
    for y in 0..height as i64 {
        for x in 0..width as i64 {
            let v = values[y as usize * width + x as usize];
            let peak = LINES.iter().any(|&(dx, dy)| {
                [at(x + dx, y + dy), at(x - dx, y - dy)]
                    .iter()
                    .flatten()
                    .all(|&n| n <= v)
            });
            if peak && v > threshold {
                out[y as usize * width + x as usize] = 255;
            }
        }
    }
    out
}
