//! controlnet_aux's `AnylineDetector` (A1111's `softedge_anyline`, the preprocessor of
//! MistoLine): a TEED network's soft edges in two safe steps, overlaid with the
//! standard line-art detector's dark lines (σ 2, median above 3) from which
//! skimage's `remove_small_objects` has taken every 4-connected group of 12 pixels or
//! fewer. Where a line is, the two combine as its uint8 arithmetic does:
//! `1 - (1 - line) * (1 - edge)`, wrapping.

use image::{GrayImage, RgbImage};

use super::lineart_standard::dark_lines;
use super::teed::Teed;
use crate::engine::checkpoint::Between;
use crate::engine::error::Result;

/// The soft edges' steps (the detector's fixed `safe_step(edge, 2)`).
const SAFE_STEPS: u32 = 2;
/// The line detector's blur σ (`guassian_sigma`).
const SIGMA: f64 = 2.0;
/// The line detector's median threshold (`intensity_threshold`).
const INTENSITY_THRESHOLD: f32 = 3.0;
/// The smallest line kept, in pixels. The detector's `min_size=36` counts the three
/// equal channels its face connectivity joins, and skimage 0.26 passes that deprecated
/// argument on as `max_size`, removing groups of up to 36 (12 pixels; earlier versions
/// kept those).
pub const LEAST_LINE_PIXELS: usize = 13;

/// The Anyline map of an RGB image at its size; `between` is asked before each of
/// TEED's blocks.
pub fn anyline(teed: &Teed, image: &RgbImage, between: &mut Between<'_>) -> Result<GrayImage> {
    let mut map = teed.detect(image, SAFE_STEPS, between)?;
    let mut lines = dark_lines(image, SIGMA, INTENSITY_THRESHOLD);
    remove_small_groups(&mut lines, LEAST_LINE_PIXELS);
    for (edge, &line) in map.iter_mut().zip(lines.iter()) {
        if line != 0 {
            let inverse = 1u8.wrapping_sub(line).wrapping_mul(1u8.wrapping_sub(*edge));
            *edge = 1u8.wrapping_sub(inverse);
        }
    }
    Ok(map)
}

/// Sets to 0 every 4-connected group of non-zero pixels smaller than `least`.
pub fn remove_small_groups(map: &mut GrayImage, least: usize) {
    let (width, height) = (map.width() as usize, map.height() as usize);
    let pixels: &mut [u8] = map;
    let mut seen = vec![false; pixels.len()];
    let mut group = Vec::new();
    for start in 0..pixels.len() {
        if seen[start] || pixels[start] == 0 {
            continue;
        }
        seen[start] = true;
        group.clear();
        group.push(start);
        let mut next = 0;
        while next < group.len() {
            let i = group[next];
            next += 1;
            let (x, y) = (i % width, i / width);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < width).then(|| i + 1),
                (y > 0).then(|| i - width),
                (y + 1 < height).then(|| i + width),
            ];
            for j in neighbours.into_iter().flatten() {
                if !seen[j] && pixels[j] != 0 {
                    seen[j] = true;
                    group.push(j);
                }
            }
        }
        if group.len() < least {
            for &i in &group {
                pixels[i] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rows: &[&str]) -> GrayImage {
        let width = rows[0].len() as u32;
        let pixels = rows
            .iter()
            .flat_map(|r| r.bytes().map(|b| if b == b'#' { 9 } else { 0 }))
            .collect();
        GrayImage::from_raw(width, rows.len() as u32, pixels).expect("rows")
    }

    #[test]
    fn groups_below_the_least_size_go_and_diagonals_do_not_join() {
        let mut lines = map(&["##..#", "#...#", "...#.", "####."]);
        // Sizes: 3 (top left), 2 (right), 5 (bottom, the diagonal pixel joined by its
        // side), so with 4 the first two go.
        remove_small_groups(&mut lines, 4);
        assert_eq!(lines, map(&[".....", ".....", "...#.", "####."]));
        let mut lines = map(&["#.#", ".#.", "#.#"]);
        remove_small_groups(&mut lines, 2);
        assert_eq!(lines, map(&["...", "...", "..."]));
    }
}
