//! controlnet_aux's scribble post-processing of a soft-edge map (its `nms` then a blur
//! and a threshold): the map blurred in float32 with a Gaussian of σ 3, a pixel kept
//! where it is the largest of its line of three along any of the four directions and
//! above 127, those strokes blurred with OpenCV's bit-exact 8-bit Gaussian (σ 3) and
//! every pixel above 4 made white. Borders reflect as OpenCV's `BORDER_REFLECT_101`.

use image::GrayImage;

use super::cv_blur::{blur_f32, blur_u8};

/// The blurs' σ.
const SIGMA: f64 = 3.0;

/// The scribble map of a soft-edge map (white strokes on black).
pub fn scribble(soft: &GrayImage) -> GrayImage {
    let (width, height) = (soft.width() as usize, soft.height() as usize);
    let values: Vec<f32> = soft.iter().map(|&v| f32::from(v)).collect();
    let blurred = blur_f32(&values, (width, height), 1, SIGMA);
    let strokes = thin(&blurred, width, height, 127.0);
    let spread = blur_u8(&strokes, (width, height), SIGMA);
    let out = spread
        .into_iter()
        .map(|v| if v > 4 { 255 } else { 0 })
        .collect();
    GrayImage::from_raw(soft.width(), soft.height(), out).unwrap_or_else(|| GrayImage::new(0, 0))
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
