//! Preprocessor networks (detectors) loaded from under `models.preprocessor_roots`:
//! which network a weight file holds, read from its tensor names as the reference
//! implementations name them (a model folder by its `config.json`), and the loaded
//! network.

use std::path::Path;

use tch::{Device, Kind};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::depth::{DepthDetector, DepthNetwork};
use crate::engine::preprocess::hed::Hed;
use crate::engine::preprocess::leres::{self, DepthCuts, LeresDetector};
use crate::engine::preprocess::lineart::LineartGenerator;
use crate::engine::preprocess::lineart_anime::LineartAnimeUnet;
use crate::engine::preprocess::mlsd::Mlsd;
use crate::engine::preprocess::mlsd_lines::LineThresholds;
use crate::engine::preprocess::normal_bae::{self, NormalDetector};
use crate::engine::preprocess::openpose;
use crate::engine::preprocess::openpose_cpm::{self, CpmNetwork};
use crate::engine::preprocess::pidinet::PiDiNet;
use crate::engine::preprocess::pose::OpenPoseDetector;
use crate::engine::preprocess::segment::SegmentDetector;
use crate::engine::preprocess::teed::Teed;
use crate::engine::preprocess::zoe_detector::ZoeDetector;
use crate::engine::weights::read_shapes;

/// A network a detector file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorNetwork {
    /// controlnet_aux's line-art generator (realistic or coarse weights).
    Lineart,
    /// controlnet_aux's anime line-art U-Net.
    LineartAnime,
    /// transformers' Depth Anything (V1 or V2; a model folder).
    DepthAnything,
    /// transformers' DPT depth estimation with a ViT backbone (a model folder).
    Dpt,
    /// transformers' ZoeDepth metric depth estimation (a model folder).
    ZoeDepth,
    /// controlnet_aux's LeReS depth network (ResNeXt encoder; `res101`).
    Leres,
    /// controlnet_aux's HED edge network.
    Hed,
    /// transformers' UperNet segmentation (a model folder).
    UperNet,
    /// controlnet_aux's OpenPose body network.
    OpenPose,
    /// controlnet_aux's OpenPose face network (`FaceNet`), run beside the body's.
    FaceNet,
    /// controlnet_aux's OpenPose hand network (`handpose_model`), run beside the body's.
    HandPose,
    /// controlnet_aux's NormalBAE surface-normal network.
    NormalBae,
    /// controlnet_aux's M-LSD line-segment network.
    Mlsd,
    /// controlnet_aux's PiDiNet edge network.
    PiDiNet,
    /// controlnet_aux's TEED edge network (soft edges only).
    Teed,
}

impl DetectorNetwork {
    /// Whether a detector holding `held` serves a preprocessor that runs this network
    /// (a depth preprocessor takes Depth Anything, DPT, ZoeDepth or LeReS, a soft-edge one HED,
    /// PiDiNet or TEED; scribbles refuse TEED where the request is checked).
    pub fn accepts(self, held: DetectorNetwork) -> bool {
        held == self
            || (self == DetectorNetwork::DepthAnything
                && matches!(
                    held,
                    DetectorNetwork::Dpt | DetectorNetwork::ZoeDepth | DetectorNetwork::Leres
                ))
            || (self == DetectorNetwork::Hed
                && matches!(held, DetectorNetwork::PiDiNet | DetectorNetwork::Teed))
    }

    /// What it is called where a preprocessor names the networks it takes.
    pub fn described(self) -> &'static str {
        match self {
            DetectorNetwork::DepthAnything => "depth_anything, dpt, zoedepth or leres",
            DetectorNetwork::Hed => "hed, pidinet or teed",
            other => other.name(),
        }
    }

    /// Its name in listings.
    pub fn name(self) -> &'static str {
        match self {
            DetectorNetwork::Lineart => "lineart",
            DetectorNetwork::LineartAnime => "lineart_anime",
            DetectorNetwork::DepthAnything => "depth_anything",
            DetectorNetwork::Dpt => "dpt",
            DetectorNetwork::ZoeDepth => "zoedepth",
            DetectorNetwork::Leres => "leres",
            DetectorNetwork::Hed => "hed",
            DetectorNetwork::UperNet => "upernet",
            DetectorNetwork::OpenPose => "openpose",
            DetectorNetwork::FaceNet => "facenet",
            DetectorNetwork::HandPose => "handpose",
            DetectorNetwork::NormalBae => "normal_bae",
            DetectorNetwork::Mlsd => "mlsd",
            DetectorNetwork::PiDiNet => "pidinet",
            DetectorNetwork::Teed => "teed",
        }
    }

    /// What a detector of this network named `name` is under a preprocessor root.
    pub fn expected_files(self, name: &str) -> String {
        match self {
            DetectorNetwork::Lineart
            | DetectorNetwork::LineartAnime
            | DetectorNetwork::Hed
            | DetectorNetwork::OpenPose
            | DetectorNetwork::FaceNet
            | DetectorNetwork::HandPose
            | DetectorNetwork::NormalBae
            | DetectorNetwork::Mlsd
            | DetectorNetwork::PiDiNet
            | DetectorNetwork::Teed
            | DetectorNetwork::Leres => {
                format!("{name}.safetensors")
            }
            DetectorNetwork::DepthAnything
            | DetectorNetwork::Dpt
            | DetectorNetwork::ZoeDepth
            | DetectorNetwork::UperNet => {
                format!("{name}/ with config.json and model.safetensors")
            }
        }
    }
}

/// The `model_type` of a model folder's `config.json`.
fn model_type(dir: &Path) -> Result<String> {
    let config: serde_json::Value = crate::engine::files::read_json(&dir.join("config.json"))?;
    Ok(config
        .get("model_type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string())
}

/// The network the file (or model folder) at `path` holds; a file of no served network
/// is refused naming its first tensor, a folder naming its model type.
pub fn network_of(path: &Path) -> Result<DetectorNetwork> {
    if path.is_dir() {
        let kind = model_type(path)?;
        return match kind.as_str() {
            "depth_anything" => Ok(DetectorNetwork::DepthAnything),
            "dpt" => Ok(DetectorNetwork::Dpt),
            "zoedepth" => Ok(DetectorNetwork::ZoeDepth),
            "upernet" => Ok(DetectorNetwork::UperNet),
            other => Err(EngineError::WeightFile {
                path: path.join("config.json"),
                message: format!(
                    "holds a `{other}` model; the preprocessor folders sdxld serves are depth_anything, dpt, zoedepth and upernet"
                ),
            }),
        };
    }
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
    if has("norm") && has("block1.convs.0.weight") && has("block1.projection.weight") {
        return Ok(DetectorNetwork::Hed);
    }
    if openpose::is_body_pose(shapes.iter().map(|(name, _)| name.as_str())) {
        return Ok(DetectorNetwork::OpenPose);
    }
    match openpose_cpm::cpm_maps(&shapes) {
        Some(openpose_cpm::FACE_MAPS) => return Ok(DetectorNetwork::FaceNet),
        Some(openpose_cpm::HAND_MAPS) => return Ok(DetectorNetwork::HandPose),
        Some(maps) => {
            return Err(EngineError::WeightFile {
                path: path.to_path_buf(),
                message: format!(
                    "holds an OpenPose hand or face network of {maps} maps; the face network has {} and the hand network {}",
                    openpose_cpm::FACE_MAPS,
                    openpose_cpm::HAND_MAPS
                ),
            })
        }
        None => {}
    }
    if normal_bae::is_normal_bae(shapes.iter().map(|(name, _)| name.as_str())) {
        return Ok(DetectorNetwork::NormalBae);
    }
    if has("backbone.features.0.0.weight") && has("block23.conv3.weight") {
        return Ok(DetectorNetwork::Mlsd);
    }
    if has("init_block.weight") && has("block1_1.conv1.weight") && has("classifier.weight") {
        return Ok(DetectorNetwork::PiDiNet);
    }
    if has("block_1.conv1.weight") && has("block_cat.DWconv1.weight") {
        return Ok(DetectorNetwork::Teed);
    }
    if leres::network_prefix(shapes.iter().map(|(name, _)| name.as_str())).is_some() {
        return Ok(DetectorNetwork::Leres);
    }
    let first = shapes.first().map_or("(none)", |(name, _)| name.as_str());
    Err(EngineError::WeightFile {
        path: path.to_path_buf(),
        message: format!(
            "holds no preprocessor network sdxld serves (its first tensor is `{first}`; served: lineart, lineart_anime, hed, openpose, facenet, handpose, normal_bae, mlsd, pidinet, teed, leres; depth_anything, dpt, zoedepth and upernet as model folders)"
        ),
    })
}

/// TEEDdetector's default quantisation (its `safe_steps`).
pub const TEED_SAFE_STEPS: u32 = 2;

/// A loaded detector.
pub enum Detector {
    /// The line-art generator.
    Lineart(LineartGenerator),
    /// The anime line-art U-Net.
    LineartAnime(LineartAnimeUnet),
    /// Depth Anything or DPT with its processor.
    Depth(Box<DepthDetector>),
    /// ZoeDepth with its processor.
    Zoe(Box<ZoeDetector>),
    /// The HED edge network.
    Hed(Hed),
    /// UperNet with its processor.
    Segment(Box<SegmentDetector>),
    /// The OpenPose body network with its decoding and drawing.
    OpenPose(OpenPoseDetector),
    /// The OpenPose face network.
    Face(CpmNetwork),
    /// The OpenPose hand network.
    Hand(CpmNetwork),
    /// The NormalBAE network.
    Normal(NormalDetector),
    /// The M-LSD network.
    Mlsd(Box<Mlsd>),
    /// The PiDiNet edge network.
    PiDiNet(PiDiNet),
    /// The TEED edge network.
    Teed(Box<Teed>),
    /// The LeReS depth network.
    Leres(Box<LeresDetector>),
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
            network @ (DetectorNetwork::DepthAnything | DetectorNetwork::Dpt) => {
                let dpt = network == DetectorNetwork::Dpt;
                let detector = DepthDetector::load(path, dpt, device, kind)?;
                Ok(Detector::Depth(Box::new(detector)))
            }
            DetectorNetwork::ZoeDepth => Ok(Detector::Zoe(Box::new(ZoeDetector::load(
                path, device, kind,
            )?))),
            DetectorNetwork::Hed => Ok(Detector::Hed(Hed::load(path, device, kind)?)),
            DetectorNetwork::UperNet => Ok(Detector::Segment(Box::new(SegmentDetector::load(
                path, device, kind,
            )?))),
            DetectorNetwork::OpenPose => Ok(Detector::OpenPose(OpenPoseDetector::load(
                path, device, kind,
            )?)),
            DetectorNetwork::FaceNet => Ok(Detector::Face(CpmNetwork::load(path, device, kind)?)),
            DetectorNetwork::HandPose => Ok(Detector::Hand(CpmNetwork::load(path, device, kind)?)),
            DetectorNetwork::NormalBae => {
                Ok(Detector::Normal(NormalDetector::load(path, device, kind)?))
            }
            DetectorNetwork::Mlsd => Ok(Detector::Mlsd(Box::new(Mlsd::load(path, device, kind)?))),
            DetectorNetwork::PiDiNet => Ok(Detector::PiDiNet(PiDiNet::load(path, device, kind)?)),
            DetectorNetwork::Teed => Ok(Detector::Teed(Box::new(Teed::load(path, device, kind)?))),
            DetectorNetwork::Leres => Ok(Detector::Leres(Box::new(LeresDetector::load(
                path, device, kind,
            )?))),
        }
    }

    /// The 8-bit map of an RGB image at the detection size (see each network's
    /// `detect`): three equal channels, or the segmentation's colours.
    pub fn detect(&self, image: &image::RgbImage) -> Result<image::RgbImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`Detector::detect`], with `between` asked between the networks' blocks; its
    /// error ends the pass.
    pub fn detect_between(
        &self,
        image: &image::RgbImage,
        between: &mut Between<'_>,
    ) -> Result<image::RgbImage> {
        let map = match self {
            Detector::Lineart(network) => network.detect_between(image, between)?,
            Detector::LineartAnime(network) => network.detect_between(image, between)?,
            Detector::Depth(network) => network.detect_between(image, between)?,
            Detector::Zoe(network) => network.detect_between(image, between)?,
            Detector::Hed(network) => network.detect_levels(image, 0, between)?,
            Detector::Segment(network) => return network.detect_between(image, between),
            Detector::OpenPose(network) => return network.detect(image),
            Detector::Face(_) | Detector::Hand(_) => {
                return Err(EngineError::Internal(format!(
                    "the {} network asked for a map of its own",
                    self.network().name()
                )))
            }
            Detector::Normal(network) => return network.detect_between(image, between),
            Detector::Mlsd(network) => network.detect(image, LineThresholds::default(), between)?,
            Detector::PiDiNet(network) => network.detect_levels(image, 0, between)?,
            Detector::Teed(network) => network.detect(image, TEED_SAFE_STEPS, between)?,
            Detector::Leres(network) => network.detect(image, DepthCuts::NONE, between)?,
        };
        Ok(super::gray_to_rgb(map))
    }

    /// The soft edges of an edge network (HED, PiDiNet or TEED), quantised in
    /// `safe_steps` steps (`None`: the network's default: none, TEED's 2); `between` is
    /// asked between HED's and PiDiNet's blocks.
    pub fn soft_edges(
        &self,
        image: &image::RgbImage,
        safe_steps: Option<u32>,
        between: &mut Between<'_>,
    ) -> Result<image::RgbImage> {
        let steps = safe_steps.unwrap_or(0);
        let map = match self {
            Detector::Hed(network) => network.detect_levels(image, steps, between)?,
            Detector::PiDiNet(network) => network.detect_levels(image, steps, between)?,
            Detector::Teed(network) => {
                network.detect(image, safe_steps.unwrap_or(TEED_SAFE_STEPS), between)?
            }
            other => {
                return Err(EngineError::Internal(format!(
                    "soft edges asked of {}",
                    other.network().name()
                )))
            }
        };
        Ok(super::gray_to_rgb(map))
    }

    /// The network it is.
    pub fn network(&self) -> DetectorNetwork {
        match self {
            Detector::Lineart(_) => DetectorNetwork::Lineart,
            Detector::LineartAnime(_) => DetectorNetwork::LineartAnime,
            Detector::Depth(detector) => match detector.network() {
                DepthNetwork::DepthAnything(_) => DetectorNetwork::DepthAnything,
                DepthNetwork::Dpt(_) => DetectorNetwork::Dpt,
            },
            Detector::Zoe(_) => DetectorNetwork::ZoeDepth,
            Detector::Hed(_) => DetectorNetwork::Hed,
            Detector::Segment(_) => DetectorNetwork::UperNet,
            Detector::OpenPose(_) => DetectorNetwork::OpenPose,
            Detector::Face(_) => DetectorNetwork::FaceNet,
            Detector::Hand(_) => DetectorNetwork::HandPose,
            Detector::Normal(_) => DetectorNetwork::NormalBae,
            Detector::Mlsd(_) => DetectorNetwork::Mlsd,
            Detector::PiDiNet(_) => DetectorNetwork::PiDiNet,
            Detector::Teed(_) => DetectorNetwork::Teed,
            Detector::Leres(_) => DetectorNetwork::Leres,
        }
    }
}
