//! controlnet_aux's OpenPose hand keypoints (`OpenposeDetector` with `include_hand`): a
//! square beyond each wrist sized from the forearm and upper arm (`handDetect`), the crop
//! blurred (OpenCV's 8-bit Gaussian, σ 0.8) and run through the hand network at four
//! scales (184² to 736²), each scale's 21 keypoint maps enlarged ×8 (Lanczos4), shrunk to
//! 128² (area) and averaged (`Hand.__call__`); in each averaged map, scipy's Gaussian
//! (σ 3) above 0.05 marks regions, the region whose values sum highest keeps its values
//! and their first maximum is the keypoint; drawn as `draw_handpose` draws them.

use image::RgbImage;
use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::cv_blur::blur_u8_interleaved;
use crate::engine::preprocess::openpose::{bgr_input, plane_back, smart_resize};
use crate::engine::preprocess::pose_decode::{gaussian_filter, numpy_sum};
use crate::engine::preprocess::pose_draw::{fill_circle, float32_pixel, thick_line};
use crate::engine::preprocess::pose_face::{shortened_side, square_crop};

/// The wrist's offset beyond the elbow, as a fraction of the forearm.
const RATIO_WRIST_ELBOW: f64 = 0.33;
/// The least side of a hand square the reference looks at.
const LEAST_SIDE: f64 = 20.0;
/// The network's input sides: these fractions of its 368-pixel box.
const SCALES: [f64; 4] = [0.5, 1.0, 1.5, 2.0];
const BOX_SIZE: f64 = 368.0;
/// The network's output stride and the grey its input is padded with.
const STRIDE: usize = 8;
const PAD_VALUE: u8 = 128;
/// The side the maps are averaged at.
const MAP_SIDE: usize = 128;
/// A smoothed map value above this marks a keypoint's region.
const THRESHOLD: f64 = 0.05;
/// The keypoints (the network's 22nd map is the background).
const KEYPOINTS: usize = 21;
const BLUR_SIGMA: f64 = 0.8;
/// (shoulder, elbow, wrist) body parts of the left arm, then the right (the decoding's
/// order), with whether the hand is the left one.
const ARMS: [([usize; 3], bool); 2] = [([5, 6, 7], true), ([2, 3, 4], false)];
/// `draw_handpose`'s bones: pairs of keypoints.
const BONES: [[usize; 2]; 20] = [
    [0, 1],
    [1, 2],
    [2, 3],
    [3, 4],
    [0, 5],
    [5, 6],
    [6, 7],
    [7, 8],
    [0, 9],
    [9, 10],
    [10, 11],
    [11, 12],
    [0, 13],
    [13, 14],
    [14, 15],
    [15, 16],
    [0, 17],
    [17, 18],
    [18, 19],
    [19, 20],
];
const BONE_THICKNESS: i32 = 2;
const DOT_RADIUS: i32 = 4;
const DOT: [u8; 3] = [0, 0, 255];

/// A hand's keypoints as `draw_handpose` takes them: image positions normalised by the
/// image's size (float32), -1 where the reference gives one up.
pub type HandKeypoints = Vec<(f32, f32)>;

/// A hand's square (left, top, side) in image pixels, and whether it is the left hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandBox {
    pub x: usize,
    pub y: usize,
    pub side: usize,
    pub left: bool,
}

/// `handDetect`: the square around each hand whose shoulder, elbow and wrist were found
/// (pixel positions), left hand first; none under 20 pixels. As for faces, the side is
/// shortened only where the square passes the image's right or bottom edge.
pub fn hand_boxes(keypoints: &[Option<(f64, f64)>], width: usize, height: usize) -> Vec<HandBox> {
    let part = |i: usize| keypoints.get(i).copied().flatten();
    ARMS.iter()
        .filter_map(|&([shoulder, elbow, wrist], left)| {
            let ((x1, y1), (x2, y2), (x3, y3)) = (part(shoulder)?, part(elbow)?, part(wrist)?);
            let wrist_elbow = ((x3 - x2).powi(2) + (y3 - y2).powi(2)).sqrt();
            let elbow_shoulder = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt();
            let side = 1.5 * wrist_elbow.max(0.9 * elbow_shoulder);
            let x = (x3 + RATIO_WRIST_ELBOW * (x3 - x2) - side / 2.0).max(0.0);
            let y = (y3 + RATIO_WRIST_ELBOW * (y3 - y2) - side / 2.0).max(0.0);
            let side = shortened_side((x, y), side, side, (width, height));
            (side >= LEAST_SIDE).then_some(HandBox {
                x: x as usize,
                y: y as usize,
                side: side as usize,
                left,
            })
        })
        .collect()
}

/// The 21 keypoints the hand network finds in `square` of `image`, as image pixels (the
/// square's corner where a map marks no region), with `hand_maps` running the network on
/// each scale's input.
pub fn hand_keypoints(
    image: &RgbImage,
    square: HandBox,
    hand_maps: &mut impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<(usize, usize)>> {
    let Some(crop) = square_crop(image, (square.x, square.y), square.side) else {
        return Ok(vec![(square.x, square.y); KEYPOINTS]);
    };
    let (crop_width, crop_height) = (crop.width() as usize, crop.height() as usize);
    let blurred = blur_u8_interleaved(crop.as_raw(), (crop_width, crop_height), 3, BLUR_SIGMA);
    let blurred = RgbImage::from_raw(crop_width as u32, crop_height as u32, blurred)
        .ok_or_else(|| EngineError::Internal("a blurred hand crop of the wrong size".into()))?;
    let mut averaged = vec![vec![0f64; MAP_SIDE * MAP_SIDE]; KEYPOINTS];
    for scale in SCALES {
        let maps = scale_maps(&blurred, (scale * BOX_SIZE) as usize, hand_maps)?;
        for (sum, map) in averaged.iter_mut().zip(maps) {
            for (s, v) in sum.iter_mut().zip(map) {
                *s += f64::from(v / SCALES.len() as f32);
            }
        }
    }
    Ok(averaged
        .iter_mut()
        .map(|map| {
            let (x, y) = keypoint(map).unwrap_or((0, 0));
            let at = |p: usize, side: usize| (p as f64 * side as f64 / MAP_SIDE as f64) as usize;
            (square.x + at(x, crop_width), square.y + at(y, crop_height))
        })
        .collect())
}

/// The 21 keypoint maps of one scale at 128²: the crop resized to `side`², padded to the
/// stride, through the network, each map enlarged ×8, its padding cut, then resized.
fn scale_maps(
    crop: &RgbImage,
    side: usize,
    hand_maps: &mut impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let resized = smart_resize(crop, (side, side));
    let padded = side.div_ceil(STRIDE) * STRIDE;
    let maps = hand_maps(&bgr_input(&resized, (padded, padded), PAD_VALUE))?;
    let grid = padded / STRIDE;
    let values = Vec::<f32>::try_from(maps.to_kind(Kind::Float).contiguous().view(-1))?;
    if values.len() < KEYPOINTS * grid * grid || values.len() % (grid * grid) != 0 {
        return Err(EngineError::Internal(format!(
            "hand maps of shape {:?} for a {padded}² input",
            maps.size()
        )));
    }
    Ok(values
        .chunks_exact(grid * grid)
        .take(KEYPOINTS)
        .map(|plane| {
            let (grid, padded, side) = ((grid, grid), (padded, padded), (side, side));
            plane_back(plane, grid, padded, side, (MAP_SIDE, MAP_SIDE))
        })
        .collect())
}

/// A keypoint's averaged map (128², row-major) to its position: its smoothed values above
/// the threshold grouped into 8-connected regions, the region whose values sum highest
/// kept (the rest of the map zeroed, as the reference zeroes it), and the map's first
/// maximum; `None` where no value passes.
fn keypoint(map: &mut [f64]) -> Option<(usize, usize)> {
    let smooth = gaussian_filter(map, MAP_SIDE, MAP_SIDE);
    let marked: Vec<bool> = smooth.iter().map(|&v| v > THRESHOLD).collect();
    let (labels, regions) = regions(&marked, MAP_SIDE, MAP_SIDE);
    if regions == 0 {
        return None;
    }
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); regions];
    for (&label, &value) in labels.iter().zip(map.iter()) {
        if label > 0 {
            members[label - 1].push(value);
        }
    }
    let sums: Vec<f64> = members.iter().map(|m| numpy_sum(m)).collect();
    let best = first_maximum(&sums) + 1;
    for (value, &label) in map.iter_mut().zip(&labels) {
        if label != best {
            *value = 0.0;
        }
    }
    let at = first_maximum(map);
    Some((at % MAP_SIDE, at / MAP_SIDE))
}

/// The index of the first largest value (numpy's `argmax`).
fn first_maximum(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// skimage's `label(marked, connectivity=2)`: 8-connected regions numbered from 1 in the
/// order a row-major scan meets them (0: unmarked), and how many there are.
fn regions(marked: &[bool], width: usize, height: usize) -> (Vec<usize>, usize) {
    let mut labels = vec![0usize; marked.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..marked.len() {
        if !marked[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(at) = stack.pop() {
            let (x, y) = ((at % width) as i64, (at / width) as i64);
            for (dx, dy) in (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (dx, dy))) {
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= width as i64 || ny >= height as i64 {
                    continue;
                }
                let next = ny as usize * width + nx as usize;
                if marked[next] && labels[next] == 0 {
                    labels[next] = count;
                    stack.push(next);
                }
            }
        }
    }
    (labels, count)
}

/// matplotlib's `hsv_to_rgb` of a hue at full saturation and value, scaled to 255 and
/// rounded as OpenCV takes a colour (half to even).
fn bone_colour(hue: f64) -> [u8; 3] {
    let sector = (hue * 6.0) as i64;
    let f = hue * 6.0 - sector as f64;
    let (v, p, q, t) = (1.0, 0.0, 1.0 - f, 1.0 - (1.0 - f));
    let rgb = match sector % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    };
    rgb.map(|c: f64| (c * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
}

/// `draw_handpose`: each bone whose two keypoints' pixels (normalised position times the
/// canvas's size in float32, truncated) are past the first row and column, as a line of
/// thickness 2 in its hue, then each such keypoint as a blue dot.
pub fn draw_hand(canvas: &mut RgbImage, keypoints: &[(f32, f32)]) {
    let size = canvas.dimensions();
    let pixels: Vec<_> = keypoints
        .iter()
        .map(|&p| Some(float32_pixel(p, size)))
        .collect();
    draw_hand_pixels(canvas, &pixels);
}

/// `draw_handpose` of keypoints already at their pixels (`None`: not there): the bones
/// and dots whose pixels are past the first row and column.
pub fn draw_hand_pixels(canvas: &mut RgbImage, pixels: &[Option<(i32, i32)>]) {
    let shown = |p: &Option<(i32, i32)>| p.filter(|&(x, y)| x > 0 && y > 0);
    for (i, [a, b]) in BONES.iter().enumerate() {
        let (Some(a), Some(b)) = (
            pixels.get(*a).and_then(shown),
            pixels.get(*b).and_then(shown),
        ) else {
            continue;
        };
        let colour = bone_colour(i as f64 / BONES.len() as f64);
        thick_line(canvas, a, b, BONE_THICKNESS, colour);
    }
    for point in pixels.iter().filter_map(shown) {
        fill_circle(canvas, point, DOT_RADIUS, DOT);
    }
}
