//! OpenCV's drawing primitives as controlnet_aux's `draw_bodypose` and `draw_handpose`
//! call them on 8-bit RGB (8-connected, no antialiasing): `ellipse2Poly` with its table
//! of sines at whole degrees, `fillConvexPoly` (outline by Bresenham lines, then scan
//! lines in 16.16 fixed point), the filled midpoint `circle` and the thick `line` (a
//! quadrilateral in fixed point with round ends), pixel for pixel; and `draw_bodypose`
//! itself, a person's limbs and joints.

use image::{Rgb, RgbImage};

use crate::engine::preprocess::pose_decode::{LIMBS, PARTS};

/// How many of the decoding's limbs `draw_bodypose` draws (not the ear-to-shoulder
/// pairs), and the colours of limbs and joints.
const DRAWN_LIMBS: usize = 17;
const COLOURS: [[u8; 3]; PARTS] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];
/// Limbs are ellipses this many pixels across either side of the joint-to-joint axis.
const STICK_WIDTH: i32 = 4;
const JOINT_RADIUS: i32 = 4;

/// Fixed-point fraction bits of OpenCV's drawing.
const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

/// OpenCV's `SinTable` entry for a whole angle in degrees (0 to 450): the sine rounded
/// to seven decimals, as a float.
fn table_sine(degrees: i32) -> f32 {
    let exact = f64::from(degrees).to_radians().sin();
    ((exact * 1e7).round() / 1e7) as f32
}

/// `cv::ellipse2Poly(center, axes, angle, 0, 360, 1)`: the whole ellipse's vertices at
/// every degree, rounded half to even, repeats dropped.
pub fn ellipse_polygon(center: (i32, i32), axes: (i32, i32), angle: i32) -> Vec<(i32, i32)> {
    let angle = angle.rem_euclid(360);
    let (alpha, beta) = (table_sine(450 - angle), table_sine(angle));
    let mut points: Vec<(i32, i32)> = Vec::with_capacity(361);
    for i in 0..=360 {
        let x = f64::from(axes.0) * f64::from(table_sine(450 - i));
        let y = f64::from(axes.1) * f64::from(table_sine(i));
        let px = f64::from(center.0) + x * f64::from(alpha) - y * f64::from(beta);
        let py = f64::from(center.1) + x * f64::from(beta) + y * f64::from(alpha);
        let point = (px.round_ties_even() as i32, py.round_ties_even() as i32);
        if points.last() != Some(&point) {
            points.push(point);
        }
    }
    if points.len() == 1 {
        points = vec![center, center];
    }
    points
}

/// `cv::fillConvexPoly(canvas, points, color)`.
pub fn fill_convex_polygon(canvas: &mut RgbImage, points: &[(i32, i32)], color: [u8; 3]) {
    let whole: Vec<(i64, i64)> = points
        .iter()
        .map(|&(x, y)| (i64::from(x), i64::from(y)))
        .collect();
    fill_convex_shifted(canvas, &whole, 0, color);
}

/// OpenCV's `FillConvexPoly` of vertices with `shift` fractional bits (8-connected): the
/// outline (`Line` on whole points, `Line2` in fixed point), then scan lines in 16.16
/// fixed point between the two edges walked down from the top vertex.
fn fill_convex_shifted(canvas: &mut RgbImage, points: &[(i64, i64)], shift: u32, color: [u8; 3]) {
    let n = points.len();
    if n == 0 {
        return;
    }
    let to_fixed = |p: (i64, i64)| (p.0 << (XY_SHIFT - shift), p.1 << (XY_SHIFT - shift));
    let mut previous = to_fixed(points[n - 1]);
    for &p in points {
        let p = to_fixed(p);
        if shift == 0 {
            let whole = |q: (i64, i64)| ((q.0 >> XY_SHIFT) as i32, (q.1 >> XY_SHIFT) as i32);
            line(canvas, whole(previous), whole(p), color);
        } else {
            line_fixed(canvas, previous, p, color);
        }
        previous = p;
    }
    let delta = (1i64 << shift) >> 1;
    let rounded = |v: i64| ((v + delta) >> shift) as i32;
    let ys = points.iter().map(|p| p.1);
    let xs = points.iter().map(|p| p.0);
    let (ymin, ymax) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0));
    let (xmin, xmax) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0));
    let (xmin, xmax, ymin_row, ymax) = (rounded(xmin), rounded(xmax), rounded(ymin), rounded(ymax));
    let (width, height) = (canvas.width() as i32, canvas.height() as i32);
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= width || ymin_row >= height {
        return;
    }
    let ymax = ymax.min(height - 1);
    let top = points.iter().position(|p| p.1 == ymin).unwrap_or(0);
    let mut edges = [Edge::new(top, 1), Edge::new(top, n - 1)];
    let mut remaining = n as i64;
    let mut y = ymin_row;
    loop {
        for edge in &mut edges {
            if y >= edge.end_y {
                edge.advance(points, shift, y, &mut remaining);
            }
        }
        if remaining < 0 {
            break;
        }
        if y < 0 {
            // Rows above the canvas draw nothing: walked in one step to the next vertex
            // or the first row (the same integer sums, row by row).
            let next = edges[0].end_y.min(edges[1].end_y).min(0);
            let rows = i64::from(next - y);
            for edge in &mut edges {
                edge.x += edge.dx * rows;
            }
            y = next;
            continue;
        }
        let (left, right) = if edges[0].x > edges[1].x {
            (1, 0)
        } else {
            (0, 1)
        };
        let x1 = ((edges[left].x + XY_ONE / 2) >> XY_SHIFT) as i32;
        let x2 = ((edges[right].x + XY_ONE / 2) >> XY_SHIFT) as i32;
        if x2 >= 0 && x1 < width {
            horizontal_line(canvas, y, x1.max(0), x2.min(width - 1), color);
        }
        for edge in &mut edges {
            edge.x += edge.dx;
        }
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// One side of the polygon's scan: the vertex it last reached, its walking direction,
/// its x in fixed point, the step per row and the row where it ends.
struct Edge {
    index: usize,
    step: usize,
    x: i64,
    dx: i64,
    end_y: i32,
}

impl Edge {
    fn new(index: usize, step: usize) -> Self {
        Self {
            index,
            step,
            x: -XY_ONE,
            dx: 0,
            end_y: i32::MIN,
        }
    }

    /// Walks to the next vertex below row `y`, spending the shared count of edges.
    fn advance(&mut self, points: &[(i64, i64)], shift: u32, y: i32, remaining: &mut i64) {
        let n = points.len();
        let delta = (1i64 << shift) >> 1;
        let mut from = self.index;
        let mut to = (from + self.step) % n;
        loop {
            *remaining -= 1;
            if *remaining < 0 {
                return;
            }
            let end_y = ((points[to].1 + delta) >> shift) as i32;
            if end_y > y {
                let xs = points[from].0 << (XY_SHIFT - shift);
                let xe = points[to].0 << (XY_SHIFT - shift);
                let rows = i64::from(end_y) - i64::from(y);
                self.end_y = end_y;
                // C's division, truncating toward zero.
                self.dx = ((xe - xs) * 2 + rows) / (2 * rows);
                self.x = xs;
                self.index = to;
                return;
            }
            from = to;
            to = (to + self.step) % n;
        }
    }
}

/// Pixels `x1..=x2` of row `y`.
fn horizontal_line(canvas: &mut RgbImage, y: i32, x1: i32, x2: i32, color: [u8; 3]) {
    for x in x1..=x2 {
        canvas.put_pixel(x as u32, y as u32, Rgb(color));
    }
}

/// OpenCV's 8-connected `Line` (its `LineIterator`, left to right, clipped to the image).
pub fn line(canvas: &mut RgbImage, p1: (i32, i32), p2: (i32, i32), color: [u8; 3]) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let (mut a, mut b) = (
        (i64::from(p1.0), i64::from(p1.1)),
        (i64::from(p2.0), i64::from(p2.1)),
    );
    let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= width || p.1 < 0 || p.1 >= height;
    if (outside(a) || outside(b)) && !clip_line(width, height, &mut a, &mut b) {
        return;
    }
    let (mut dx, mut dy) = (b.0 - a.0, b.1 - a.1);
    let (mut step_x, mut step_y) = (1i64, 1i64);
    if dx < 0 {
        dx = -dx;
        dy = -dy;
        a = b;
    }
    if dy < 0 {
        dy = -dy;
        step_y = -1;
    }
    let vertical = dy > dx;
    if vertical {
        std::mem::swap(&mut dx, &mut dy);
        std::mem::swap(&mut step_x, &mut step_y);
    }
    // The major axis advances every pixel, the minor one when the error turns negative.
    let mut err = dx - (dy + dy);
    let (plus, minus) = (dx + dx, -(dy + dy));
    let mut p = a;
    for _ in 0..=dx {
        canvas.put_pixel(p.0 as u32, p.1 as u32, Rgb(color));
        let mask = err < 0;
        err += minus + if mask { plus } else { 0 };
        if vertical {
            p.1 += step_x;
            if mask {
                p.0 += step_y;
            }
        } else {
            p.0 += step_x;
            if mask {
                p.1 += step_y;
            }
        }
    }
}

/// OpenCV's `Line2`: the 8-connected line between points in 16.16 fixed point (the
/// outline of a polygon drawn with a shift), clipped to the image.
fn line_fixed(canvas: &mut RgbImage, p1: (i64, i64), p2: (i64, i64), color: [u8; 3]) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let (mut a, mut b) = (p1, p2);
    if !clip_line(width << XY_SHIFT, height << XY_SHIFT, &mut a, &mut b) {
        return;
    }
    let mut put = |x: i64, y: i64| {
        if (0..width).contains(&x) && (0..height).contains(&y) {
            canvas.put_pixel(x as u32, y as u32, Rgb(color));
        }
    };
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let along_x = dx.abs() > dy.abs();
    // Drawn from the end with the smaller major coordinate.
    if (along_x && dx < 0) || (!along_x && dy < 0) {
        std::mem::swap(&mut a, &mut b);
    }
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    put(
        (b.0 + XY_ONE / 2) >> XY_SHIFT,
        (b.1 + XY_ONE / 2) >> XY_SHIFT,
    );
    let (mut x, mut y) = (a.0 + XY_ONE / 2, a.1 + XY_ONE / 2);
    if along_x {
        // C's division, truncating toward zero.
        let y_step = (dy << XY_SHIFT) / (dx.abs() | 1);
        x >>= XY_SHIFT;
        for _ in 0..=(dx >> XY_SHIFT) {
            put(x, y >> XY_SHIFT);
            x += 1;
            y += y_step;
        }
    } else {
        let x_step = (dx << XY_SHIFT) / (dy.abs() | 1);
        y >>= XY_SHIFT;
        for _ in 0..=(dy >> XY_SHIFT) {
            put(x >> XY_SHIFT, y);
            x += x_step;
            y += 1;
        }
    }
}

/// `cv2.line(canvas, p0, p1, color, thickness)` for a thickness above 1 (OpenCV 4.14's
/// `line` and `ThickLine`, 8-connected): the segment clipped to the image grown by the
/// thickness on every side, then a quadrilateral half the thickness either side of its
/// axis, filled in 16.16 fixed point, and a filled circle at each of its ends.
pub fn thick_line(
    canvas: &mut RgbImage,
    p0: (i32, i32),
    p1: (i32, i32),
    thickness: i32,
    color: [u8; 3],
) {
    let margin = i64::from(thickness);
    let grown = |p: (i32, i32)| (i64::from(p.0) + margin, i64::from(p.1) + margin);
    let (mut a, mut b) = (grown(p0), grown(p1));
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    if !clip_line(width + 2 * margin, height + 2 * margin, &mut a, &mut b) {
        return;
    }
    let fixed = |p: (i64, i64)| ((p.0 - margin) << XY_SHIFT, (p.1 - margin) << XY_SHIFT);
    let (a, b) = (fixed(a), fixed(b));
    let dx = (a.0 - b.0) as f64 / XY_ONE as f64;
    let dy = (b.1 - a.1) as f64 / XY_ONE as f64;
    let r = dx * dx + dy * dy;
    let odd = thickness & 1;
    let half = i64::from(thickness) << (XY_SHIFT - 1);
    if r.abs() > f64::EPSILON {
        let r = (half as f64 + f64::from(odd) * XY_ONE as f64 * 0.5) / r.sqrt();
        let (ox, oy) = (
            (dy * r).round_ties_even() as i64,
            (dx * r).round_ties_even() as i64,
        );
        let corners = [
            (a.0 + ox, a.1 + oy),
            (a.0 - ox, a.1 - oy),
            (b.0 - ox, b.1 - oy),
            (b.0 + ox, b.1 + oy),
        ];
        fill_convex_shifted(canvas, &corners, XY_SHIFT, color);
    }
    let radius = ((half + XY_ONE / 2) >> XY_SHIFT) as i32;
    for end in [a, b] {
        let centre = (
            ((end.0 + XY_ONE / 2) >> XY_SHIFT) as i32,
            ((end.1 + XY_ONE / 2) >> XY_SHIFT) as i32,
        );
        fill_circle(canvas, centre, radius, color);
    }
}

/// `cv::clipLine` to a `width`×`height` image; false when the line misses it.
fn clip_line(width: i64, height: i64, a: &mut (i64, i64), b: &mut (i64, i64)) -> bool {
    let (right, bottom) = (width - 1, height - 1);
    let code = |p: &(i64, i64)| {
        i32::from(p.0 < 0)
            + i32::from(p.0 > right) * 2
            + i32::from(p.1 < 0) * 4
            + i32::from(p.1 > bottom) * 8
    };
    let (mut c1, mut c2) = (code(a), code(b));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let edge = if c1 < 8 { 0 } else { bottom };
            a.0 += ((edge - a.1) as f64 * (b.0 - a.0) as f64 / (b.1 - a.1) as f64) as i64;
            a.1 = edge;
            c1 = i32::from(a.0 < 0) + i32::from(a.0 > right) * 2;
        }
        if c2 & 12 != 0 {
            let edge = if c2 < 8 { 0 } else { bottom };
            b.0 += ((edge - b.1) as f64 * (b.0 - a.0) as f64 / (b.1 - a.1) as f64) as i64;
            b.1 = edge;
            c2 = i32::from(b.0 < 0) + i32::from(b.0 > right) * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let edge = if c1 == 1 { 0 } else { right };
                a.1 += ((edge - a.0) as f64 * (b.1 - a.1) as f64 / (b.0 - a.0) as f64) as i64;
                a.0 = edge;
                c1 = 0;
            }
            if c2 != 0 {
                let edge = if c2 == 1 { 0 } else { right };
                b.1 += ((edge - b.0) as f64 * (b.1 - a.1) as f64 / (b.0 - a.0) as f64) as i64;
                b.0 = edge;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// The pixel a position normalised in float32 lands on, as the reference draws hands and
/// faces: the position times the canvas's size in float32, truncated.
pub fn float32_pixel((x, y): (f32, f32), (width, height): (u32, u32)) -> (i32, i32) {
    ((x * width as f32) as i32, (y * height as f32) as i32)
}

/// `cv::circle(canvas, center, radius, color, thickness=-1)`: the midpoint circle, each
/// octant pair's row filled.
pub fn fill_circle(canvas: &mut RgbImage, center: (i32, i32), radius: i32, color: [u8; 3]) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let (cx, cy) = (i64::from(center.0), i64::from(center.1));
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (
        0i64,
        i64::from(radius),
        0i64,
        1i64,
        i64::from(radius) * 2 - 1,
    );
    let mut row = |y: i64, x1: i64, x2: i64| {
        if (0..height).contains(&y) && x1 < width && x2 >= 0 {
            horizontal_line(
                canvas,
                y as i32,
                x1.max(0) as i32,
                x2.min(width - 1) as i32,
                color,
            );
        }
    };
    while dx >= dy {
        row(cy - dy, cx - dx, cx + dx);
        row(cy + dy, cx - dx, cx + dx);
        if cx - dy < width && cx + dy >= 0 {
            row(cy - dx, cx - dy, cx + dy);
            row(cy + dx, cx - dy, cx + dy);
        }
        dy += 1;
        err += plus;
        plus += 2;
        let mask = if err <= 0 { 0 } else { -1 };
        err -= minus & mask;
        dx += mask;
        minus -= mask & 2;
    }
}

/// `draw_bodypose` of one person's 18 keypoints, at their normalised positions times the
/// canvas's size.
pub fn draw_body(canvas: &mut RgbImage, keypoints: &[Option<(f64, f64)>]) {
    for ([a, b], colour) in LIMBS.iter().take(DRAWN_LIMBS).zip(COLOURS) {
        let at = |i: usize| keypoints.get(i - 1).copied().flatten();
        if let (Some(p), Some(q)) = (at(*a), at(*b)) {
            draw_limb(canvas, p, q, colour);
        }
    }
    for (keypoint, colour) in keypoints.iter().zip(COLOURS) {
        if let Some((x, y)) = keypoint {
            fill_circle(canvas, (*x as i32, *y as i32), JOINT_RADIUS, colour);
        }
    }
}

/// One limb: an ellipse between its joints, filled at 60 % of its colour.
fn draw_limb(canvas: &mut RgbImage, (x1, y1): (f64, f64), (x2, y2): (f64, f64), colour: [u8; 3]) {
    let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
    let length = ((y1 - y2).powf(2.0) + (x1 - x2).powf(2.0)).powf(0.5);
    let angle = (y1 - y2).atan2(x1 - x2) * (180.0 / std::f64::consts::PI);
    let polygon = ellipse_polygon(
        (mx as i32, my as i32),
        ((length / 2.0) as i32, STICK_WIDTH),
        angle as i32,
    );
    let dimmed = colour.map(|c| (f64::from(c) * 0.6) as u8);
    fill_convex_polygon(canvas, &polygon, dimmed);
}
