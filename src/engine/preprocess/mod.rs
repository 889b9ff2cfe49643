//! Preprocessors: how a conditioning image becomes a ControlNet's control map, as
//! controlnet_aux computes them (its `HWC3` input rule, then the detector).

pub mod canny;

use image::{DynamicImage, GrayImage, RgbImage};

/// A preprocessor with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocessor {
    /// The image is the control map.
    None,
    /// Canny edges with OpenCV's low and high thresholds.
    Canny {
        /// Below: never an edge.
        low: u32,
        /// Above: always an edge.
        high: u32,
    },
}

impl Preprocessor {
    /// The control map of `image` (three channels, as ControlNets take them).
    pub fn run(self, image: &DynamicImage) -> RgbImage {
        let rgb = hwc3(image);
        match self {
            Preprocessor::None => rgb,
            Preprocessor::Canny { low, high } => gray_to_rgb(canny::canny(&rgb, low, high)),
        }
    }
}

/// controlnet_aux's `HWC3`: grey becomes three equal channels, and an alpha channel is
/// composited over white in float32 and truncated, as numpy does.
pub fn hwc3(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, pixel) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = f32::from(pixel[3]) / 255.0;
        for c in 0..3 {
            let value = f32::from(pixel[c]) * alpha + 255.0 * (1.0 - alpha);
            out[c] = value.clamp(0.0, 255.0) as u8;
        }
    }
    rgb
}

/// Three equal channels of a grey map.
fn gray_to_rgb(gray: GrayImage) -> RgbImage {
    DynamicImage::ImageLuma8(gray).to_rgb8()
}
