//! Canny edges exactly as OpenCV computes them (`cv2.Canny(image, low, high)` with its
//! defaults, as controlnet_aux calls it): a 3×3 Sobel with replicated borders per
//! channel, the L1 magnitude, at each pixel the channel with the strongest gradient,
//! non-maximum suppression in four directions with OpenCV's integer tangent test and its
//! asymmetric comparisons, strict thresholds, and 8-connected hysteresis. No blur.

use image::{GrayImage, RgbImage};

/// Fixed-point shift of OpenCV's direction test.
const SHIFT: u32 = 15;
/// tan(22.5°) in that fixed point, rounded as OpenCV rounds it.
const TAN_22_5: i32 = 13573;

/// Per pixel: the gradient of the channel with the largest L1 magnitude.
struct Gradients {
    width: usize,
    height: usize,
    dx: Vec<i32>,
    dy: Vec<i32>,
    magnitude: Vec<i32>,
}

impl Gradients {
    fn of(image: &RgbImage) -> Self {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let pixels = image.as_raw();
        let at = |y: usize, x: usize, c: usize| i32::from(pixels[(y * width + x) * 3 + c]);
        let mut gradients = Self {
            width,
            height,
            dx: vec![0; width * height],
            dy: vec![0; width * height],
            magnitude: vec![0; width * height],
        };
        for y in 0..height {
            // Replicated borders.
            let (up, down) = (y.saturating_sub(1), (y + 1).min(height - 1));
            for x in 0..width {
                let (left, right) = (x.saturating_sub(1), (x + 1).min(width - 1));
                let i = y * width + x;
                for c in 0..3 {
                    let dx = (at(up, right, c) - at(up, left, c))
                        + 2 * (at(y, right, c) - at(y, left, c))
                        + (at(down, right, c) - at(down, left, c));
                    let dy = (at(down, left, c) - at(up, left, c))
                        + 2 * (at(down, x, c) - at(up, x, c))
                        + (at(down, right, c) - at(up, right, c));
                    let magnitude = dx.abs() + dy.abs();
                    // The first channel wins a tie, as in OpenCV.
                    if c == 0 || magnitude > gradients.magnitude[i] {
                        gradients.dx[i] = dx;
                        gradients.dy[i] = dy;
                        gradients.magnitude[i] = magnitude;
                    }
                }
            }
        }
        gradients
    }

    /// The magnitude at (y, x), 0 outside the image.
    fn magnitude_at(&self, y: isize, x: isize) -> i32 {
        if y < 0 || x < 0 || y as usize >= self.height || x as usize >= self.width {
            return 0;
        }
        self.magnitude[y as usize * self.width + x as usize]
    }

    /// Whether (y, x) is a local maximum along its gradient direction.
    fn is_local_maximum(&self, y: usize, x: usize) -> bool {
        let i = y * self.width + x;
        let (m, dx, dy) = (self.magnitude[i], self.dx[i], self.dy[i]);
        let (y, x) = (y as isize, x as isize);
        let ax = dx.abs();
        let ay = dy.abs() << SHIFT;
        let tan_22 = ax * TAN_22_5;
        if ay < tan_22 {
            // Mostly horizontal gradient: compare left and right.
            return m > self.magnitude_at(y, x - 1) && m >= self.magnitude_at(y, x + 1);
        }
        let tan_67 = tan_22 + (ax << (SHIFT + 1));
        if ay > tan_67 {
            // Mostly vertical: compare above and below.
            return m > self.magnitude_at(y - 1, x) && m >= self.magnitude_at(y + 1, x);
        }
        let s = if (dx ^ dy) < 0 { -1 } else { 1 };
        m > self.magnitude_at(y - 1, x - s) && m > self.magnitude_at(y + 1, x + s)
    }
}

/// The edge map of `image` (255 on edges, 0 elsewhere) with OpenCV's `cv2.Canny`
/// semantics for the thresholds `low` and `high` (swapped if given the other way round).
pub fn canny(image: &RgbImage, low: u32, high: u32) -> GrayImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return GrayImage::new(width, height);
    }
    let (low, high) = (low.min(high) as i32, low.max(high) as i32);
    let g = Gradients::of(image);
    // 0: may be an edge, 1: is not, 2: is.
    let mut map = vec![1u8; g.width * g.height];
    let mut stack = Vec::new();
    for y in 0..g.height {
        for x in 0..g.width {
            let i = y * g.width + x;
            if g.magnitude[i] > low && g.is_local_maximum(y, x) {
                if g.magnitude[i] > high {
                    map[i] = 2;
                    stack.push((y, x));
                } else {
                    map[i] = 0;
                }
            }
        }
    }
    while let Some((y, x)) = stack.pop() {
        for ny in y.saturating_sub(1)..=(y + 1).min(g.height - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(g.width - 1) {
                let i = ny * g.width + nx;
                if map[i] == 0 {
                    map[i] = 2;
                    stack.push((ny, nx));
                }
            }
        }
    }
    let edges = map.iter().map(|&m| if m == 2 { 255 } else { 0 }).collect();
    GrayImage::from_raw(width, height, edges).unwrap_or_else(|| GrayImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_gives_one_line_of_edges_and_flat_images_none() {
        let mut image = RgbImage::new(8, 6);
        for (x, _, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb(if x < 4 { [0, 0, 0] } else { [200, 200, 200] });
        }
        let edges = canny(&image, 100, 200);
        for y in 0..6 {
            let row: Vec<u8> = (0..8).map(|x| edges.get_pixel(x, y)[0]).collect();
            assert_eq!(row, [0, 0, 0, 255, 0, 0, 0, 0], "row {y}");
        }
        let flat = RgbImage::from_pixel(5, 5, image::Rgb([9, 9, 9]));
        assert!(canny(&flat, 0, 0).iter().all(|&v| v == 0));
    }
}
