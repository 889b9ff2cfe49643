//! `cv2.resize` of one-channel float32 planes with the filters controlnet_aux's OpenPose
//! detector resizes its network's maps with (`INTER_LANCZOS4` to enlarge, `INTER_AREA`
//! to shrink), in OpenCV's float arithmetic and order of sums, so the maps equal the
//! reference's to the last bit.

use super::cv_resize::{lanczos4, overlaps};

/// `cv2.resize(plane, (dw, dh), INTER_LANCZOS4)` of a plane of `size` (width, height).
pub fn resize_plane_lanczos4(
    plane: &[f32],
    (width, height): (usize, usize),
    dw: usize,
    dh: usize,
) -> Vec<f32> {
    if (dw, dh) == (width, height) {
        return plane.to_vec();
    }
    let xs = lanczos_positions(width, dw);
    let ys = lanczos_positions(height, dh);
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    // `HResizeLanczos4`: eight products summed left to right, borders replicated.
    let mut padded = vec![0f32; width + 8];
    let mut horizontal = |y: usize| -> Vec<f32> {
        let row = &plane[y * width..(y + 1) * width];
        for (i, p) in padded.iter_mut().enumerate() {
            *p = row[clamp(i as i64 - 3, width)];
        }
        xs.iter()
            .map(|(start, weights)| {
                let at = |k: i64| padded[(start + k + 3).clamp(0, width as i64 + 7) as usize];
                let mut sum = 0f32;
                for (k, w) in weights.iter().enumerate() {
                    sum += at(k as i64) * w;
                }
                sum
            })
            .collect()
    };
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; height];
    let mut out = Vec::with_capacity(dw * dh);
    for (start, weights) in &ys {
        let sources: Vec<usize> = (0..8).map(|k| clamp(start + k, height)).collect();
        for &s in &sources {
            if rows[s].is_none() {
                rows[s] = Some(horizontal(s));
            }
        }
        let taps: Vec<&[f32]> = sources.iter().filter_map(|&s| rows[s].as_deref()).collect();
        out.extend(vertical_lanczos(&taps, weights, dw));
    }
    out
}

/// Lanes of OpenCV's vector pass (SSE and NEON registers hold four floats).
const LANES: usize = 4;

/// `VResizeLanczos4`: columns in whole vectors sum the products from the last row up
/// (`v_muladd` nested), the remaining columns from the first row down.
fn vertical_lanczos(taps: &[&[f32]], weights: &[f32; 8], width: usize) -> Vec<f32> {
    let vectorised = width - width % LANES;
    let mut out: Vec<f32> = taps[7].iter().map(|v| v * weights[7]).collect();
    for k in (0..7).rev() {
        for (o, v) in out[..vectorised].iter_mut().zip(taps[k]) {
            *o += v * weights[k];
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(vectorised) {
        let mut sum = taps[0][i] * weights[0];
        for k in 1..8 {
            sum += taps[k][i] * weights[k];
        }
        *o = sum;
    }
    out
}

/// Each destination pixel's first source pixel (three before its own, unclamped) and
/// Lanczos weights, positions in float32 as OpenCV computes them.
fn lanczos_positions(source: usize, destination: usize) -> Vec<(i64, [f32; 8])> {
    let scale = 1.0 / (destination as f64 / source as f64);
    (0..destination)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            (s as i64 - 3, lanczos4(f - s))
        })
        .collect()
}

/// `cv2.resize(plane, (dw, dh), INTER_AREA)` of a plane of `size` (width, height) that
/// does not grow along either axis.
pub fn resize_plane_area(
    plane: &[f32],
    (width, height): (usize, usize),
    dw: usize,
    dh: usize,
) -> Vec<f32> {
    let scale_x = 1.0 / (dw as f64 / width as f64);
    let scale_y = 1.0 / (dh as f64 / height as f64);
    let integer = |s: f64| (s - s.round_ties_even()).abs() < f64::EPSILON;
    if integer(scale_x) && integer(scale_y) {
        let (sx, sy) = (scale_x.round() as usize, scale_y.round() as usize);
        area_blocks(plane, width, (dw, dh), (sx, sy))
    } else {
        area_overlaps(plane, (width, height), (dw, dh), (scale_x, scale_y))
    }
}

/// `resizeAreaFast_`: each block's sum times the float reciprocal of its area; 2×2 blocks
/// in whole vectors as (top pair + bottom pair), the rest in OpenCV's unrolled order.
fn area_blocks(
    plane: &[f32],
    width: usize,
    (dw, dh): (usize, usize),
    (sx, sy): (usize, usize),
) -> Vec<f32> {
    let reciprocal = 1.0f32 / (sx * sy) as f32;
    let vectorised = if (sx, sy) == (2, 2) {
        dw - dw % LANES
    } else {
        0
    };
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        for x in 0..dw {
            let values: Vec<f32> = (0..sy)
                .flat_map(|k| {
                    let row = (y * sy + k) * width + x * sx;
                    plane[row..row + sx].iter().copied()
                })
                .collect();
            let sum = if x < vectorised {
                (values[0] + values[1]) + (values[2] + values[3])
            } else {
                let mut sum = 0f32;
                let mut groups = values.chunks_exact(4);
                for g in groups.by_ref() {
                    sum += g[0] + g[1] + g[2] + g[3];
                }
                for v in groups.remainder() {
                    sum += v;
                }
                sum
            };
            out.push(sum * reciprocal);
        }
    }
    out
}

/// `ResizeArea_Invoker`: each source row weighted along x into a float buffer, the
/// buffers weighted along y, in OpenCV's order of float sums.
fn area_overlaps(
    plane: &[f32],
    (width, height): (usize, usize),
    (dw, dh): (usize, usize),
    (scale_x, scale_y): (f64, f64),
) -> Vec<f32> {
    let xs = overlaps(width, dw, scale_x);
    let ys = overlaps(height, dh, scale_y);
    let mut out = vec![0f32; dw * dh];
    let mut sums = vec![0f32; dw];
    let mut buffer = vec![0f32; dw];
    let mut current = 0;
    for y in &ys {
        let row = &plane[y.source * width..(y.source + 1) * width];
        buffer.iter_mut().for_each(|b| *b = 0.0);
        for x in &xs {
            buffer[x.destination] += row[x.source] * x.weight;
        }
        if y.destination != current {
            out[current * dw..(current + 1) * dw].copy_from_slice(&sums);
            for (s, b) in sums.iter_mut().zip(&buffer) {
                *s = y.weight * b;
            }
            current = y.destination;
        } else {
            for (s, b) in sums.iter_mut().zip(&buffer) {
                *s += y.weight * b;
            }
        }
    }
    out[current * dw..(current + 1) * dw].copy_from_slice(&sums);
    out
}
