//! The ZoeDepth detector (A1111's depth_zoe, controlnet_aux's ZoeDetector) on a
//! transformers ZoeDepth model folder: the image prepared as `ZoeDepthImageProcessorPil`
//! prepares it (rescaled, reflect-padded by 3·√(side/2) on each side, resized with
//! corners aligned to the configured size keeping the aspect ratio, sides rounded to a
//! multiple, normalised), the model run on it and on it mirrored, the two averaged and
//! brought back to the image as `post_process_depth_estimation` does (bicubic to the
//! padded size, the padding cut off), then mapped to 8 bits as ZoeDetector maps it: the
//! 2nd percentile to white and the 85th to black, in float32, truncated.

use std::path::Path;

use image::{GrayImage, RgbImage};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::pixels::channels_first;
use crate::engine::preprocess::depth::ProcessorSize;
use crate::engine::preprocess::processor::{read_config, resize_scales};
use crate::engine::preprocess::zoedepth::ZoeDepth;

/// ZoeDepthImageProcessor's values, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ZoeProcessor {
    do_rescale: bool,
    rescale_factor: f64,
    do_pad: bool,
    do_resize: bool,
    size: ProcessorSize,
    keep_aspect_ratio: bool,
    ensure_multiple_of: f64,
    resample: u32,
    do_normalize: bool,
    image_mean: [f32; 3],
    image_std: [f32; 3],
}

impl Default for ZoeProcessor {
    fn default() -> Self {
        Self {
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_pad: true,
            do_resize: true,
            size: ProcessorSize {
                height: 384,
                width: 512,
            },
            keep_aspect_ratio: true,
            ensure_multiple_of: 1.0 / 32.0,
            resample: 2,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

impl ZoeProcessor {
    /// The reflection padding (rows, columns) on each side of an image of `height`×`width`.
    pub fn padding(&self, height: i64, width: i64) -> (i64, i64) {
        if !self.do_pad {
            return (0, 0);
        }
        let pad = |side: i64| ((side as f64 / 2.0).sqrt() * 3.0) as i64;
        (pad(height), pad(width))
    }

    /// transformers' `get_resize_output_image_size` for a padded image of `height`×`width`:
    /// (height, width), each side rounded to the nearest multiple (a side rounded to zero
    /// is refused).
    pub fn network_size(&self, height: i64, width: i64) -> Result<(i64, i64)> {
        let (h, w) = (height as f64, width as f64);
        let target = (self.size.height, self.size.width);
        let (scale_h, scale_w) = resize_scales((h, w), target, self.keep_aspect_ratio);
        let multiple = self.ensure_multiple_of;
        let constrain = |v: f64| ((v / multiple).round_ties_even() * multiple) as i64;
        let size = (constrain(scale_h * h), constrain(scale_w * w));
        if size.0 < 1 || size.1 < 1 {
            return Err(EngineError::InvalidRequest(format!(
                "the ZoeDepth model's processor makes the image, padded to {width}x{height}, {}x{}: its aspect ratio is too far from {}x{}",
                size.1, size.0, self.size.width, self.size.height
            )));
        }
        Ok(size)
    }

    /// The size (height, width) the network sees for a `height`×`width` image: padded,
    /// then resized if the processor resizes (an image it would shrink to nothing is
    /// refused).
    pub fn network_input(&self, height: i64, width: i64) -> Result<(i64, i64)> {
        let (rows, columns) = self.padding(height, width);
        let padded = (height + 2 * rows, width + 2 * columns);
        match self.do_resize {
            true => self.network_size(padded.0, padded.1),
            false => Ok(padded),
        }
    }

    /// Why sdxld cannot run this processor config, if it cannot.
    fn unsupported(&self) -> Option<String> {
        if ![2, 3].contains(&self.resample) {
            return Some(format!(
                "resample {}: ZoeDepth's processor resizes with bilinear (2) or bicubic (3)",
                self.resample
            ));
        }
        let sizes = [self.size.height, self.size.width];
        let multiple = self.ensure_multiple_of;
        if multiple.is_nan() || multiple <= 0.0 || sizes.iter().any(|&s| s < 1) {
            return Some("asks for sizes that are not positive".into());
        }
        None
    }
}

/// Why the processor of the model folder at `dir` cannot take a `width`×`height` image
/// (its aspect ratio too far from the size it resizes to), if it cannot; a folder whose
/// processor config does not read is left to the load to refuse.
pub fn check_image_size(dir: &Path, width: u32, height: u32) -> std::result::Result<(), String> {
    match read_config::<ZoeProcessor>(dir) {
        Ok(processor) if processor.unsupported().is_none() => processor
            .network_input(i64::from(height), i64::from(width))
            .map(|_| ())
            .map_err(|e| e.to_string()),
        _ => Ok(()),
    }
}

/// A row or column index of numpy's `reflect` padding: mirrored about the edges
/// without repeating them, as often as the padding asks.
fn reflected(index: i64, side: i64) -> i64 {
    if side == 1 {
        return 0;
    }
    let period = 2 * (side - 1);
    let m = index.rem_euclid(period);
    if m >= side {
        period - m
    } else {
        m
    }
}

/// [N, C, H, W] padded by `rows` above and below and `columns` left and right, reflected.
fn reflect_padded(x: &Tensor, (rows, columns): (i64, i64)) -> Tensor {
    let s = x.size();
    let indices = |pad: i64, side: i64| {
        let v: Vec<i64> = (-pad..side + pad).map(|i| reflected(i, side)).collect();
        Tensor::from_slice(&v).to_device(x.device())
    };
    x.index_select(2, &indices(rows, s[2]))
        .index_select(3, &indices(columns, s[3]))
}

/// A ZoeDepth model with its processor.
pub struct ZoeDetector {
    network: ZoeDepth,
    processor: ZoeProcessor,
}

impl ZoeDetector {
    /// Loads the model folder at `dir` and its `preprocessor_config.json` (the
    /// processor's defaults where it is silent).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let processor: ZoeProcessor = read_config(dir)?;
        if let Some(message) = processor.unsupported() {
            return Err(EngineError::WeightFile {
                path: dir.join("preprocessor_config.json"),
                message,
            });
        }
        let network = ZoeDepth::load(dir, device, kind)?;
        Ok(Self { network, processor })
    }

    /// The network.
    pub fn network(&self) -> &ZoeDepth {
        &self.network
    }

    /// The processor's normalised input [1, 3, h, w] for an RGB image.
    pub fn input(&self, image: &RgbImage) -> Result<Tensor> {
        let p = &self.processor;
        let mut x = channels_first(image).to_kind(Kind::Double);
        if p.do_rescale {
            x *= p.rescale_factor;
        }
        let (height, width) = (i64::from(image.height()), i64::from(image.width()));
        let (h, w) = p.network_input(height, width)?;
        let mut x = reflect_padded(&x.to_kind(Kind::Float), p.padding(height, width));
        if p.do_resize {
            x = match p.resample {
                3 => x.upsample_bicubic2d([h, w], true, None, None),
                _ => x.upsample_bilinear2d([h, w], true, None, None),
            };
        }
        if p.do_normalize {
            let mean = Tensor::from_slice(&p.image_mean).view([1, 3, 1, 1]);
            let std = Tensor::from_slice(&p.image_std).view([1, 3, 1, 1]);
            x = (x - mean) / std;
        }
        let patch = self.network.patch_size();
        let s = x.size();
        if s[2] < patch || s[3] < patch {
            return Err(EngineError::InvalidRequest(format!(
                "the ZoeDepth model needs at least {patch}x{patch} pixels; its processor makes the image {}x{}",
                s[3], s[2]
            )));
        }
        Ok(x)
    }

    /// The metric depth [H, W] (float32) of an RGB image at its size: the mirrored pass
    /// averaged in, resized back with the padding removed.
    pub fn depth(&self, image: &RgbImage) -> Result<Tensor> {
        self.depth_between(image, &mut || Ok(()))
    }

    /// [`ZoeDetector::depth`] with `between_passes` run before each backbone layer of
    /// either pass; its error stops the work there.
    pub fn depth_between(
        &self,
        image: &RgbImage,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let (width, height) = (i64::from(image.width()), i64::from(image.height()));
        let pixels = self.input(image)?;
        let depth = self.network.forward(&pixels, between_passes)?;
        let mirrored = self.network.forward(&pixels.flip([3]), between_passes)?;
        let depth = ((depth + mirrored.flip([-1])) / 2.0).to_device(Device::Cpu);
        let (rows, columns) = self.processor.padding(height, width);
        let padded = [height + 2 * rows, width + 2 * columns];
        Ok(depth
            .unsqueeze(1)
            .upsample_bicubic2d(padded, false, None, None)
            .narrow(2, rows, height)
            .narrow(3, columns, width)
            .view([height, width]))
    }

    /// The 8-bit depth map of an RGB image, at its size (near is white).
    pub fn detect(&self, image: &RgbImage) -> Result<GrayImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`ZoeDetector::detect`] with `between_passes` run before each backbone layer.
    pub fn detect_between(
        &self,
        image: &RgbImage,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<GrayImage> {
        let depth = self.depth_between(image, between_passes)?;
        let values = Vec::<f32>::try_from(depth.contiguous().view(-1))?;
        GrayImage::from_raw(image.width(), image.height(), percentile_map(&values))
            .ok_or_else(|| EngineError::Internal("a depth map of the wrong size".into()))
    }
}

/// numpy's `percentile(values, q)` (linear method, float32 values) of sorted values.
fn percentile(sorted: &[f32], q: f64) -> f32 {
    let n = sorted.len();
    let quantile = q / 100.0;
    // numpy's `_compute_virtual_index` for the linear method, in its order.
    let (alpha, beta) = (1.0, 1.0);
    let virtual_index = n as f64 * quantile + (alpha + quantile * (1.0 - alpha - beta)) - 1.0;
    let previous = virtual_index.floor();
    let at = |i: f64| sorted[(i.max(0.0) as usize).min(n - 1)];
    let (a, b) = (at(previous), at(previous + 1.0));
    let gamma = virtual_index - previous;
    let difference = b - a;
    if gamma >= 0.5 {
        b - difference * (1.0 - gamma) as f32
    } else {
        a + difference * gamma as f32
    }
}

/// ZoeDetector's map: depths less the 2nd percentile over the 85th less the 2nd,
/// inverted, times 255, clipped and truncated, in float32.
pub fn percentile_map(depths: &[f32]) -> Vec<u8> {
    if depths.is_empty() {
        return Vec::new();
    }
    let mut sorted = depths.to_vec();
    sorted.sort_by(f32::total_cmp);
    let (low, high) = (percentile(&sorted, 2.0), percentile(&sorted, 85.0));
    let range = high - low;
    depths
        .iter()
        .map(|&d| ((1.0 - (d - low) / range) * 255.0).clamp(0.0, 255.0) as u8)
        .collect()
}
