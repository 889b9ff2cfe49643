//! OpenCV's `cv2.line` of thickness 1, 8-connected (its `LineIterator`): the ends
//! clipped to the canvas as its `clipLine` clips them, then Bresenham's steps from the
//! left end (`err = dx - 2·dy`, a minor step whenever the error was negative).

use image::GrayImage;

/// Draws the line from `from` to `to` (pixel coordinates, anywhere) in `value`.
pub fn draw_line(canvas: &mut GrayImage, from: (i64, i64), to: (i64, i64), value: u8) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let inside = |(x, y): (i64, i64)| (0..width).contains(&x) && (0..height).contains(&y);
    let (mut from, mut to) = (from, to);
    let visible = inside(from) && inside(to) || clip_line(width, height, &mut from, &mut to);
    // Clipping leaves both ends on the canvas but for ends so far out that OpenCV's own
    // arithmetic overflows; those it would draw out of bounds, and here draw nothing.
    if !(visible && inside(from) && inside(to)) {
        return;
    }
    // Left to right: a line going left starts at its other end.
    if to.0 < from.0 {
        std::mem::swap(&mut from, &mut to);
    }
    let (mut dx, mut dy) = (to.0 - from.0, to.1 - from.1);
    let step_y = if dy < 0 { -1 } else { 1 };
    dy = dy.abs();
    let vertical = dy > dx;
    if vertical {
        std::mem::swap(&mut dx, &mut dy);
    }
    let (mut x, mut y) = from;
    let mut err = dx - 2 * dy;
    for _ in 0..=dx {
        if inside((x, y)) {
            canvas.put_pixel(x as u32, y as u32, image::Luma([value]));
        }
        let minor = err < 0;
        err += -2 * dy + if minor { 2 * dx } else { 0 };
        if vertical {
            y += step_y;
            x += i64::from(minor);
        } else {
            x += 1;
            y += if minor { step_y } else { 0 };
        }
    }
}

/// OpenCV's `clipLine` for a `width`×`height` canvas: each end outside it moved along
/// the line onto its edge (rows first, then columns; 64-bit integer arithmetic,
/// truncating); false when the line misses the canvas.
fn clip_line(width: i64, height: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    let (right, bottom) = (width - 1, height - 1);
    if width <= 0 || height <= 0 {
        return false;
    }
    let code = |(x, y): (i64, i64)| {
        i32::from(x < 0)
            + i32::from(x > right) * 2
            + i32::from(y < 0) * 4
            + i32::from(y > bottom) * 8
    };
    let (mut c1, mut c2) = (code(*p1), code(*p2));
    let columns = |x: i64| i32::from(x < 0) + i32::from(x > right) * 2;
    if c1 & c2 == 0 && c1 | c2 != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 = p1.0.wrapping_add(along(a - p1.1, p2.0 - p1.0, p2.1 - p1.1));
            p1.1 = a;
            c1 = columns(p1.0);
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 = p2.0.wrapping_add(along(a - p2.1, p2.0 - p1.0, p2.1 - p1.1));
            p2.1 = a;
            c2 = columns(p2.0);
        }
        if c1 & c2 == 0 && c1 | c2 != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 = p1.1.wrapping_add(along(a - p1.0, p2.1 - p1.1, p2.0 - p1.0));
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 = p2.1.wrapping_add(along(a - p2.0, p2.1 - p1.1, p2.0 - p1.0));
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    c1 | c2 == 0
}

/// `offset * rise / run` as OpenCV computes it in 64-bit integers (wrapping as its
/// arithmetic does, truncating toward zero).
fn along(offset: i64, rise: i64, run: i64) -> i64 {
    if run == 0 {
        return 0;
    }
    offset.wrapping_mul(rise).wrapping_div(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_far_beyond_opencvs_integers_neither_hang_nor_panic() {
        let mut canvas = GrayImage::new(8, 6);
        for (from, to) in [
            ((i64::MIN / 2, 3), (i64::MAX / 2, 4)),
            ((-(1 << 40), -(1 << 41)), (1 << 42, 1 << 40)),
            ((3, i64::MIN), (4, i64::MAX)),
        ] {
            draw_line(&mut canvas, from, to, 255);
        }
        // A line inside is drawn end to end: 8-connected, one pixel a column.
        let mut canvas = GrayImage::new(8, 6);
        draw_line(&mut canvas, (0, 0), (7, 3), 255);
        assert_eq!(canvas.iter().filter(|&&v| v == 255).count(), 8);
        assert_eq!(canvas.get_pixel(7, 3).0, [255]);
    }
}
