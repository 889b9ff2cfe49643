//! Preprocessor networks (detectors) loaded from their weight files under
//! `models.preprocessor_roots`: which network a file holds, read from its tensor names as
//! the reference implementations name them, and the loaded network.

use std::path::Path;

use tch::{Device, Kind};

use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::lineart::LineartGenerator;
use crate::engine::preprocess::lineart_anime::LineartAnimeUnet;
use crate::engine::weights::read_shapes;

/// A network a detector file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorNetwork {
    /// controlnet_aux's line-art generator (realistic or coarse weights).
    Lineart,
    /// controlnet_aux's anime line-art U-Net.
    LineartAnime,
}

impl DetectorNetwork {
    /// Its name in listings.
    pub fn name(self) -> &'static str {
        match self {
            DetectorNetwork::Lineart => "lineart",
            DetectorNetwork::LineartAnime => "lineart_anime",
        }
    }
}

/// The network the file at `path` holds; a file of no served network is refused naming
/// its first tensor.
pub fn network_of(path: &Path) -> Result<DetectorNetwork> {
    let (shapes, _) = read_shapes(path)?;
    let has = |key: &str| {
        shapes
            .iter()
            .any(|(name, _)| name.trim_start_matches("module.") == key)
    };
    if has("model0.1.weight") && has("model4.1.weight") {
        return Ok(DetectorNetwork::Lineart);
    }
    if has("model.model.0.weight") && has("model.model.1.model.1.weight") {
        return Ok(DetectorNetwork::LineartAnime);
    }
    let first = shapes.first().map_or("(none)", |(name, _)| name.as_str());
    Err(EngineError::WeightFile {
        path: path.to_path_buf(),
        message: format!(
            "holds no preprocessor network sdxld serves (its first tensor is `{first}`; served: lineart, lineart_anime)"
        ),
    })
}

/// A loaded detector.
pub enum Detector {
    /// The line-art generator.
    Lineart(LineartGenerator),
    /// The anime line-art U-Net.
    LineartAnime(LineartAnimeUnet),
}

impl Detector {
    /// Loads the network the file at `path` holds onto `device` in `kind`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        match network_of(path)? {
            DetectorNetwork::Lineart => Ok(Detector::Lineart(LineartGenerator::load(
                path, device, kind,
            )?)),
            DetectorNetwork::LineartAnime => Ok(Detector::LineartAnime(LineartAnimeUnet::load(
                path, device, kind,
            )?)),
        }
    }

    /// The 8-bit map of an RGB image at the detection size (see each network's
    /// `detect`), as three equal channels.
    pub fn detect(&self, image: &image::RgbImage) -> Result<image::RgbImage> {
        let map = match self {
            Detector::Lineart(network) => network.detect(image)?,
            Detector::LineartAnime(network) => network.detect(image)?,
        };
        Ok(image::DynamicImage::ImageLuma8(map).to_rgb8())
    }

    /// The network it is.
    pub fn network(&self) -> DetectorNetwork {
        match self {
            Detector::Lineart(_) => DetectorNetwork::Lineart,
            Detector::LineartAnime(_) => DetectorNetwork::LineartAnime,
        }
    }
}
