//! The preprocessors that only filter the image, as sd-webui-controlnet writes them (no
//! network): `tile_resample` shrinks it so that a tile ControlNet re-draws the detail,
//! `blur_gaussian` blurs it for the same models, and `invert` turns dark lines on a
//! light ground into the light-on-dark maps the line ControlNets read.

use image::RgbImage;

use super::cv_blur::blur_u8_interleaved;
use super::cv_resize::{self, Interpolation};
use crate::engine::error::{EngineError, Result};

/// The least rate `tile_resample` shrinks by: below it the image is the map as it is.
pub const LEAST_TILE_RATE: f64 = 1.1;

/// A float32 parameter as the client sent it, compared bit for bit (a preprocessor is
/// a value that equals itself).
#[derive(Debug, Clone, Copy)]
pub struct Param(pub f32);

impl PartialEq for Param {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Param {}

/// The size `tile_resample` gives a `width`×`height` image at `rate`: each side divided
/// in double precision and truncated (`int(float(H) / float(rate))`), unchanged below
/// [`LEAST_TILE_RATE`].
pub fn resampled_size(width: u32, height: u32, rate: f32) -> (u32, u32) {
    let rate = f64::from(rate);
    if rate < LEAST_TILE_RATE {
        return (width, height);
    }
    let side = |s: u32| (f64::from(s) / rate) as u32;
    (side(width), side(height))
}

/// `tile_resample`: the image shrunk by `rate` with OpenCV's area averaging.
pub fn tile_resample(image: &RgbImage, rate: f32) -> Result<RgbImage> {
    let (width, height) = image.dimensions();
    let (w, h) = resampled_size(width, height, rate);
    if (w, h) == (width, height) {
        return Ok(image.clone());
    }
    if w == 0 || h == 0 {
        return Err(EngineError::InvalidRequest(format!(
            "a down-sampling rate of {rate} leaves nothing of a {width}x{height} image"
        )));
    }
    Ok(cv_resize::resize(image, w, h, Interpolation::Area))
}

/// `blur_gaussian`: `cv2.GaussianBlur(image, (0, 0), sigma)` of the 8-bit image.
pub fn blur(image: &RgbImage, sigma: f32) -> RgbImage {
    let (width, height) = image.dimensions();
    let size = (width as usize, height as usize);
    let raw = blur_u8_interleaved(image.as_raw(), size, 3, f64::from(sigma));
    RgbImage::from_raw(width, height, raw).unwrap_or_else(|| RgbImage::new(width, height))
}

/// `invert`: each value v becomes 255 - v.
pub fn invert(image: &RgbImage) -> RgbImage {
    let mut inverted = image.clone();
    inverted.iter_mut().for_each(|v| *v = 255 - *v);
    inverted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_below_the_least_leave_the_size_and_others_truncate() {
        assert_eq!(resampled_size(75, 133, 1.0), (75, 133));
        assert_eq!(resampled_size(75, 133, 1.09), (75, 133));
        // 100 / 1.1 = 90.909...; 133 / 1.1 = 120.909...
        assert_eq!(resampled_size(100, 133, 1.1), (90, 120));
        assert_eq!(resampled_size(75, 133, 2.0), (37, 66));
        assert_eq!(resampled_size(7, 3, 8.0), (0, 0));
        // The float32 rate as sent: 3.3f32 is 3.2999999523..., so 33 / it is 10.000000144.
        assert_eq!(resampled_size(33, 33, 3.3), (10, 10));
    }

    #[test]
    fn a_rate_that_leaves_no_pixel_is_refused() {
        let image = RgbImage::new(7, 30);
        let err = tile_resample(&image, 8.0).expect_err("no pixel");
        assert!(err.to_string().contains("7x30"), "{err}");
        assert_eq!(
            tile_resample(&image, 2.0).expect("a map").dimensions(),
            (3, 15)
        );
    }

    #[test]
    fn inverting_twice_gives_the_image_back() {
        let image = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 50, y as u8 * 60, 7]));
        let inverted = invert(&image);
        assert_eq!(inverted.get_pixel(1, 2).0, [205, 135, 248]);
        assert_eq!(invert(&inverted), image);
    }
}
