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
    let stride = width * channels;
    let mut line = Vec::new();
    let mut out = Vec::new();
    for channel in 0..channels {
        for y in 0..height {
            let row = (0..width).map(|x| y * stride + x * channels + channel);
            blur_line(pixels, row, box_radius, &mut line, &mut out);
        }
        for x in 0..width {
            let column = (0..height).map(|y| y * stride + x * channels + channel);
            blur_line(pixels, column, box_radius, &mut line, &mut out);
        }
    }
}

/// `PASSES` box blurs of the pixels at `indices`, written back.
fn blur_line(
    pixels: &mut [u8],
    indices: impl Iterator<Item = usize> + Clone,
    radius: f32,
    line: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    line.clear();
    line.extend(indices.clone().map(|i| pixels[i]));
    out.resize(line.len(), 0);
    for _ in 0..PASSES {
        box_blur_line(line, out, radius);
        std::mem::swap(line, out);
    }
    for (i, value) in indices.zip(line.iter()) {
        pixels[i] = *value;
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
    let last = input.len() - 1;
    let at = |i: isize| u32::from(input[i.clamp(0, last as isize) as usize]);
    let radius = radius as isize;
    // The window sum for pixel -1: pixels -radius-1 ..= radius-1, edges repeated.
    let mut acc: u32 = (-radius - 1..radius).map(at).sum();
    for (x, out) in output.iter_mut().enumerate() {
        let x = x as isize;
        acc = acc + at(x + radius) - at(x - radius - 1);
        let bulk = acc * ww + (at(x - radius - 1) + at(x + radius + 1)) * fw;
        *out = ((bulk + (1 << 23)) >> 24) as u8;
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
