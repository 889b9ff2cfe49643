//! controlnet_aux's `LineartStandardDetector` (A1111's `lineart_standard`, "from white
//! bg & black line"): no network. The image in float32 blurred with a Gaussian of σ 6,
//! each pixel's darkness against its surroundings (the least over the channels of blur
//! minus value, clipped to [0, 255]), scaled so the median of the values above 8 becomes
//! 127 (a median below 16 counts as 16), and truncated to 8 bits: white lines on black.

use image::{GrayImage, RgbImage};

use super::cv_blur::blur_f32;

/// The blur's σ (`guassian_sigma`).
const SIGMA: f64 = 6.0;
/// Values above it set the scale (`intensity_threshold`).
const INTENSITY_THRESHOLD: f32 = 8.0;
/// The least scale divisor.
const LEAST_MEDIAN: f32 = 16.0;

/// The line map of an RGB image, at its size.
pub fn lineart_standard(image: &RgbImage) -> GrayImage {
    dark_lines(image, SIGMA, INTENSITY_THRESHOLD)
}

/// The detector's steps with the blur's `sigma` and the median's `threshold` (Anyline
/// runs them with 2 and 3).
pub fn dark_lines(image: &RgbImage, sigma: f64, threshold: f32) -> GrayImage {
    let size = (image.width() as usize, image.height() as usize);
    let values: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
    let blurred = blur_f32(&values, size, 3, sigma);
    let mut intensity: Vec<f32> = values
        .chunks_exact(3)
        .zip(blurred.chunks_exact(3))
        .map(|(pixel, blur)| {
            let darkness = (0..3)
                .map(|c| blur[c] - pixel[c])
                .fold(f32::INFINITY, f32::min);
            darkness.clamp(0.0, 255.0)
        })
        .collect();
    let scale = median_above(&intensity, threshold)
        .filter(|&m| m > LEAST_MEDIAN)
        .unwrap_or(LEAST_MEDIAN);
    for v in &mut intensity {
        *v = (*v / scale * 127.0).clamp(0.0, 255.0);
    }
    let map = intensity.into_iter().map(|v| v as u8).collect();
    GrayImage::from_raw(image.width(), image.height(), map).unwrap_or_else(|| GrayImage::new(0, 0))
}

/// numpy's `median` of the values above `threshold` in float32 (the two middle values'
/// float32 sum halved for an even count); `None` when no value is above.
fn median_above(values: &[f32], threshold: f32) -> Option<f32> {
    let mut above: Vec<f32> = values.iter().copied().filter(|&v| v > threshold).collect();
    if above.is_empty() {
        return None;
    }
    let (count, middle) = (above.len(), above.len() / 2);
    let (lower, &mut upper, _) = above.select_nth_unstable_by(middle, f32::total_cmp);
    Some(if count % 2 == 1 {
        upper
    } else {
        let below = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (below + upper) / 2.0
    })
}
