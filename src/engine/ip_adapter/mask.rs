//! The masks of regional image prompts, prepared as diffusers' `IPAdapterMaskProcessor`
//! prepares them: resized to the output size with Lanczos, then grey, binarised at one
//! half.

use image::RgbImage;
use tch::{Kind, Tensor};

use crate::engine::request::luminance;
use crate::engine::resample::lanczos_resize;

/// `mask` resized to `width` x `height` (Pillow's Lanczos, per channel), its luminance
/// (Pillow's `convert("L")`), then 1 where at least half white: [1, height, width]
/// float32.
pub fn output_mask(mask: &RgbImage, width: u32, height: u32) -> Tensor {
    let resized;
    let sized = if mask.dimensions() == (width, height) {
        mask
    } else {
        resized = lanczos_resize(mask, width, height);
        &resized
    };
    let grey = luminance(sized.as_raw());
    let t = Tensor::from_slice(&grey)
        .reshape([1, i64::from(height), i64::from(width)])
        .to_kind(Kind::Float)
        / 255.0;
    t.ge(0.5).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_below_one_half_is_black_and_sizes_follow_the_output() {
        let grey = RgbImage::from_pixel(5, 5, image::Rgb([127, 127, 127]));
        assert_eq!(
            output_mask(&grey, 5, 5).sum(Kind::Float).double_value(&[]),
            0.0
        );
        let light = RgbImage::from_pixel(5, 7, image::Rgb([128, 128, 128]));
        let mask = output_mask(&light, 10, 6);
        assert_eq!(mask.size(), [1, 6, 10]);
        assert_eq!(mask.sum(Kind::Float).double_value(&[]), 60.0);
    }
}
