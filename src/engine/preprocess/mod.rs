//! Preprocessors: how a conditioning image becomes a ControlNet's control map, as
//! controlnet_aux computes them (its `HWC3` input rule, its `resize_image` to the
//! detection resolution, then the detector).

pub mod ade20k;
pub mod anyline;
pub mod beit;
pub mod bit;
pub mod canny;
mod cv_area_halves;
pub mod cv_blur;
pub mod cv_line;
pub mod cv_plane;
pub mod cv_resize;
pub mod depth;
pub mod depth_anything;
pub mod detector;
pub mod dinov2;
pub mod dpt;
pub mod dpt_fusion;
pub mod efficientnet;
pub mod hed;
pub mod image_filters;
pub mod leres;
pub mod lineart;
pub mod lineart_anime;
pub mod lineart_standard;
pub mod mlsd;
pub mod mlsd_lines;
pub mod normal_bae;
pub mod openpose;
pub mod openpose_cpm;
pub mod pidinet;
pub mod pose;
pub mod pose_decode;
pub mod pose_draw;
pub mod pose_face;
pub mod pose_hand;
pub mod pose_set;
pub mod processor;
pub mod reassemble;
pub mod recolor;
pub mod resnext;
pub mod scribble;
pub mod segment;
pub mod teed;
pub mod upernet;
pub mod vit_layer;
pub mod xdog;
pub mod zoe_bins;
pub mod zoe_detector;
pub mod zoedepth;

use image::{DynamicImage, GrayImage, RgbImage};

use crate::engine::error::{EngineError, Result};
use cv_resize::Interpolation;
use detector::{Detector, DetectorNetwork};
use image_filters::Param;
use mlsd_lines::LineThresholds;
use pose::{DetectedPeople, PartNetworks, PoseParts};

/// A preprocessor and the resolution its detector runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocessing {
    /// The detector and its parameters.
    pub preprocessor: Preprocessor,
    /// The short side the image is resized to before detection (controlnet_aux's
    /// `detect_resolution`); `None`: the image's own size. The image taken as the map
    /// as it is (no preprocessor) is never resized here.
    pub detect_resolution: Option<u32>,
}

/// The loaded networks a preprocessor runs: its detector, and the face and hand networks
/// of a pose map with faces or hands.
#[derive(Clone, Copy, Default)]
pub struct Networks<'a> {
    pub detector: Option<&'a Detector>,
    pub face: Option<&'a Detector>,
    pub hand: Option<&'a Detector>,
}

impl<'a> Networks<'a> {
    /// A detector alone (or none).
    pub fn detector(detector: Option<&'a Detector>) -> Self {
        Self {
            detector,
            ..Self::default()
        }
    }
}

impl Preprocessing {
    /// The control map of `image` (three channels, as ControlNets take them), at the
    /// detection size, drawn with `networks` where the preprocessor runs any.
    pub fn run(self, image: &DynamicImage, networks: Networks) -> Result<RgbImage> {
        self.run_interruptible(image, networks, &mut || Ok(()))
    }

    /// [`Preprocessing::run`], with `between_passes` run before each further network
    /// pass of a preprocessor that makes several (a face, a hand's scale); its error
    /// stops the run, so a job stops within one pass of being told to.
    pub fn run_interruptible(
        self,
        image: &DynamicImage,
        networks: Networks,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<RgbImage> {
        Ok(self.control_map(image, networks, between_passes)?.map)
    }

    /// [`Preprocessing::run_interruptible`], with the poses an OpenPose preprocessor
    /// found beside its map.
    pub fn control_map(
        self,
        image: &DynamicImage,
        networks: Networks,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<ControlMap> {
        // An RGB image is read where it is, not copied.
        let converted;
        let rgb = match image {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => {
                converted = hwc3(other);
                &converted
            }
        };
        let resized;
        let rgb = match (self.preprocessor, self.detect_resolution) {
            (Preprocessor::None, _) => return Ok(ControlMap::drawn(rgb.clone())),
            (_, None) => rgb,
            (_, Some(resolution)) => {
                resized = resize_for_detection(rgb, resolution);
                &resized
            }
        };
        match self.preprocessor {
            Preprocessor::OpenPose(parts) => {
                let people = pose_people(rgb, parts, networks, between_passes)?;
                Ok(ControlMap {
                    map: people.draw(parts),
                    people: Some(people),
                })
            }
            other => Ok(ControlMap::drawn(other.detect(
                rgb,
                networks,
                between_passes,
            )?)),
        }
    }
}

/// A control map, and the people drawn in it where a pose preprocessor drew it (their
/// poses made only where asked for).
pub struct ControlMap {
    pub map: RgbImage,
    pub people: Option<DetectedPeople>,
}

impl ControlMap {
    fn drawn(map: RgbImage) -> Self {
        Self { map, people: None }
    }
}

impl Preprocessing {
    /// The size (width, height) the detector sees a `width`×`height` image at.
    pub fn detected_size(self, width: u32, height: u32) -> (u64, u64) {
        match self.detect_resolution {
            Some(resolution) => detection_size(width, height, resolution),
            None => (u64::from(width), u64::from(height)),
        }
    }
}

/// The size controlnet_aux's `resize_image` gives a `width`×`height` image for
/// `resolution`: the short side scaled to it, each side rounded (half to even) to a
/// multiple of 64.
pub fn detection_size(width: u32, height: u32, resolution: u32) -> (u64, u64) {
    let (w, h) = (f64::from(width), f64::from(height));
    let k = f64::from(resolution) / w.min(h);
    let side = |s: f64| ((s * k / 64.0).round_ties_even() as u64) * 64;
    (side(w), side(h))
}

/// controlnet_aux's `resize_image`: OpenCV's Lanczos4 where the image grows, its area
/// averaging where it does not.
pub fn resize_for_detection(image: &RgbImage, resolution: u32) -> RgbImage {
    let (width, height) = detection_size(image.width(), image.height(), resolution);
    let grows = f64::from(resolution) > f64::from(image.width().min(image.height()));
    let interpolation = if grows {
        Interpolation::Lanczos4
    } else {
        Interpolation::Area
    };
    cv_resize::resize(image, width as u32, height as u32, interpolation)
}

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
    /// Line art from controlnet_aux's line-art generator (realistic or coarse weights).
    Lineart,
    /// Line art from controlnet_aux's anime line-art U-Net.
    LineartAnime,
    /// Dark lines on a light background picked out by a blur (no network).
    LineartStandard,
    /// Depth from a Depth Anything, DPT, ZoeDepth or LeReS network, LeReS's with its near
    /// and background cuts.
    Depth(leres::DepthCuts),
    /// Soft edges from controlnet_aux's HED, PiDiNet or TEED network, optionally
    /// quantised (A1111's `softedge_hedsafe`, `softedge_pidisafe`, `softedge_teed`).
    SoftEdge {
        /// controlnet_aux's `safe_step` steps (0: none); `None`: the network's default.
        safe_steps: Option<u32>,
    },
    /// Scribbles: HED's soft edges thinned, spread and thresholded.
    Scribble,
    /// A1111's `t2ia_sketch_pidi`: PiDiNet's edges above one half, for sketch adapters.
    Sketch,
    /// A1111's `scribble_xdog`: scribbles from a difference of Gaussians (no network).
    ScribbleXdog {
        /// Twice a pixel's darkness must exceed it for a stroke.
        threshold: u32,
    },
    /// ADE20K segmentation from a UperNet model.
    Segmentation,
    /// OpenPose skeletons and faces (A1111's `openpose`, `openpose_face`,
    /// `openpose_faceonly`).
    OpenPose(PoseParts),
    /// Surface normals from controlnet_aux's NormalBAE network.
    Normal,
    /// Straight line segments from controlnet_aux's M-LSD network.
    Mlsd(LineThresholds),
    /// controlnet_aux's Anyline: a TEED network's soft edges with the dark lines of the
    /// standard line-art detector over them.
    Anyline,
    /// A1111's `tile_resample`: the image shrunk by a rate (no network).
    TileResample {
        /// The down-sampling rate, at least 1.
        rate: Param,
    },
    /// A1111's `blur_gaussian`: OpenCV's Gaussian blur of the image (no network).
    Blur {
        /// The Gaussian's standard deviation, in pixels.
        sigma: Param,
    },
    /// A1111's `invert`: 255 minus each value (no network).
    Invert,
    /// A1111's `recolor_luminance` and `recolor_intensity`: the image's lightness,
    /// gamma corrected (no network).
    Recolor {
        /// Which lightness.
        lightness: recolor::Lightness,
        /// The gamma the lightness is raised to.
        gamma: Param,
    },
}

impl Preprocessor {
    /// The network it runs, if any.
    pub fn network(self) -> Option<DetectorNetwork> {
        match self {
            Preprocessor::None
            | Preprocessor::Canny { .. }
            | Preprocessor::LineartStandard
            | Preprocessor::TileResample { .. }
            | Preprocessor::Blur { .. }
            | Preprocessor::Invert
            | Preprocessor::Recolor { .. }
            | Preprocessor::ScribbleXdog { .. } => None,
            Preprocessor::Lineart => Some(DetectorNetwork::Lineart),
            Preprocessor::LineartAnime => Some(DetectorNetwork::LineartAnime),
            Preprocessor::Depth(_) => Some(DetectorNetwork::DepthAnything),
            Preprocessor::SoftEdge { .. } | Preprocessor::Scribble => Some(DetectorNetwork::Hed),
            Preprocessor::Segmentation => Some(DetectorNetwork::UperNet),
            Preprocessor::OpenPose(_) => Some(DetectorNetwork::OpenPose),
            Preprocessor::Normal => Some(DetectorNetwork::NormalBae),
            Preprocessor::Mlsd(_) => Some(DetectorNetwork::Mlsd),
            Preprocessor::Anyline => Some(DetectorNetwork::Teed),
            Preprocessor::Sketch => Some(DetectorNetwork::PiDiNet),
        }
    }

    /// The face network it runs beside its detector, if any.
    pub fn face_network(self) -> Option<DetectorNetwork> {
        match self {
            Preprocessor::OpenPose(parts) if parts.face => Some(DetectorNetwork::FaceNet),
            _ => None,
        }
    }

    /// The hand network it runs beside its detector, if any.
    pub fn hand_network(self) -> Option<DetectorNetwork> {
        match self {
            Preprocessor::OpenPose(parts) if parts.hands => Some(DetectorNetwork::HandPose),
            _ => None,
        }
    }

    /// Whether a detector file holding `held` draws its map: the network it runs or one
    /// that stands in for it. TEED draws soft edges, not scribbles (controlnet_aux has no
    /// TEED scribble).
    pub fn runs_on(self, held: DetectorNetwork) -> bool {
        let teed_scribble = self == Preprocessor::Scribble && held == DetectorNetwork::Teed;
        self.network().is_some_and(|n| n.accepts(held)) && !teed_scribble
    }

    /// The networks it runs on, as a refusal names them.
    pub fn networks_described(self) -> &'static str {
        match (self, self.network()) {
            (Preprocessor::Scribble, _) => "hed or pidinet",
            (_, Some(network)) => network.described(),
            (_, None) => "none",
        }
    }

    /// The detector's map of an RGB image, `between_passes` run between network passes.
    fn detect(
        self,
        rgb: &RgbImage,
        networks: Networks,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<RgbImage> {
        let detector = networks.detector;
        match (self, self.network()) {
            (Preprocessor::None, _) => Ok(rgb.clone()),
            (Preprocessor::Canny { low, high }, _) => Ok(gray_to_rgb(canny::canny(rgb, low, high))),
            (Preprocessor::LineartStandard, _) => {
                Ok(gray_to_rgb(lineart_standard::lineart_standard(rgb)))
            }
            (Preprocessor::TileResample { rate }, _) => image_filters::tile_resample(rgb, rate.0),
            (Preprocessor::Blur { sigma }, _) => Ok(image_filters::blur(rgb, sigma.0)),
            (Preprocessor::Invert, _) => Ok(image_filters::invert(rgb)),
            (Preprocessor::ScribbleXdog { threshold }, _) => {
                Ok(gray_to_rgb(xdog::xdog(rgb, threshold)))
            }
            (Preprocessor::Recolor { lightness, gamma }, _) => {
                Ok(gray_to_rgb(recolor::recolor(rgb, lightness, gamma.0)))
            }
            (Preprocessor::SoftEdge { safe_steps }, _) => match detector {
                Some(detector) => detector.soft_edges(rgb, safe_steps, between_passes),
                None => Err(EngineError::Internal(
                    "soft edges without a detector".into(),
                )),
            },
            (Preprocessor::Anyline, _) => match detector {
                Some(Detector::Teed(network)) => {
                    Ok(gray_to_rgb(anyline::anyline(network, rgb, between_passes)?))
                }
                other => Err(EngineError::Internal(format!(
                    "the Anyline preprocessor was handed {:?}",
                    other.map(Detector::network)
                ))),
            },
            (Preprocessor::OpenPose(parts), _) => {
                Ok(pose_people(rgb, parts, networks, between_passes)?.draw(parts))
            }
            (Preprocessor::Depth(cuts), _) => depth_map(rgb, cuts, detector, between_passes),
            (Preprocessor::Sketch, _) => match detector {
                Some(Detector::PiDiNet(network)) => {
                    Ok(gray_to_rgb(network.detect_filtered(rgb, between_passes)?))
                }
                other => Err(EngineError::Internal(format!(
                    "the sketch preprocessor was handed {:?}",
                    other.map(Detector::network)
                ))),
            },
            (Preprocessor::Mlsd(thresholds), _) => match detector {
                Some(Detector::Mlsd(network)) => Ok(gray_to_rgb(network.detect(
                    rgb,
                    thresholds,
                    between_passes,
                )?)),
                other => Err(EngineError::Internal(format!(
                    "the M-LSD preprocessor was handed {:?}",
                    other.map(Detector::network)
                ))),
            },
            (_, network) => match detector {
                Some(detector) if network.is_some_and(|n| n.accepts(detector.network())) => {
                    let map = detector.detect_between(rgb, between_passes)?;
                    if self != Preprocessor::Scribble {
                        return Ok(map);
                    }
                    let soft = DynamicImage::ImageRgb8(map).to_luma8();
                    Ok(gray_to_rgb(scribble::scribble(&soft)))
                }
                other => Err(EngineError::Internal(format!(
                    "the {self:?} preprocessor was handed {:?}",
                    other.map(Detector::network)
                ))),
            },
        }
    }
}

/// The depth map of `detector` (LeReS's with its `cuts`), `between_passes` asked
/// between the network's blocks.
fn depth_map(
    rgb: &RgbImage,
    cuts: leres::DepthCuts,
    detector: Option<&Detector>,
    between_passes: &mut dyn FnMut() -> Result<()>,
) -> Result<RgbImage> {
    match detector {
        Some(Detector::Leres(network)) => {
            Ok(gray_to_rgb(network.detect(rgb, cuts, between_passes)?))
        }
        Some(Detector::Zoe(network)) if cuts == leres::DepthCuts::NONE => {
            Ok(gray_to_rgb(network.detect_between(rgb, between_passes)?))
        }
        Some(network @ Detector::Depth(_)) if cuts == leres::DepthCuts::NONE => {
            network.detect_between(rgb, between_passes)
        }
        other => Err(EngineError::Internal(format!(
            "the depth preprocessor with {cuts:?} was handed {:?}",
            other.map(Detector::network)
        ))),
    }
}

/// The people OpenPose finds, with the faces and hands of `parts`, with the body, face
/// and hand networks handed in.
fn pose_people(
    rgb: &RgbImage,
    parts: PoseParts,
    networks: Networks,
    between_passes: &mut dyn FnMut() -> Result<()>,
) -> Result<DetectedPeople> {
    let wrong = || {
        EngineError::Internal(format!(
            "the OpenPose preprocessor was handed {:?}, {:?} and {:?}",
            networks.detector.map(Detector::network),
            networks.face.map(Detector::network),
            networks.hand.map(Detector::network)
        ))
    };
    let Some(Detector::OpenPose(body)) = networks.detector else {
        return Err(wrong());
    };
    let face = match networks.face {
        Some(Detector::Face(face)) => Some(face),
        None => None,
        Some(_) => return Err(wrong()),
    };
    let hand = match networks.hand {
        Some(Detector::Hand(hand)) => Some(hand),
        None => None,
        Some(_) => return Err(wrong()),
    };
    body.detect_people(rgb, parts, PartNetworks { face, hand }, between_passes)
}

/// controlnet_aux's `HWC3`: grey becomes three equal channels, and an alpha channel is
/// composited over white in float32 and truncated, as numpy does.
pub fn hwc3(image: &DynamicImage) -> RgbImage {
    if let DynamicImage::ImageRgb8(rgb) = image {
        return rgb.clone();
    }
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
pub fn gray_to_rgb(gray: GrayImage) -> RgbImage {
    let (width, height) = gray.dimensions();
    let rgb = gray.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
    RgbImage::from_raw(width, height, rgb).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Reproducible pseudo-random words (xorshift32 from `seed`) for the filters' unit tests.
#[cfg(test)]
pub(crate) fn xorshift32(seed: u32) -> impl Iterator<Item = u32> {
    std::iter::successors(Some(seed), |&state| {
        let mut s = state;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        Some(s)
    })
    .skip(1)
}
