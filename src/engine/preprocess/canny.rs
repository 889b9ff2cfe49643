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

/// Per pixel: the gradient of the channel with the largest L1 magnitude, in planes with
/// a border of one pixel (magnitude 0) so that neighbours need no bounds checks.
struct Gradients {
    /// A padded row's length.
    stride: usize,
    dx: Vec<i32>,
    dy: Vec<i32>,
    magnitude: Vec<i32>,
}

impl Gradients {
    fn of(image: &RgbImage) -> Self {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let pixels = image.as_raw();
        let row_len = width * 3;
        let row = |y: usize| &pixels[y * row_len..(y + 1) * row_len];
        let stride = width + 2;
        let plane = vec![0; stride * (height + 2)];
        let mut gradients = Self {
            stride,
            dx: plane.clone(),
            dy: plane.clone(),
            magnitude: plane,
        };
        // Per row, the Sobel's vertical parts (rows above and below replicated at the
        // edges): `sum` = above + 2·centre + below, `difference` = below − above.
        let mut sum = vec![0i32; row_len];
        let mut difference = vec![0i32; row_len];
        for y in 0..height {
            let (up, down) = (row(y.saturating_sub(1)), row((y + 1).min(height - 1)));
            let columns = up.iter().zip(row(y)).zip(down);
            for ((s, d), ((&u, &c), &b)) in sum.iter_mut().zip(difference.iter_mut()).zip(columns) {
                let (u, c, b) = (i32::from(u), i32::from(c), i32::from(b));
                *s = u + 2 * c + b;
                *d = b - u;
            }
            let start = (y + 1) * stride + 1;
            for x in 0..width {
                // Replicated borders.
                let (left, right) = (x.saturating_sub(1) * 3, (x + 1).min(width - 1) * 3);
                let channel = |c: usize| {
                    let dx = sum[right + c] - sum[left + c];
                    let dy =
                        difference[left + c] + 2 * difference[x * 3 + c] + difference[right + c];
                    (dx, dy, dx.abs() + dy.abs())
                };
                // The first channel wins a tie, as in OpenCV.
                let mut best = channel(0);
                for c in 1..3 {
                    let next = channel(c);
                    if next.2 > best.2 {
                        best = next;
                    }
                }
                let i = start + x;
                (gradients.dx[i], gradients.dy[i], gradients.magnitude[i]) = best;
            }
        }
        gradients
    }

    /// Whether the pixel at padded index `i` is a local maximum along its gradient
    /// direction.
    fn is_local_maximum(&self, i: usize) -> bool {
        let (m, dx, dy) = (self.magnitude[i], self.dx[i], self.dy[i]);
        let at = |offset: isize| self.magnitude[i.wrapping_add_signed(offset)];
        let stride = self.stride as isize;
        let ax = dx.abs();
        let ay = dy.abs() << SHIFT;
        let tan_22 = ax * TAN_22_5;
        if ay < tan_22 {
            // Mostly horizontal gradient: compare left and right.
            return m > at(-1) && m >= at(1);
        }
        let tan_67 = tan_22 + (ax << (SHIFT + 1));
        if ay > tan_67 {
            // Mostly vertical: compare above and below.
            return m > at(-stride) && m >= at(stride);
        }
        let s = if (dx ^ dy) < 0 { -1 } else { 1 };
        m > at(-stride - s) && m > at(stride + s)
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
    let (w, stride) = (width as usize, g.stride);
    // 0: may be an edge, 1: is not (the border too), 2: is.
    let mut map = vec![1u8; g.magnitude.len()];
    let mut stack = Vec::new();
    for y in 1..=height as usize {
        let start = y * stride + 1;
        for (i, state) in (start..).zip(&mut map[start..start + w]) {
            let m = g.magnitude[i];
            if m > low && g.is_local_maximum(i) {
                if m > high {
                    *state = 2;
                    stack.push(i);
                } else {
                    *state = 0;
                }
            }
        }
    }
    let s = stride as isize;
    let neighbours = [-s - 1, -s, -s + 1, -1, 1, s - 1, s, s + 1];
    while let Some(i) = stack.pop() {
        for offset in neighbours {
            let j = i.wrapping_add_signed(offset);
            if map[j] == 0 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    let edges = map
        .chunks_exact(stride)
        .skip(1)
        .take(height as usize)
        .flat_map(|row| row[1..=w].iter().map(|&m| if m == 2 { 255 } else { 0 }))
        .collect();
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
