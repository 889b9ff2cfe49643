//! OpenCV's drawing primitives as controlnet_aux's `draw_bodypose` calls them on 8-bit
//! RGB (8-connected, no antialiasing, no sub-pixel shift): `ellipse2Poly` with its table
//! of sines at whole degrees, `fillConvexPoly` (outline by Bresenham lines, then scan
//! lines in 16.16 fixed point) and the filled midpoint `circle`, pixel for pixel.

use image::{Rgb, RgbImage};

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
    let n = points.len();
    if n == 0 {
        return;
    }
    let mut previous = points[n - 1];
    for &p in points {
        line(canvas, previous, p, color);
        previous = p;
    }
    let ys = points.iter().map(|p| p.1);
    let xs = points.iter().map(|p| p.0);
    let (ymin, ymax) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0));
    let (xmin, xmax) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0));
    let (width, height) = (canvas.width() as i32, canvas.height() as i32);
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= width || ymin >= height {
        return;
    }
    let ymax = ymax.min(height - 1);
    let top = points.iter().position(|p| p.1 == ymin).unwrap_or(0);
    let mut edges = [Edge::new(top, 1), Edge::new(top, n - 1)];
    let mut remaining = n as i64;
    let mut y = ymin;
    loop {
        for edge in &mut edges {
            if y >= edge.end_y {
                edge.advance(points, y, &mut remaining);
            }
        }
        if remaining < 0 {
            break;
        }
        if y >= 0 {
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
    fn advance(&mut self, points: &[(i32, i32)], y: i32, remaining: &mut i64) {
        let n = points.len();
        let mut from = self.index;
        let mut to = (from + self.step) % n;
        loop {
            *remaining -= 1;
            if *remaining < 0 {
                return;
            }
            let end_y = points[to].1;
            if end_y > y {
                let xs = i64::from(points[from].0) << XY_SHIFT;
                let xe = i64::from(points[to].0) << XY_SHIFT;
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
