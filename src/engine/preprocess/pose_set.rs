//! People's poses as a client holds and edits them (the pose JSON of A1111's
//! `render_openpose_json` and of the OpenPose editors): each person's body keypoints,
//! hands and face as fractions of a canvas, drawn into a control map as controlnet_aux's
//! `draw_poses` draws such poses, the parts a pose preprocessor would draw.

use image::RgbImage;

use crate::engine::preprocess::pose_decode::PARTS;
use crate::engine::preprocess::pose_draw::draw_body;
use crate::engine::preprocess::pose_face::draw_face_pixels;
use crate::engine::preprocess::pose_hand::draw_hand_pixels;

/// Which parts of each person a pose map shows (A1111's `openpose`: the body;
/// `openpose_face`: body and face; `openpose_faceonly`: the face; `openpose_hand`: body
/// and hands; `openpose_full`: all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoseParts {
    pub body: bool,
    pub hands: bool,
    pub face: bool,
}

impl PoseParts {
    /// The body alone (controlnet_aux's default).
    pub const BODY: PoseParts = PoseParts {
        body: true,
        hands: false,
        face: false,
    };
    /// Body and face (`include_face`).
    pub const BODY_AND_FACE: PoseParts = PoseParts {
        body: true,
        hands: false,
        face: true,
    };
    /// The face alone (the body found, not drawn).
    pub const FACE: PoseParts = PoseParts {
        body: false,
        hands: false,
        face: true,
    };
    /// Body and hands (`include_hand`).
    pub const BODY_AND_HANDS: PoseParts = PoseParts {
        body: true,
        hands: true,
        face: false,
    };
    /// Body, hands and face.
    pub const FULL: PoseParts = PoseParts {
        body: true,
        hands: true,
        face: true,
    };
}

/// A keypoint's position as a fraction of the canvas's width and height; `None` where
/// it is not there.
pub type PosePoint = Option<(f64, f64)>;

/// The body keypoints a person has (OpenPose's 18, nose first) and a hand's (21, the
/// wrist first).
pub const BODY_KEYPOINTS: usize = PARTS;
pub const HAND_KEYPOINTS: usize = 21;
/// The most face landmarks a person has (OpenPose's 70).
pub const MOST_FACE_LANDMARKS: usize = 70;
/// The longest side a pose canvas may have: a limb is filled row by row down its length,
/// so a thin canvas of many rows (1 x 16,777,216 pixels) costs a minute to draw.
pub const MOST_CANVAS_SIDE: u32 = 16_384;

/// One person: each part's keypoints, empty for a part not there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersonPose {
    /// [`BODY_KEYPOINTS`] or none.
    pub body: Vec<PosePoint>,
    /// [`HAND_KEYPOINTS`] each, or none.
    pub left_hand: Vec<PosePoint>,
    pub right_hand: Vec<PosePoint>,
    /// At most [`MOST_FACE_LANDMARKS`].
    pub face: Vec<PosePoint>,
}

/// People on a canvas of `width`×`height` pixels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoseSet {
    pub width: u32,
    pub height: u32,
    pub people: Vec<PersonPose>,
}

impl PoseSet {
    /// The control map of `parts` of each person on a black canvas: the skeleton
    /// (`draw_bodypose`), the left then the right hand (`draw_handpose`) and the face
    /// (`draw_facepose`), person by person, positions times the canvas's size in double
    /// precision as the reference computes them from JSON numbers.
    pub fn draw(&self, parts: PoseParts) -> RgbImage {
        let mut canvas = RgbImage::new(self.width, self.height);
        let (w, h) = (f64::from(self.width), f64::from(self.height));
        let scaled = |point: &PosePoint| point.map(|(x, y)| (x * w, y * h));
        let pixel = |point: &PosePoint| scaled(point).map(|(x, y)| (x as i32, y as i32));
        for person in &self.people {
            if parts.body && !person.body.is_empty() {
                let body: Vec<_> = person.body.iter().map(scaled).collect();
                draw_body(&mut canvas, &body);
            }
            if parts.hands {
                for hand in [&person.left_hand, &person.right_hand] {
                    let pixels: Vec<_> = hand.iter().map(pixel).collect();
                    draw_hand_pixels(&mut canvas, &pixels);
                }
            }
            if parts.face {
                let pixels: Vec<_> = person.face.iter().map(pixel).collect();
                draw_face_pixels(&mut canvas, &pixels);
            }
        }
        canvas
    }
}
