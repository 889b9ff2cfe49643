//! The depth detector: a Depth Anything model folder run as transformers' Pillow image
//! processor prepares its input (`DPTImageProcessorPil`: the size its
//! `preprocessor_config.json` asks for, keeping the aspect ratio by scaling as little as
//! possible, sides rounded to the patch multiple; Pillow's bicubic; rescaled and
//! normalised), its depth resized back to the image with bicubic as
//! `post_process_depth_estimation` does, then min-max scaled to 8 bits (near is white), as
//! the depth preprocessors of controlnet_aux and the web UIs write it.

use std::path::Path;

use image::{GrayImage, RgbImage};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::depth_anything::DepthAnything;
use crate::engine::preprocess::processor::{normalised, read_config};
use crate::engine::resample::Filter;

/// The `preprocessor_config.json` values the detector uses, with the published
/// checkpoints' values as defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DepthProcessor {
    pub size: ProcessorSize,
    pub keep_aspect_ratio: bool,
    pub ensure_multiple_of: i64,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// `size` of a processor config.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ProcessorSize {
    pub height: i64,
    pub width: i64,
}

impl Default for DepthProcessor {
    fn default() -> Self {
        Self {
            size: ProcessorSize {
                height: 518,
                width: 518,
            },
            keep_aspect_ratio: true,
            ensure_multiple_of: 14,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }
}

impl DepthProcessor {
    /// transformers' `get_resize_output_image_size` for a `width`×`height` image: the
    /// network's input size (height, width), each side at least one multiple.
    pub fn network_size(&self, width: u32, height: u32) -> (i64, i64) {
        let (h, w) = (f64::from(height), f64::from(width));
        let mut scale_h = self.size.height as f64 / h;
        let mut scale_w = self.size.width as f64 / w;
        if self.keep_aspect_ratio {
            // Scale as little as possible.
            if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() {
                scale_h = scale_w;
            } else {
                scale_w = scale_h;
            }
        }
        let multiple = self.ensure_multiple_of.max(1);
        let constrain = |v: f64| {
            let x = (v / multiple as f64).round_ties_even() as i64 * multiple;
            x.max(multiple)
        };
        (constrain(scale_h * h), constrain(scale_w * w))
    }
}

/// A Depth Anything model with its processor.
pub struct DepthDetector {
    network: DepthAnything,
    processor: DepthProcessor,
}

impl DepthDetector {
    /// Loads the model folder at `dir` and its `preprocessor_config.json` (the published
    /// values when it has none).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let network = DepthAnything::load(dir, device, kind)?;
        let processor: DepthProcessor = read_config(dir)?;
        let config = dir.join("preprocessor_config.json");
        if processor.ensure_multiple_of % network.patch_size() != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "{}: ensure_multiple_of {} is no multiple of the patch size {}",
                config.display(),
                processor.ensure_multiple_of,
                network.patch_size()
            )));
        }
        Ok(Self { network, processor })
    }

    /// The network.
    pub fn network(&self) -> &DepthAnything {
        &self.network
    }

    /// The processor's normalised input [1, 3, h, w] for an RGB image.
    pub fn input(&self, image: &RgbImage) -> Tensor {
        let (h, w) = self.processor.network_size(image.width(), image.height());
        let p = &self.processor;
        let statistics = (p.image_mean, p.image_std);
        normalised(image, (w, h), Filter::Bicubic, p.rescale_factor, statistics)
    }

    /// The 8-bit depth map of an RGB image, at its size.
    pub fn detect(&self, image: &RgbImage) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let depth = self
            .network
            .forward(&self.input(image))
            .to_device(Device::Cpu);
        let depth = depth
            .unsqueeze(1)
            .upsample_bicubic2d([i64::from(height), i64::from(width)], false, None, None)
            .view([i64::from(height), i64::from(width)]);
        let (low, high) = (depth.min(), depth.max());
        let range = &high - &low;
        // A flat prediction has no near or far: black, not a division by zero.
        let scaled = if range.double_value(&[]) > 0.0 {
            (depth - low) / range * 255.0
        } else {
            depth.zeros_like()
        };
        let bytes = scaled.clamp(0.0, 255.0).to_kind(Kind::Uint8);
        let raw = Vec::<u8>::try_from(bytes.contiguous().view(-1))?;
        GrayImage::from_raw(width, height, raw)
            .ok_or_else(|| EngineError::Internal("a depth map of the wrong size".into()))
    }
}
