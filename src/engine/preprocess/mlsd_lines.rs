//! M-LSD's segments, as controlnet_aux's `pred_lines` decodes them from the network's
//! outputs and `MLSDdetector` draws them.

use image::GrayImage;
use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::cv_line::draw_line;

/// The segment centres the decoding takes (`topk_n`).
pub const CANDIDATES: i64 = 200;

/// The thresholds of `MLSDdetector` (`thr_v`, `thr_d`): a segment is drawn when its
/// centre score (a sigmoid) is above `score` and its length, in pixels of the half-size
/// output, above `distance`. Compared in float32, as numpy compares them.
#[derive(Debug, Clone, Copy)]
pub struct LineThresholds {
    pub score: f32,
    pub distance: f32,
}

impl Default for LineThresholds {
    /// controlnet_aux's defaults.
    fn default() -> Self {
        Self {
            score: 0.1,
            distance: 0.1,
        }
    }
}

impl PartialEq for LineThresholds {
    fn eq(&self, other: &Self) -> bool {
        self.score.to_bits() == other.score.to_bits()
            && self.distance.to_bits() == other.distance.to_bits()
    }
}

impl Eq for LineThresholds {}

/// The segments `pred_lines` keeps from the network's outputs [1, C, h, w]: the 200
/// best local maxima (3×3) of the centre score, those whose score and length pass the
/// thresholds, as (x1, y1, x2, y2) in the output grid, best first.
pub fn segments(tpmap: &Tensor, thresholds: LineThresholds) -> Result<Vec<[f64; 4]>> {
    let size = tpmap.size();
    if size.len() != 4 || size[0] != 1 || size[1] < 5 || size[2] * size[3] < CANDIDATES {
        return Err(EngineError::InvalidRequest(format!(
            "M-LSD outputs of shape {size:?} hold no {CANDIDATES} candidates"
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let map = tpmap.to_device(Device::Cpu).to_kind(Kind::Float);
    let width = size[3];
    let heat = map.narrow(1, 0, 1).sigmoid();
    let peaks = heat.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false);
    let kept = &heat * peaks.eq_tensor(&heat).to_kind(Kind::Float);
    let (scores, indices) = kept.reshape([-1]).topk(CANDIDATES, -1, true, true);
    let scores = Vec::<f32>::try_from(scores)?;
    let indices = Vec::<i64>::try_from(indices)?;
    let displacements = map
        .narrow(1, 1, 4)
        .squeeze_dim(0)
        .permute([1, 2, 0])
        .contiguous();
    let displacements = Vec::<f32>::try_from(displacements.view(-1))?;
    let mut kept = Vec::new();
    for (score, index) in scores.into_iter().zip(indices) {
        let (y, x) = (index / width, index % width);
        let at = usize::try_from(index).map_or(usize::MAX, |i| i.saturating_mul(4));
        let Some(d) = displacements.get(at..at.saturating_add(4)) else {
            continue;
        };
        let (dx, dy) = (d[0] - d[2], d[1] - d[3]);
        let distance = (dx * dx + dy * dy).sqrt();
        if score > thresholds.score && distance > thresholds.distance {
            let (x, y) = (x as f64, y as f64);
            kept.push([
                x + f64::from(d[0]),
                y + f64::from(d[1]),
                x + f64::from(d[2]),
                y + f64::from(d[3]),
            ]);
        }
    }
    Ok(kept)
}

/// The segments of the network's outputs drawn as `MLSDdetector` draws them on a
/// `width`×`height` canvas: ends doubled to the image grid and truncated to integers,
/// each a 1-pixel 8-connected white line. Drawing stops at the first segment with an end
/// no integer of OpenCV's can hold, as its error stops controlnet_aux's loop.
pub fn line_map(
    tpmap: &Tensor,
    width: u32,
    height: u32,
    thresholds: LineThresholds,
) -> Result<GrayImage> {
    let mut canvas = GrayImage::new(width, height);
    for segment in segments(tpmap, thresholds)? {
        let ends = segment.map(|v| {
            let v = (2.0 * v).trunc();
            (v.is_finite() && v >= f64::from(i32::MIN) && v <= f64::from(i32::MAX))
                .then_some(v as i64)
        });
        let [Some(x1), Some(y1), Some(x2), Some(y2)] = ends else {
            break;
        };
        draw_line(&mut canvas, (x1, y1), (x2, y2), 255);
    }
    Ok(canvas)
}
