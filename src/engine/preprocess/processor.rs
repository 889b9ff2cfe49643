//! What transformers' Pillow image processors share: their `preprocessor_config.json`
//! (the published values when a folder has none), the resize with a Pillow filter, and
//! the rescale and normalisation of the pixels.

use std::path::Path;

use image::RgbImage;
use serde::de::DeserializeOwned;
use tch::{Kind, Tensor};

use crate::engine::error::Result;
use crate::engine::pixels::channels_first;
use crate::engine::resample::{resize_box, Filter};

/// The folder's `preprocessor_config.json`, or `T`'s defaults when it has none.
pub fn read_config<T: DeserializeOwned + Default>(dir: &Path) -> Result<T> {
    let config = dir.join("preprocessor_config.json");
    if config.is_file() {
        crate::engine::files::read_json(&config)
    } else {
        Ok(T::default())
    }
}

/// The pixels of `image` resized to `width`×`height` with Pillow's `filter`, times
/// `rescale` in double precision, then less `mean` over `std` in float32: [1, 3, h, w].
pub fn normalised(
    image: &RgbImage,
    (width, height): (i64, i64),
    filter: Filter,
    rescale: f64,
    (mean, std): ([f32; 3], [f32; 3]),
) -> Tensor {
    let whole = [
        0.0,
        0.0,
        f64::from(image.width()),
        f64::from(image.height()),
    ];
    let resized = resize_box(filter, image, width as u32, height as u32, whole);
    let mean = Tensor::from_slice(&mean).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&std).view([1, 3, 1, 1]);
    let pixels = channels_first(&resized).to_kind(Kind::Double) * rescale;
    (pixels.to_kind(Kind::Float) - mean) / std
}

/// The scales (height, width) transformers' `get_resize_output_image_size` resizes a
/// `height`×`width` image by towards `target` (height, width): each side's own, or with
/// `keep_aspect_ratio` the one nearer 1 for both (the image scaled as little as possible).
pub fn resize_scales(
    (height, width): (f64, f64),
    (target_height, target_width): (i64, i64),
    keep_aspect_ratio: bool,
) -> (f64, f64) {
    let scale_h = target_height as f64 / height;
    let scale_w = target_width as f64 / width;
    match keep_aspect_ratio {
        false => (scale_h, scale_w),
        true if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() => (scale_w, scale_w),
        true => (scale_h, scale_h),
    }
}
