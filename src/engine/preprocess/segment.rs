//! The segmentation detector: a UperNet model folder run as transformers' Pillow image
//! processor prepares its input (`SegformerImageProcessor`'s: resized to the size its
//! `preprocessor_config.json` asks for with Pillow's filter, rescaled, normalised), its
//! logits resized to the image with bilinear as `post_process_semantic_segmentation`
//! does, the most likely class of each pixel painted in the ADE20K palette the
//! segmentation ControlNets were trained on.

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::ade20k::ADE20K;
use crate::engine::preprocess::depth::ProcessorSize;
use crate::engine::preprocess::processor::{normalised, read_config};
use crate::engine::preprocess::upernet::UperNet;
use crate::engine::resample::Filter;

/// The `preprocessor_config.json` values the detector uses, with openmmlab's as defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SegmentProcessor {
    pub size: ProcessorSize,
    /// Pillow's filter number: 2 bilinear, 3 bicubic.
    pub resample: u8,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for SegmentProcessor {
    fn default() -> Self {
        Self {
            size: ProcessorSize {
                height: 512,
                width: 512,
            },
            resample: 2,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }
}

/// A UperNet model with its processor.
pub struct SegmentDetector {
    network: UperNet,
    processor: SegmentProcessor,
    filter: Filter,
}

impl SegmentDetector {
    /// Loads the model folder at `dir` and its `preprocessor_config.json` (openmmlab's
    /// values when it has none).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let network = UperNet::load(dir, device, kind)?;
        let processor: SegmentProcessor = read_config(dir)?;
        let config = dir.join("preprocessor_config.json");
        let filter = match processor.resample {
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "{}: resample {other} is not one sdxld serves (2 bilinear, 3 bicubic)",
                    config.display()
                )))
            }
        };
        if processor.size.height < 1 || processor.size.width < 1 {
            return Err(EngineError::InvalidRequest(format!(
                "{}: size {}x{}",
                config.display(),
                processor.size.width,
                processor.size.height
            )));
        }
        Ok(Self {
            network,
            processor,
            filter,
        })
    }

    /// The network.
    pub fn network(&self) -> &UperNet {
        &self.network
    }

    /// The processor's normalised input [1, 3, h, w] for an RGB image.
    pub fn input(&self, image: &RgbImage) -> Tensor {
        let p = &self.processor;
        let size = (p.size.width, p.size.height);
        let statistics = (p.image_mean, p.image_std);
        normalised(image, size, self.filter, p.rescale_factor, statistics)
    }

    /// The class of each pixel of an RGB image, at its size (row-major); `between` is
    /// asked before each backbone block.
    pub fn classes(&self, image: &RgbImage, between: &mut Between<'_>) -> Result<Vec<i64>> {
        let (width, height) = image.dimensions();
        let logits = self
            .network
            .forward(&self.input(image), between)?
            .to_device(Device::Cpu);
        // Every class's logits resized to the image weigh as much as a block.
        between()?;
        let size = [i64::from(height), i64::from(width)];
        let classes = logits
            .upsample_bilinear2d(size, false, None, None)
            .argmax(1, false)
            .view(-1);
        Ok(Vec::<i64>::try_from(classes)?)
    }

    /// The segmentation map of an RGB image, at its size: each class in its ADE20K colour
    /// (classes past the palette black).
    pub fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`SegmentDetector::detect`] with `between` asked before each backbone block.
    pub fn detect_between(&self, image: &RgbImage, between: &mut Between<'_>) -> Result<RgbImage> {
        let (width, height) = image.dimensions();
        let pixels: Vec<u8> = self
            .classes(image, between)?
            .into_iter()
            .flat_map(|c| {
                usize::try_from(c)
                    .ok()
                    .and_then(|c| ADE20K.get(c))
                    .copied()
                    .unwrap_or([0, 0, 0])
            })
            .collect();
        RgbImage::from_raw(width, height, pixels)
            .ok_or_else(|| EngineError::Internal("a segmentation map of the wrong size".into()))
    }
}
