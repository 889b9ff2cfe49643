//! Pillow's `ImageFilter.GaussianBlur` on 8-bit pixels (`_imaging`'s `BoxBlur.c`): three
//! box blurs of a fractional radius along rows, then three along columns, each output
//! pixel a fixed-point sum (24 fractional bits) over a window whose two outer pixels
//! count fractionally, the border pixel repeated past the edges. diffusers blurs an
//! inpainting mask this way (`VaeImageProcessor.blur`), so a mask blurred here is the
//! one its users get.

/// The passes Pillow's Gaussian blur makes in each direction.
const PASSES: usize = 3;

/// Blurs `pixels` (`width` × `height`, `channels` interleaved bytes per pixel) in place
/// as `image.filter(ImageFilter.GaussianBlur(radius))` does; a radius of 0 leaves them.
pub fn gaussian_blur(pixels: &mut [u8], width: usize, height: usize, channels: usize, radius: f32) {
    if radius == 0.0 || width == 0 || height == 0 {
        return;
    }
    let box_radius = box_radius(radius, PASSES);
    let mut plane = vec![0u8; width * height];
    let mut transposed = vec![0u8; width * height];
    for channel in 0..channels {
        for (value, pixel) in plane.iter_mut().zip(pixels.chunks_exact(channels)) {
            *value = pixel[channel];
        }
        // As Pillow: rows, then the transposed image's rows (cache-friendly columns).
        blur_rows(&mut plane, width, box_radius);
        transpose(&plane, width, height, &mut transposed);
        blur_rows(&mut transposed, height, box_radius);
        transpose(&transposed, height, width, &mut plane);
        for (value, pixel) in plane.iter().zip(pixels.chunks_exact_mut(channels)) {
            pixel[channel] = *value;
        }
    }
}

/// `PASSES` box blurs of each row (`width` bytes) of `plane`.
fn blur_rows(plane: &mut [u8], width: usize, radius: f32) {
    let mut line = vec![0u8; width];
    let mut out = vec![0u8; width];
    for row in plane.chunks_exact_mut(width) {
        line.copy_from_slice(row);
        for _ in 0..PASSES {
            box_blur_line(&line, &mut out, radius);
            std::mem::swap(&mut line, &mut out);
        }
        row.copy_from_slice(&line);
    }
}

/// `input` (`height` rows of `width`) transposed into `output`, in cache-sized blocks.
fn transpose(input: &[u8], width: usize, height: usize, output: &mut [u8]) {
    const BLOCK: usize = 64;
    for y0 in (0..height).step_by(BLOCK) {
        for x0 in (0..width).step_by(BLOCK) {
            for y in y0..(y0 + BLOCK).min(height) {
                for x in x0..(x0 + BLOCK).min(width) {
                    output[x * height + y] = input[y * width + x];
                }
            }
        }
    }
}

/// `_gaussian_blur_radius`: the fractional box radius whose `passes` box blurs
/// approximate a Gaussian of standard deviation `radius` (Gwosdek et al., 2011), in
/// float32 as the C computes it.
fn box_radius(radius: f32, passes: usize) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let length = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let whole = ((f64::from(length) - 1.0) / 2.0).floor() as f32;
    let mut fraction = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2);
    fraction /= 6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0));
    whole + fraction
}

/// `ImagingLineBoxBlur8`: one box blur of `input` into `output`. The window's whole
/// pixels weigh `ww`, its two outer ones `fw` each, in units of 2^-24; indices past
/// either end read the border pixel.
fn box_blur_line(input: &[u8], output: &mut [u8], float_radius: f32) {
    let radius = float_radius as usize;
    let ww = (16_777_216.0f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (radius as u32 * 2 + 1) * ww) / 2;
    let (n, r) = (input.len(), radius);
    let at = |i: isize| u32::from(input[i.clamp(0, n as isize - 1) as usize]);
    // The window sum for pixel -1: pixels -r-1 ..= r-1, edges repeated.
    let mut acc: u32 = (-(r as isize) - 1..r as isize).map(at).sum();
    let step = |acc: &mut u32, gone: u32, added: u32, far: u32| {
        *acc = *acc + added - gone;
        let bulk = *acc * ww + (gone + far) * fw;
        ((bulk + (1 << 23)) >> 24) as u8
    };
    // Pixels whose window reaches past an end read the border pixel; the others (x from
    // r + 1 to n - r - 2) index the line directly.
    let inner = (r + 1)..n.saturating_sub(r + 1).max(r + 1);
    let clamped = |x: usize| {
        let x = x as isize;
        let r = r as isize;
        (at(x - r - 1), at(x + r), at(x + r + 1))
    };
    let head = inner.start.min(n);
    for (x, out) in output.iter_mut().enumerate().take(head) {
        let (gone, added, far) = clamped(x);
        *out = step(&mut acc, gone, added, far);
    }
    if !inner.is_empty() {
        let gone = &input[inner.start - r - 1..];
        let added = &input[inner.start + r..];
        let far = &input[inner.start + r + 1..];
        let out = &mut output[inner.clone()];
        for (o, ((g, a), f)) in out.iter_mut().zip(gone.iter().zip(added).zip(far)) {
            *o = step(&mut acc, u32::from(*g), u32::from(*a), u32::from(*f));
        }
    }
    for (x, out) in output.iter_mut().enumerate().skip(inner.end.max(head)) {
        let (gone, added, far) = clamped(x);
        *out = step(&mut acc, gone, added, far);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_radii_are_pillows() {
        // Pillow 10's comment on radius 2 in three passes: 1.375.
        assert!((box_radius(2.0, 3) - 1.375).abs() < 1e-6);
        assert!((box_radius(1.0, 3) - 0.25).abs() < 1e-6);
    }

    #[test]
    fn a_flat_image_stays_flat_and_weights_sum_to_one() {
        for radius in [0.5, 1.0, 4.0, 33.0, 64.0] {
            let mut pixels = vec![200u8; 7 * 5 * 3];
            gaussian_blur(&mut pixels, 7, 5, 3, radius);
            assert!(pixels.iter().all(|&p| p == 200), "{radius}");
        }
    }
}
