//! The depth detector: a Depth Anything or DPT model folder run as transformers' Pillow
//! image processor prepares its input (`DPTImageProcessorPil`: the size its
//! `preprocessor_config.json` asks for, keeping the aspect ratio by scaling as little as
//! possible if it says so, sides rounded to a multiple; Pillow's bicubic or bilinear;
//! rescaled and normalised), its depth resized back to the image with bicubic as
//! `post_process_depth_estimation` does, then min-max scaled to 8 bits (near is white), as
//! the depth preprocessors of controlnet_aux and the web UIs write it.

use std::path::Path;

use image::{GrayImage, RgbImage};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::depth_anything::DepthAnything;
use crate::engine::preprocess::dpt::Dpt;
use crate::engine::preprocess::processor::{normalised, read_config, resize_scales};
use crate::engine::resample::Filter;

/// The processor values the detector uses.
#[derive(Debug, Clone)]
pub struct DepthProcessor {
    pub size: ProcessorSize,
    pub keep_aspect_ratio: bool,
    pub ensure_multiple_of: i64,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub filter: Filter,
}

/// `size` of a processor config.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ProcessorSize {
    pub height: i64,
    pub width: i64,
}

/// `size` as configs write it: one side for a square, or both.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(i64),
    Sides(ProcessorSize),
}

/// A `preprocessor_config.json` as written: what it leaves out takes the model family's
/// defaults (the processor classes' own, which differ between Depth Anything's
/// published configs and DPTImageProcessor's).
#[derive(Debug, Clone, Default, Deserialize)]
struct ProcessorFile {
    size: Option<SizeSpec>,
    keep_aspect_ratio: Option<bool>,
    ensure_multiple_of: Option<i64>,
    rescale_factor: Option<f64>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    resample: Option<u32>,
}

impl DepthProcessor {
    /// Depth Anything's published processor values.
    fn depth_anything() -> Self {
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
            filter: Filter::Bicubic,
        }
    }

    /// DPTImageProcessor's defaults.
    fn dpt() -> Self {
        Self {
            size: ProcessorSize {
                height: 384,
                width: 384,
            },
            keep_aspect_ratio: false,
            ensure_multiple_of: 1,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            ..Self::depth_anything()
        }
    }

    /// The folder's `preprocessor_config.json` over `defaults`.
    fn read(dir: &Path, defaults: Self) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let file: ProcessorFile = read_config(dir)?;
        let filter = match file.resample {
            None => defaults.filter,
            Some(2) => Filter::Bilinear,
            Some(3) => Filter::Bicubic,
            Some(other) => {
                return Err(EngineError::WeightFile {
                    path,
                    message: format!(
                        "resample {other}: sdxld resizes with Pillow's bilinear (2) or bicubic (3)"
                    ),
                })
            }
        };
        Ok(Self {
            size: match file.size {
                None => defaults.size,
                Some(SizeSpec::Square(side)) => ProcessorSize {
                    height: side,
                    width: side,
                },
                Some(SizeSpec::Sides(sides)) => sides,
            },
            keep_aspect_ratio: file.keep_aspect_ratio.unwrap_or(defaults.keep_aspect_ratio),
            ensure_multiple_of: file
                .ensure_multiple_of
                .unwrap_or(defaults.ensure_multiple_of),
            rescale_factor: file.rescale_factor.unwrap_or(defaults.rescale_factor),
            image_mean: file.image_mean.unwrap_or(defaults.image_mean),
            image_std: file.image_std.unwrap_or(defaults.image_std),
            filter,
        })
    }

    /// transformers' `get_resize_output_image_size` for a `width`×`height` image: the
    /// network's input size (height, width), each side at least one multiple.
    pub fn network_size(&self, width: u32, height: u32) -> (i64, i64) {
        let (h, w) = (f64::from(height), f64::from(width));
        let target = (self.size.height, self.size.width);
        let (scale_h, scale_w) = resize_scales((h, w), target, self.keep_aspect_ratio);
        let multiple = self.ensure_multiple_of.max(1);
        let constrain = |v: f64| {
            let x = (v / multiple as f64).round_ties_even() as i64 * multiple;
            x.max(multiple)
        };
        (constrain(scale_h * h), constrain(scale_w * w))
    }
}

/// A depth network: Depth Anything or DPT.
pub enum DepthNetwork {
    DepthAnything(DepthAnything),
    Dpt(Dpt),
}

impl DepthNetwork {
    /// The predicted depth [N, H, W] of normalised pixels; `between` is asked before
    /// each backbone layer, and its error ends the pass.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        match self {
            Self::DepthAnything(n) => n.forward(pixels, between),
            Self::Dpt(n) => n.forward(pixels, between),
        }
    }
}

/// A depth model with its processor.
pub struct DepthDetector {
    network: DepthNetwork,
    processor: DepthProcessor,
}

impl DepthDetector {
    /// Loads the model folder at `dir` (`dpt` selects DPT, else Depth Anything) and its
    /// `preprocessor_config.json` (the family's defaults where it is silent).
    pub fn load(dir: &Path, dpt: bool, device: Device, kind: Kind) -> Result<Self> {
        let (network, processor) = if dpt {
            let processor = DepthProcessor::read(dir, DepthProcessor::dpt())?;
            let square =
                processor.size.height == processor.size.width && !processor.keep_aspect_ratio;
            if !square {
                return Err(EngineError::WeightFile {
                    path: dir.join("preprocessor_config.json"),
                    message: "asks for inputs that are not square, which transformers' DPT with a ViT backbone cannot take".into(),
                });
            }
            let network = Dpt::load(dir, device, kind)?;
            if let Some(side) = network.fixed_side() {
                let size = processor.network_size(1, 1);
                if size != (side, side) {
                    return Err(EngineError::WeightFile {
                        path: dir.join("preprocessor_config.json"),
                        message: format!(
                            "resizes to {}x{}; the DPT-Hybrid model takes {side}x{side} (its image_size) only",
                            size.1, size.0
                        ),
                    });
                }
            }
            (DepthNetwork::Dpt(network), processor)
        } else {
            let network = DepthAnything::load(dir, device, kind)?;
            let processor = DepthProcessor::read(dir, DepthProcessor::depth_anything())?;
            if processor.ensure_multiple_of % network.patch_size() != 0 {
                return Err(EngineError::InvalidRequest(format!(
                    "{}: ensure_multiple_of {} is no multiple of the patch size {}",
                    dir.join("preprocessor_config.json").display(),
                    processor.ensure_multiple_of,
                    network.patch_size()
                )));
            }
            (DepthNetwork::DepthAnything(network), processor)
        };
        Ok(Self { network, processor })
    }

    /// The network.
    pub fn network(&self) -> &DepthNetwork {
        &self.network
    }

    /// The processor's normalised input [1, 3, h, w] for an RGB image.
    pub fn input(&self, image: &RgbImage) -> Tensor {
        let (h, w) = self.processor.network_size(image.width(), image.height());
        let p = &self.processor;
        let statistics = (p.image_mean, p.image_std);
        normalised(image, (w, h), p.filter, p.rescale_factor, statistics)
    }

    /// The 8-bit depth map of an RGB image, at its size.
    pub fn detect(&self, image: &RgbImage) -> Result<GrayImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`DepthDetector::detect`] with `between` asked before each backbone layer.
    pub fn detect_between(&self, image: &RgbImage, between: &mut Between<'_>) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let depth = self
            .network
            .forward(&self.input(image), between)?
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
