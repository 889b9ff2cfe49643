//! controlnet_aux's OpenPose face landmarks (`OpenposeDetector` with `include_face`):
//! a square around each person's head sized from the eyes and ears (`faceDetect`), the
//! image there scaled to 384² for the face network, its last stage's 71 maps enlarged
//! back to the crop (bilinear, corners aligned), each map's strongest point above 0.05
//! a landmark, drawn as a white dot (`draw_facepose`).

use image::RgbImage;
use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::openpose::{bgr_input, smart_resize};
use crate::engine::preprocess::pose_draw::{fill_circle, float32_pixel};

/// The side of the face network's square input.
const INPUT_SIDE: usize = 384;
/// A map whose values all stay at or below this has no landmark.
const PEAK_THRESHOLD: f32 = 0.05;
/// The least side of a face square the reference looks at.
const LEAST_SIDE: f64 = 20.0;
/// Body parts (the decoding's order) that size the face: the eyes, then the ears, with
/// the factor the largest offset from the nose is multiplied by.
const FACE_PARTS: [(usize, f64); 4] = [(14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)];
const NOSE: usize = 0;
/// The radius and colour of a drawn landmark.
const DOT_RADIUS: i32 = 3;
const DOT: [u8; 3] = [255, 255, 255];

/// A face's landmarks as `draw_facepose` takes them: image positions normalised by the
/// image's size (float32), -1 where the reference gives up a landmark.
pub type FaceLandmarks = Vec<(f32, f32)>;

/// A square (left, top, side) in image pixels; the crop is what of it lies in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceBox {
    pub x: usize,
    pub y: usize,
    pub side: usize,
}

/// `faceDetect`: the square around a person's head, from the nose and whichever eyes and
/// ears were found (pixel positions), or `None` without a nose, without any eye or ear,
/// or when the square is under 20 pixels. The reference shortens the side only where the
/// square's first half already passes the image's edge, so a crop may still be cut by
/// the edge.
pub fn face_box(keypoints: &[Option<(f64, f64)>], width: usize, height: usize) -> Option<FaceBox> {
    let (x0, y0) = keypoints.get(NOSE).copied().flatten()?;
    let parts: Vec<((f64, f64), f64)> = FACE_PARTS
        .iter()
        .filter_map(|&(part, factor)| Some((keypoints.get(part).copied().flatten()?, factor)))
        .collect();
    if parts.is_empty() {
        return None;
    }
    let half = parts.iter().fold(0.0f64, |half, ((x1, y1), factor)| {
        half.max((x0 - x1).abs().max((y0 - y1).abs()) * factor)
    });
    let x = (x0 - half).max(0.0);
    let y = (y0 - half).max(0.0);
    let side = shortened_side((x, y), half, half * 2.0, (width, height));
    (side >= LEAST_SIDE).then_some(FaceBox {
        x: x as usize,
        y: y as usize,
        side: side as usize,
    })
}

/// The side `faceDetect` and `handDetect` give a square at `(x, y)`: `side`, except along
/// an axis where `reach` from the corner passes the image's edge, there the distance to
/// the edge; the shorter of the two.
pub(super) fn shortened_side(
    (x, y): (f64, f64),
    reach: f64,
    side: f64,
    (width, height): (usize, usize),
) -> f64 {
    let across = if x + reach > width as f64 {
        width as f64 - x
    } else {
        side
    };
    let down = if y + reach > height as f64 {
        height as f64 - y
    } else {
        side
    };
    across.min(down)
}

/// What of the square with corner `(x, y)` and `side` lies in `image`, as the reference
/// slices it; `None` where nothing does.
pub(super) fn square_crop(
    image: &RgbImage,
    (x, y): (usize, usize),
    side: usize,
) -> Option<RgbImage> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let crop_width = side.min(width.saturating_sub(x));
    let crop_height = side.min(height.saturating_sub(y));
    (crop_width > 0 && crop_height > 0).then(|| {
        image::imageops::crop_imm(
            image,
            x as u32,
            y as u32,
            crop_width as u32,
            crop_height as u32,
        )
        .to_image()
    })
}

/// The landmarks the face network finds in `square` of `image` (`Face.__call__` and
/// `compute_peaks_from_heatmaps`), with `face_maps` running the network on its input:
/// for each map with a value above the threshold, its first strongest point (row by
/// row), as image pixels.
pub fn face_landmarks(
    image: &RgbImage,
    square: FaceBox,
    face_maps: &mut impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<(usize, usize)>> {
    let Some(crop) = square_crop(image, (square.x, square.y), square.side) else {
        return Ok(Vec::new());
    };
    let (crop_width, crop_height) = (crop.width() as usize, crop.height() as usize);
    let maps = face_maps(&network_input(&crop))?
        .to_kind(Kind::Float)
        .upsample_bilinear2d([crop_height as i64, crop_width as i64], true, None, None);
    let values = Vec::<f32>::try_from(maps.contiguous().view(-1))?;
    let plane = crop_width * crop_height;
    if values.is_empty() || values.len() % plane != 0 {
        return Err(EngineError::Internal(format!(
            "face maps of shape {:?} for a {crop_width}x{crop_height} crop",
            maps.size()
        )));
    }
    Ok(values
        .chunks_exact(plane)
        .filter_map(|map| strongest_above(map, PEAK_THRESHOLD))
        .map(|i| (square.x + i % crop_width, square.y + i / crop_width))
        .collect())
}

/// The index of a map's first maximum, if the maximum is above `threshold`.
fn strongest_above(map: &[f32], threshold: f32) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in map.iter().enumerate() {
        if v > threshold && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// The crop as the face network takes it: scaled to 384² (area averaging where its
/// sides' sum shrinks, Lanczos4 otherwise), BGR, value / 256 - 0.5, [1, 3, 384, 384].
pub fn network_input(crop: &RgbImage) -> Tensor {
    let square = (INPUT_SIDE, INPUT_SIDE);
    bgr_input(&smart_resize(crop, square), square, 0)
}

/// A face's landmarks (or a hand's keypoints) as the reference hands them to
/// `draw_facepose` (`draw_handpose`): image pixels normalised by the image's size in
/// float32, a landmark on the first row or column of the crop at (`left`, `top`) at -1.
pub fn normalised(
    landmarks: &[(usize, usize)],
    (left, top): (usize, usize),
    width: usize,
    height: usize,
) -> FaceLandmarks {
    let normal = |at: usize, origin: usize, size: usize| {
        let local = (at - origin) as f32;
        let moved = if local < 1e-6 {
            -1.0
        } else {
            local + origin as f32
        };
        moved / size as f32
    };
    landmarks
        .iter()
        .map(|&(x, y)| (normal(x, left, width), normal(y, top, height)))
        .collect()
}

/// `draw_facepose`: each landmark whose pixel (normalised position times the canvas's
/// size in float32, truncated) is past the first row and column, as a white dot.
pub fn draw_face(canvas: &mut RgbImage, landmarks: &[(f32, f32)]) {
    let size = canvas.dimensions();
    let pixels: Vec<_> = landmarks
        .iter()
        .map(|&p| Some(float32_pixel(p, size)))
        .collect();
    draw_face_pixels(canvas, &pixels);
}

/// `draw_facepose` of landmarks already at their pixels (`None`: not there): those past
/// the first row and column.
pub fn draw_face_pixels(canvas: &mut RgbImage, pixels: &[Option<(i32, i32)>]) {
    for &(x, y) in pixels.iter().flatten() {
        if x > 0 && y > 0 {
            fill_circle(canvas, (x, y), DOT_RADIUS, DOT);
        }
    }
}
