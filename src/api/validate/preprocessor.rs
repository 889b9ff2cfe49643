//! A preprocessor and its parameters, as a ControlNet unit and the Preprocess RPC name
//! them: every field checked, the detector of a network preprocessor resolved, then the
//! preprocessors not implemented yet deferred as UNIMPLEMENTED naming the field.

use crate::api::status::ApiError;
use crate::api::validate::depth_cuts;
use crate::api::validate::detector::Detectors;
use crate::api::validate::fields::{at_most, enum_value, float, read_by, Range, Violations};
use crate::api::validate::image_filters::{self, FilterParameters};
use crate::api::validate::images::{max_image_pixels, required_image};
use crate::api::validate::Deferred;
use crate::config::Limits;
use crate::engine::preprocess::leres::DepthCuts;
use crate::engine::preprocess::mlsd_lines::LineThresholds;
use crate::engine::preprocess::pose::PoseParts;
use crate::engine::preprocess::pose_set::MOST_CANVAS_SIDE;
use crate::engine::preprocess::recolor::Lightness;
use crate::engine::preprocess::{detection_size, Preprocessing, Preprocessor};
use crate::jobs::spec::DetectorFile;
use crate::proto::v1 as pb;

/// Canny's thresholds when the request names none (controlnet_aux's defaults).
const DEFAULT_THRESHOLDS: (u32, u32) = (100, 200);
/// The longest M-LSD distance threshold, in pixels of its half-size output (A1111's
/// slider's end).
const MAX_LINE_DISTANCE: f64 = 20.0;
/// The most steps soft edges are quantised in (A1111's "Safe Steps" slider's end).
const MAX_SAFE_STEPS: u32 = 10;

/// The preprocessors implemented, as the capabilities list them.
pub const IMPLEMENTED: [pb::Preprocessor; 24] = [
    pb::Preprocessor::None,
    pb::Preprocessor::Canny,
    pb::Preprocessor::Depth,
    pb::Preprocessor::Openpose,
    pb::Preprocessor::Scribble,
    pb::Preprocessor::Normal,
    pb::Preprocessor::Segmentation,
    pb::Preprocessor::Lineart,
    pb::Preprocessor::LineartAnime,
    pb::Preprocessor::Softedge,
    pb::Preprocessor::Mlsd,
    pb::Preprocessor::LineartStandard,
    pb::Preprocessor::Anyline,
    pb::Preprocessor::TileResample,
    pb::Preprocessor::Blur,
    pb::Preprocessor::Invert,
    pb::Preprocessor::OpenposeFace,
    pb::Preprocessor::OpenposeFaceonly,
    pb::Preprocessor::OpenposeHand,
    pb::Preprocessor::OpenposeFull,
    pb::Preprocessor::RecolorLuminance,
    pb::Preprocessor::RecolorIntensity,
    pb::Preprocessor::ScribbleXdog,
    pb::Preprocessor::Sketch,
];

/// The parameters the preprocessors read, checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Parameters {
    /// Canny's low and high thresholds.
    pub canny: (u32, u32),
    /// M-LSD's score and length thresholds.
    pub lines: LineThresholds,
    /// The steps soft edges are quantised in (`None`: the network's default).
    pub safe_steps: Option<u32>,
    /// Tile resampling's rate, the blur's sigma, the recolor maps' gamma and XDoG's
    /// threshold.
    pub filters: FilterParameters,
    /// LeReS depth's near and background cuts.
    pub depth: DepthCuts,
}

/// What a preprocessor is checked against: its image (when it decoded), the most
/// pixels an image may have, and where its detector comes from.
pub struct Subject<'a> {
    pub image: Option<&'a image::DynamicImage>,
    pub max_pixels: u64,
    pub detectors: Detectors<'a>,
}

/// A checked preprocessor: what it does, the detector file it runs, if any, and the
/// face and hand networks' of a pose map with faces or hands.
#[derive(Debug, Clone)]
pub struct Checked {
    pub preprocessing: Preprocessing,
    pub detector: Option<DetectorFile>,
    pub face_detector: Option<DetectorFile>,
    pub hand_detector: Option<DetectorFile>,
}

/// The domain preprocessor of an implemented wire one, with its parameters.
pub fn domain(kind: pb::Preprocessor, parameters: Parameters) -> Option<Preprocessor> {
    let (low, high) = parameters.canny;
    match kind {
        pb::Preprocessor::Unspecified | pb::Preprocessor::None => Some(Preprocessor::None),
        pb::Preprocessor::Canny => Some(Preprocessor::Canny { low, high }),
        pb::Preprocessor::Lineart => Some(Preprocessor::Lineart),
        pb::Preprocessor::LineartAnime => Some(Preprocessor::LineartAnime),
        pb::Preprocessor::Depth => Some(Preprocessor::Depth(parameters.depth)),
        pb::Preprocessor::Softedge => Some(Preprocessor::SoftEdge {
            safe_steps: parameters.safe_steps,
        }),
        pb::Preprocessor::Scribble => Some(Preprocessor::Scribble),
        pb::Preprocessor::Segmentation => Some(Preprocessor::Segmentation),
        pb::Preprocessor::Openpose => Some(Preprocessor::OpenPose(PoseParts::BODY)),
        pb::Preprocessor::OpenposeFace => Some(Preprocessor::OpenPose(PoseParts::BODY_AND_FACE)),
        pb::Preprocessor::OpenposeFaceonly => Some(Preprocessor::OpenPose(PoseParts::FACE)),
        pb::Preprocessor::OpenposeHand => Some(Preprocessor::OpenPose(PoseParts::BODY_AND_HANDS)),
        pb::Preprocessor::OpenposeFull => Some(Preprocessor::OpenPose(PoseParts::FULL)),
        pb::Preprocessor::Normal => Some(Preprocessor::Normal),
        pb::Preprocessor::Mlsd => Some(Preprocessor::Mlsd(parameters.lines)),
        pb::Preprocessor::LineartStandard => Some(Preprocessor::LineartStandard),
        pb::Preprocessor::Anyline => Some(Preprocessor::Anyline),
        pb::Preprocessor::TileResample => Some(Preprocessor::TileResample {
            rate: parameters.filters.rate,
        }),
        pb::Preprocessor::Blur => Some(Preprocessor::Blur {
            sigma: parameters.filters.sigma,
        }),
        pb::Preprocessor::Invert => Some(Preprocessor::Invert),
        pb::Preprocessor::RecolorLuminance => Some(Preprocessor::Recolor {
            lightness: Lightness::Luminance,
            gamma: parameters.filters.gamma,
        }),
        pb::Preprocessor::RecolorIntensity => Some(Preprocessor::Recolor {
            lightness: Lightness::Intensity,
            gamma: parameters.filters.gamma,
        }),
        pb::Preprocessor::ScribbleXdog => Some(Preprocessor::ScribbleXdog {
            threshold: parameters.filters.xdog_threshold,
        }),
        pb::Preprocessor::Sketch => Some(Preprocessor::Sketch),
    }
}

/// Checks `preprocessor` and `params` (fields under `prefix`, which ends with a dot or
/// is empty) for `subject`; the domain preprocessing and its detector when all is valid
/// and implemented.
pub fn preprocessor(
    prefix: &str,
    preprocessor: i32,
    params: Option<&pb::PreprocessorParams>,
    subject: Subject,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<Checked> {
    let field = format!("{prefix}preprocessor");
    let kind = enum_value::<pb::Preprocessor>(v, &field, preprocessor);
    let default = pb::PreprocessorParams::default();
    let params = params.unwrap_or(&default);
    let p = format!("{prefix}preprocessor_params");
    let canny = canny_thresholds(&p, kind, params, v);
    let lines = line_thresholds(&p, kind, params, v);
    let safe_steps = safe_steps(&p, kind, params.safe_steps, v);
    let filters = image_filters::parameters(&p, kind, params, v);
    let depth = depth_cuts::cuts(&p, kind, params, v);
    let detectors = subject.detectors;
    let image_size = subject.image.map(|i| (i.width(), i.height()));
    let max_pixels = subject.max_pixels;
    let detect_resolution = detect_resolution(&p, params.detect_resolution, subject, v);
    let kind = kind?;
    let parameters = Parameters {
        canny,
        lines,
        safe_steps,
        filters,
        depth,
    };
    let Some(preprocessor) = domain(kind, parameters) else {
        deferred.unimplemented(ApiError::Unimplemented(
            field,
            format!(
                "the {} preprocessor is not implemented yet",
                kind.as_str_name()
            ),
        ));
        return None;
    };
    if let (Some(resolution), Some(size)) = (detect_resolution, image_size) {
        network_input(&p, preprocessor, resolution, size, max_pixels, v);
    }
    let model_field = format!("{p}.model");
    let detector = match preprocessor.network() {
        Some(_) => {
            Some(detectors.resolve(preprocessor, &params.model, &model_field, v, deferred)?)
        }
        None if !params.model.is_empty() => {
            v.add(
                model_field,
                format!(
                    "applies to preprocessors that run a network; {} runs none",
                    kind.as_str_name()
                ),
            );
            return None;
        }
        None => None,
    };
    let names = (params.face_model.as_str(), params.hand_model.as_str());
    let (face_detector, hand_detector) =
        detectors.parts_named(preprocessor, names, &p, v, deferred)?;
    if let (Some(entry), Some(None), Some(size)) = (&detector, detect_resolution, image_size) {
        own_size_sides(&p, entry, size, v);
    }
    if let (Some(entry), Some(steps)) = (&detector, safe_steps) {
        network_safe_steps(&p, entry, steps, v);
    }
    if let Some(entry) = &detector {
        depth_cuts::network_cuts(&p, entry, depth, v);
    }
    if let (Some(entry), Some(resolution), Some(size)) = (&detector, detect_resolution, image_size)
    {
        let detected = Preprocessing {
            preprocessor,
            detect_resolution: resolution,
        }
        .detected_size(size.0, size.1);
        zoe_input(&p, entry, detected, v);
    }
    Some(Checked {
        preprocessing: Preprocessing {
            preprocessor,
            detect_resolution: detect_resolution?,
        },
        detector,
        face_detector,
        hand_detector,
    })
}

/// OpenPose's network input (the detected image scaled to a height of 184) within the
/// pixels an image may have (a long strip would make a far larger one), and at least a
/// pixel wide (a tall one would make none).
fn pose_input(p: &str, (w, h): (u32, u32), resolution: Option<u32>, max: u64, v: &mut Violations) {
    let preprocessing = Preprocessing {
        preprocessor: Preprocessor::OpenPose(PoseParts::BODY),
        detect_resolution: resolution,
    };
    let (dw, dh) = preprocessing.detected_size(w, h);
    let clamp = |side: u64| u32::try_from(side).unwrap_or(u32::MAX);
    let (nw, nh) = crate::engine::preprocess::pose::network_size(clamp(dw), clamp(dh));
    if (nw as u64).saturating_mul(nh as u64) > max {
        v.add(
            format!("{p}.detect_resolution"),
            format!(
                "the pose network would see the {dw}x{dh} image as {nw}x{nh}, more than {max} pixels: crop the image nearer to square"
            ),
        );
    } else if dw.max(dh) > u64::from(MOST_CANVAS_SIDE) {
        v.add(
            format!("{p}.detect_resolution"),
            format!(
                "would make a {dw}x{dh} pose map, a side over the {MOST_CANVAS_SIDE} pixels poses are drawn at: crop the image or set a detect_resolution"
            ),
        );
    } else if nw == 0 || nh == 0 {
        v.add(
            format!("{p}.detect_resolution"),
            format!(
                "the pose network would see the {dw}x{dh} image as {nw}x{nh}, no pixel wide: crop the image nearer to square"
            ),
        );
    }
}

/// The sizes a preprocessor's network takes (under `p`), for an image of `size` detected
/// at `resolution` (`None`: its own size).
fn network_input(
    p: &str,
    preprocessor: Preprocessor,
    resolution: Option<u32>,
    size: (u32, u32),
    max_pixels: u64,
    v: &mut Violations,
) {
    match (preprocessor, resolution) {
        (Preprocessor::Normal, None) => normal_sides(p, size, v),
        (Preprocessor::Mlsd(_), None) => {
            if let Err(why) = crate::engine::preprocess::mlsd::check_size(size.0, size.1) {
                v.add(
                    format!("{p}.detect_resolution"),
                    format!("{why}: set a detect_resolution (its sizes are multiples of 64)"),
                );
            }
        }
        (Preprocessor::OpenPose(_), resolution) => pose_input(p, size, resolution, max_pixels, v),
        (Preprocessor::TileResample { rate }, resolution) => {
            let preprocessing = Preprocessing {
                preprocessor,
                detect_resolution: resolution,
            };
            let detected = preprocessing.detected_size(size.0, size.1);
            image_filters::resampled_sides(p, rate, detected, v);
        }
        _ => {}
    }
}

/// Canny's low and high thresholds (under `p`), for Canny only: each at most 255, the
/// low one at most the high one.
fn canny_thresholds(
    p: &str,
    kind: Option<pb::Preprocessor>,
    params: &pb::PreprocessorParams,
    v: &mut Violations,
) -> (u32, u32) {
    let (low_field, high_field) = (format!("{p}.low_threshold"), format!("{p}.high_threshold"));
    let mut sent = |field: &str, value: Option<u32>| {
        value.filter(|_| read_by(v, field, kind, pb::Preprocessor::Canny))
    };
    let sent_low = sent(&low_field, params.low_threshold);
    let sent_high = sent(&high_field, params.high_threshold);
    let (low, high) = (
        sent_low.unwrap_or(DEFAULT_THRESHOLDS.0),
        sent_high.unwrap_or(DEFAULT_THRESHOLDS.1),
    );
    at_most(v, &low_field, low, 255);
    at_most(v, &high_field, high, 255);
    if high <= 255 && low > high {
        // The field the client sent is the one named: a high threshold alone below the
        // default low one is the high one's fault.
        if sent_low.is_none() {
            v.add(
                high_field,
                format!("must be at least low_threshold (its default {low}), got {high}"),
            );
        } else {
            v.add(
                low_field,
                format!("must be at most high_threshold ({low} > {high})"),
            );
        }
    }
    (low, high)
}

/// M-LSD's thresholds (controlnet_aux's `thr_v` and `thr_d`), for M-LSD only, kept as the
/// float32 the client sent, as numpy compares them.
fn line_thresholds(
    p: &str,
    kind: Option<pb::Preprocessor>,
    params: &pb::PreprocessorParams,
    v: &mut Violations,
) -> LineThresholds {
    let defaults = LineThresholds::default();
    let mut checked = |name: &str, value: Option<f32>, max: f64, default: f32| {
        let field = format!("{p}.{name}");
        match value {
            Some(_) if !read_by(v, &field, kind, pb::Preprocessor::Mlsd) => default,
            Some(x) if float(v, &field, x, Range::closed(0.0, max)).is_some() => x,
            _ => default,
        }
    };
    LineThresholds {
        score: checked(
            "mlsd_score_threshold",
            params.mlsd_score_threshold,
            1.0,
            defaults.score,
        ),
        distance: checked(
            "mlsd_distance_threshold",
            params.mlsd_distance_threshold,
            MAX_LINE_DISTANCE,
            defaults.distance,
        ),
    }
}

/// `safe_steps` (under `p`): at most [`MAX_SAFE_STEPS`], and set (to more than 0) for
/// soft edges only.
fn safe_steps(
    p: &str,
    kind: Option<pb::Preprocessor>,
    steps: Option<u32>,
    v: &mut Violations,
) -> Option<u32> {
    let field = format!("{p}.safe_steps");
    let steps = steps?;
    if steps > 0 && !read_by(v, &field, kind, pb::Preprocessor::Softedge) {
        return None;
    }
    if steps > MAX_SAFE_STEPS {
        at_most(v, &field, steps, MAX_SAFE_STEPS);
        return None;
    }
    Some(steps)
}

/// HED and PiDiNet quantise soft edges in two steps (controlnet_aux's `safe=True`) or
/// not at all.
fn network_safe_steps(p: &str, detector: &DetectorFile, steps: u32, v: &mut Violations) {
    use crate::engine::preprocess::detector::DetectorNetwork;
    let edge_network = matches!(
        detector.network,
        DetectorNetwork::Hed | DetectorNetwork::PiDiNet
    );
    if edge_network && !matches!(steps, 0 | 2) {
        v.add(
            format!("{p}.safe_steps"),
            format!(
                "must be 0 or 2 for the {} network (its safe=True quantises in two steps), got {steps}",
                detector.network.name()
            ),
        );
    }
}

/// A network's sides for an image detected at its own size: its poolings must leave a
/// pixel (HED's four, PiDiNet's three), its paddings must fit (the line-art generator's),
/// TEED's branches must meet (multiples of 4), LeReS's decoder its encoder (multiples of
/// 32); a detect resolution always does all.
fn own_size_sides(p: &str, detector: &DetectorFile, (w, h): (u32, u32), v: &mut Violations) {
    use crate::engine::preprocess::detector::DetectorNetwork;
    let least = match detector.network {
        DetectorNetwork::Hed => crate::engine::preprocess::hed::MIN_SIDE,
        DetectorNetwork::PiDiNet => crate::engine::preprocess::pidinet::MIN_SIDE,
        DetectorNetwork::Lineart => crate::engine::preprocess::lineart::MIN_SIDE,
        network @ (DetectorNetwork::Teed | DetectorNetwork::Leres) => {
            let multiple = match network {
                DetectorNetwork::Teed => crate::engine::preprocess::teed::SIDE_MULTIPLE,
                _ => crate::engine::preprocess::leres::SIDE_MULTIPLE,
            };
            if !(w.is_multiple_of(multiple) && h.is_multiple_of(multiple)) {
                v.add(
                    format!("{p}.detect_resolution"),
                    format!(
                        "`{}` needs sides that are multiples of {multiple}; the image is {w}x{h}: set a detect_resolution",
                        detector.model.name
                    ),
                );
            }
            return;
        }
        _ => return,
    };
    if w.min(h) < least {
        v.add(
            format!("{p}.detect_resolution"),
            format!(
                "`{}` needs sides of at least {least} pixels; the image is {w}x{h}: set a detect_resolution",
                detector.model.name
            ),
        );
    }
}

/// A ZoeDepth processor's network input for the detected image: its aspect ratio near
/// enough to the processor's size that no side is rounded to nothing.
fn zoe_input(p: &str, detector: &DetectorFile, (w, h): (u64, u64), v: &mut Violations) {
    use crate::engine::preprocess::detector::DetectorNetwork;
    if detector.network != DetectorNetwork::ZoeDepth {
        return;
    }
    let side = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
    let path = &detector.model.path;
    if let Err(why) =
        crate::engine::preprocess::zoe_detector::check_image_size(path, side(w), side(h))
    {
        v.add(
            format!("{p}.detect_resolution"),
            format!("{why}: crop the image nearer to that shape"),
        );
    }
}

/// The normal network's sides (multiples of 8) for an image detected at its own size;
/// a detect resolution always makes them (multiples of 64).
fn normal_sides(p: &str, (w, h): (u32, u32), v: &mut Violations) {
    let multiple = crate::engine::preprocess::normal_bae::SIDE_MULTIPLE;
    if !(w.is_multiple_of(multiple) && h.is_multiple_of(multiple)) {
        v.add(
            format!("{p}.detect_resolution"),
            format!(
                "the normal preprocessor needs sides that are multiples of {multiple}; the image is {w}x{h}: set a detect_resolution (its sizes are multiples of 64)"
            ),
        );
    }
}

/// `detect_resolution` (under `p`): 0 or 64 to 2048, and no larger an image for
/// detection than an input image may be.
fn detect_resolution(
    p: &str,
    resolution: u32,
    subject: Subject,
    v: &mut Violations,
) -> Option<Option<u32>> {
    let field = format!("{p}.detect_resolution");
    if resolution == 0 {
        return Some(None);
    }
    if !(64..=2048).contains(&resolution) {
        v.add(
            field,
            format!("must be 0 or between 64 and 2048, got {resolution}"),
        );
        return None;
    }
    if let Some(image) = subject.image {
        let (w, h) = detection_size(image.width(), image.height(), resolution);
        if w.saturating_mul(h) > subject.max_pixels {
            let max = subject.max_pixels;
            v.add(
                field,
                format!(
                    "would resize the {}x{} image to {w}x{h} for detection, more than {max} pixels",
                    image.width(),
                    image.height()
                ),
            );
            return None;
        }
    }
    Some(Some(resolution))
}

/// A Preprocess request, checked: its image and preprocessor.
pub fn preprocess_request(
    request: &pb::PreprocessRequest,
    limits: &Limits,
    detectors: Detectors,
) -> Result<(image::DynamicImage, Checked), ApiError> {
    let mut v = Violations::default();
    let mut deferred = Deferred::default();
    let max_pixels = max_image_pixels(limits);
    let image = required_image(&request.image, "image", max_pixels, &mut v);
    let subject = Subject {
        image: image.as_ref(),
        max_pixels,
        detectors,
    };
    let preprocessor = preprocessor(
        "",
        request.preprocessor,
        request.preprocessor_params.as_ref(),
        subject,
        &mut v,
        &mut deferred,
    );
    v.into_result()?;
    deferred.into_result()?;
    match (image, preprocessor) {
        (Some(image), Some(preprocessor)) => Ok((image, preprocessor)),
        _ => Err(ApiError::Internal(
            "a valid request without its parts".into(),
        )),
    }
}
