//! Poses given instead of an image (a Preprocess request's, a ControlNet unit's or a
//! union condition's): the pose set checked and converted, and the parts its OpenPose
//! preprocessor draws.

use prost::Message;

use crate::api::status::ApiError;
use crate::api::validate::fields::Violations;
use crate::api::validate::images::max_image_pixels;
use crate::api::validate::preprocessor::{domain, Parameters};
use crate::config::Limits;
use crate::engine::preprocess::pose_set::{
    PersonPose, PoseParts, PosePoint, PoseSet, BODY_KEYPOINTS, HAND_KEYPOINTS, MOST_CANVAS_SIDE,
    MOST_FACE_LANDMARKS,
};
use crate::engine::preprocess::Preprocessor;
use crate::proto::v1 as pb;

/// The most people a pose set may hold.
pub const MOST_PEOPLE: usize = 100;
/// How far off the canvas a keypoint may lie, in canvas sizes either side.
const REACH: std::ops::RangeInclusive<f64> = -1.0..=2.0;

/// The fields of a message that may give poses instead of an image.
pub struct PosedFields<'a> {
    pub image: &'a [u8],
    pub preprocessor: i32,
    pub params: Option<&'a pb::PreprocessorParams>,
    pub poses: &'a pb::Poses,
}

/// The poses of a Preprocess request that has them, checked, and the parts to draw.
pub fn poses_request(
    request: &pb::PreprocessRequest,
    poses: &pb::Poses,
    limits: &Limits,
) -> Result<(PoseSet, PoseParts), ApiError> {
    let mut v = Violations::default();
    let fields = PosedFields {
        image: &request.image,
        preprocessor: request.preprocessor,
        params: request.preprocessor_params.as_ref(),
        poses,
    };
    let checked = given_poses("", fields, max_image_pixels(limits), &mut v);
    v.into_result()?;
    checked.ok_or_else(|| ApiError::Internal("valid poses without their parts".into()))
}

/// Poses given under `prefix` (`""`, `spec.controlnets[0].`) in place of an image: the
/// set and the parts its OpenPose preprocessor draws, each violation recorded. A
/// canvas may have as many pixels as an image (`max_pixels`): a detection's poses
/// always come back.
pub fn given_poses(
    prefix: &str,
    fields: PosedFields,
    max_pixels: u64,
    v: &mut Violations,
) -> Option<(PoseSet, PoseParts)> {
    if !fields.image.is_empty() {
        v.add(
            format!("{prefix}image"),
            "must be empty when poses are given (one or the other)",
        );
    }
    let kind = pb::Preprocessor::try_from(fields.preprocessor).ok();
    let parts = match kind.and_then(|k| domain(k, Parameters::default())) {
        Some(Preprocessor::OpenPose(parts)) => Some(parts),
        _ => {
            v.add(
                format!("{prefix}preprocessor"),
                "must be one of the OpenPose preprocessors to draw poses",
            );
            None
        }
    };
    if fields.params.is_some_and(|p| p.encoded_len() > 0) {
        v.add(
            format!("{prefix}preprocessor_params"),
            "has nothing to set when poses are drawn",
        );
    }
    let set = pose_set(fields.poses, max_pixels, &format!("{prefix}poses"), v);
    Some((set?, parts?))
}

/// `poses` (the message at `field`) in domain terms, each violation recorded.
fn pose_set(poses: &pb::Poses, most: u64, field: &str, v: &mut Violations) -> Option<PoseSet> {
    let before = v.0.len();
    let (width, height) = (poses.canvas_width, poses.canvas_height);
    let too_large = u64::from(width) * u64::from(height) > most;
    for (name, size) in [("canvas_width", width), ("canvas_height", height)] {
        if size == 0 {
            v.add(format!("{field}.{name}"), "must be at least 1");
        } else if size > MOST_CANVAS_SIDE {
            v.add(
                format!("{field}.{name}"),
                format!("must be at most {MOST_CANVAS_SIDE}, got {size}"),
            );
        } else if too_large {
            v.add(
                format!("{field}.{name}"),
                format!(
                    "makes a {width}x{height} canvas, over the {most} pixels an image may have"
                ),
            );
        }
    }
    if poses.people.len() > MOST_PEOPLE {
        let count = poses.people.len();
        v.add(
            format!("{field}.people"),
            format!("must hold at most {MOST_PEOPLE} people, got {count}"),
        );
    }
    let people: Vec<PersonPose> = poses
        .people
        .iter()
        .enumerate()
        .map(|(i, person)| person_pose(person, &format!("{field}.people[{i}]"), v))
        .collect();
    (v.0.len() == before).then_some(PoseSet {
        width: poses.canvas_width,
        height: poses.canvas_height,
        people,
    })
}

/// One person's parts, each of an allowed count of keypoints in reach.
fn person_pose(person: &pb::PersonPose, field: &str, v: &mut Violations) -> PersonPose {
    let mut part = |name: &str, keypoints: &[pb::PoseKeypoint], fits: fn(usize) -> bool, wanted| {
        let field = format!("{field}.{name}");
        let count = keypoints.len();
        if !fits(count) {
            v.add(
                field.as_str(),
                format!("must hold {wanted} keypoints, got {count}"),
            );
        }
        keypoints
            .iter()
            .enumerate()
            .map(|(i, k)| point(k, &format!("{field}[{i}]"), v))
            .collect()
    };
    let body = |n| n == 0 || n == BODY_KEYPOINTS;
    let hand = |n| n == 0 || n == HAND_KEYPOINTS;
    let face = |n| n <= MOST_FACE_LANDMARKS;
    let (bodies, hands) = (
        format!("0 or {BODY_KEYPOINTS}"),
        format!("0 or {HAND_KEYPOINTS}"),
    );
    PersonPose {
        body: part("body", &person.body, body, bodies),
        left_hand: part("left_hand", &person.left_hand, hand, hands.clone()),
        right_hand: part("right_hand", &person.right_hand, hand, hands),
        face: part(
            "face",
            &person.face,
            face,
            format!("at most {MOST_FACE_LANDMARKS}"),
        ),
    }
}

/// A keypoint's position, unless missing; a coordinate out of reach (NaN included) is
/// a violation of it.
fn point(keypoint: &pb::PoseKeypoint, field: &str, v: &mut Violations) -> PosePoint {
    for (name, value) in [("x", keypoint.x), ("y", keypoint.y)] {
        if !REACH.contains(&value) {
            v.add(
                format!("{field}.{name}"),
                format!("must be a fraction of the canvas in [-1, 2], got {value}"),
            );
        }
    }
    (!keypoint.missing).then_some((keypoint.x, keypoint.y))
}
