//! 8-bit RGB images as the networks take them: channels first, one image per batch.

use image::RgbImage;
use tch::{Kind, Tensor};

/// The image as a 1×3×H×W uint8 tensor.
pub fn channels_first(image: &RgbImage) -> Tensor {
    let (width, height) = (i64::from(image.width()), i64::from(image.height()));
    Tensor::from_slice(image.as_raw())
        .view([height, width, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
}

/// The image as a 1×3×H×W float32 tensor in [0, 1].
pub fn unit_range(image: &RgbImage) -> Tensor {
    channels_first(image).to_kind(Kind::Float) / 255.0
}
