//! sd-webui-controlnet's `scribble_xdog`: scribbles from a difference of Gaussians (no
//! network). The image in float32 blurred by OpenCV at sigmas 0.5 and 5, the least of the
//! three channels' differences taken from 255 and truncated to 8 bits, and a pixel drawn
//! white where twice its darkness, in numpy's wrapping uint8 arithmetic, exceeds the
//! threshold.

use image::{GrayImage, RgbImage};

use super::cv_blur::blur_f32;

/// The fine and the coarse Gaussian's standard deviations.
const SIGMAS: (f64, f64) = (0.5, 5.0);

/// The scribble map of `image` at `threshold` (A1111's "XDoG Threshold").
pub fn xdog(image: &RgbImage, threshold: u32) -> GrayImage {
    let (width, height) = image.dimensions();
    let size = (width as usize, height as usize);
    let values: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
    let fine = blur_f32(&values, size, 3, SIGMAS.0);
    let coarse = blur_f32(&values, size, 3, SIGMAS.1);
    let drawn = coarse
        .chunks_exact(3)
        .zip(fine.chunks_exact(3))
        .map(|(c, f)| {
            let least = (0..3).map(|k| c[k] - f[k]).fold(f32::INFINITY, f32::min);
            let dog = (255.0 - least).clamp(0.0, 255.0) as u8;
            // `2 * (255 - dog)` stays uint8 in numpy: a darkness past 127 wraps around.
            let doubled = (255 - dog).wrapping_mul(2);
            if u32::from(doubled) > threshold {
                255
            } else {
                0
            }
        });
    GrayImage::from_raw(width, height, drawn.collect())
        .unwrap_or_else(|| GrayImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_image_draws_nothing_and_an_edge_draws_a_line() {
        let flat = RgbImage::from_pixel(20, 12, image::Rgb([90, 120, 200]));
        assert!(xdog(&flat, 32).iter().all(|&v| v == 0));
        let edge = RgbImage::from_fn(20, 12, |x, _| {
            let v = if x < 10 { 30 } else { 220 };
            image::Rgb([v, v, v])
        });
        let map = xdog(&edge, 32);
        let row: Vec<u8> = (0..20).map(|x| map.get_pixel(x, 6)[0]).collect();
        // The stroke lies on the dark side of the edge, away from the flat ends.
        assert!(row[..3].iter().all(|&v| v == 0), "{row:?}");
        assert!(row[12..].iter().all(|&v| v == 0), "{row:?}");
        assert!(row[5..10].iter().all(|&v| v == 255), "{row:?}");
    }

    #[test]
    fn darkness_past_127_wraps_as_numpys_uint8_does() {
        // A dark stroke on white: its centre is dark enough that twice its darkness wraps
        // below the threshold again, so a high threshold leaves a hollow line.
        let stroke = RgbImage::from_fn(40, 9, |x, _| {
            let v = if (18..22).contains(&x) { 0 } else { 255 };
            image::Rgb([v, v, v])
        });
        let low = xdog(&stroke, 1);
        let high = xdog(&stroke, 64);
        let drawn = |m: &GrayImage| m.iter().filter(|&&v| v == 255).count();
        assert!(drawn(&high) < drawn(&low));
    }
}
