//! controlnet_aux's OpenPose preprocessor with the body model (`OpenposeDetector` as its
//! defaults run it: body on, hands and face off): the image (as BGR) scaled to the
//! 368-pixel box at half scale and padded to multiples of 8 with grey, the network's
//! maps enlarged ×8, cropped and resized back to the image with OpenCV's filters, the
//! people decoded from them, and their skeletons drawn as `draw_bodypose` draws them;
//! with `include_face`, each face's landmarks too (`pose_face`).

use std::path::Path;

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::openpose::{bgr_input, plane_back, smart_resize, BodyPose};
use crate::engine::preprocess::openpose_cpm::CpmNetwork;
use crate::engine::preprocess::pose_decode::{decode, Candidate, Person, PoseMaps};
use crate::engine::preprocess::pose_draw::{draw_body, float32_pixel};
use crate::engine::preprocess::pose_face::{
    draw_face, face_box, face_landmarks, normalised, FaceLandmarks,
};
use crate::engine::preprocess::pose_hand::{draw_hand, hand_boxes, hand_keypoints, HandKeypoints};
pub use crate::engine::preprocess::pose_set::PoseParts;
use crate::engine::preprocess::pose_set::{PersonPose, PosePoint, PoseSet};

/// The network's input box (pixels of the image's height) and the one scale searched.
const BOX_SIZE: f64 = 368.0;
const SCALE: f64 = 0.5;
/// The network's output stride and the grey the input is padded with.
const STRIDE: usize = 8;
const PAD_VALUE: u8 = 128;

/// The size (width, height) of the network's input for a `width`×`height` image: the
/// image scaled to a height of 184 (before its padding to multiples of 8).
pub fn network_size(width: u32, height: u32) -> (usize, usize) {
    let scale = SCALE * BOX_SIZE / f64::from(height.max(1));
    (
        (f64::from(width) * scale) as usize,
        (f64::from(height) * scale) as usize,
    )
}

/// The face and hand networks a pose map with those parts runs beside the body's.
#[derive(Clone, Copy, Default)]
pub struct PartNetworks<'a> {
    pub face: Option<&'a CpmNetwork>,
    pub hand: Option<&'a CpmNetwork>,
}

/// What was found of a person beyond the body, as the reference draws it (positions
/// normalised by the image's size): the face's landmarks and each hand's keypoints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersonDetails {
    pub face: Option<FaceLandmarks>,
    pub left_hand: Option<HandKeypoints>,
    pub right_hand: Option<HandKeypoints>,
}

/// The OpenPose preprocessor: the body network (the face network, a detector file of
/// its own, is handed in where faces are drawn).
pub struct OpenPoseDetector {
    network: BodyPose,
}

/// Sizes (width, height) along the way: the image, the scaled image, the padded input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoseGeometry {
    pub image: (usize, usize),
    pub scaled: (usize, usize),
    pub padded: (usize, usize),
}

impl OpenPoseDetector {
    /// Loads the body network at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        Ok(Self {
            network: BodyPose::load(path, device, kind)?,
        })
    }

    /// The body pose map of an RGB image at its own size: the skeletons on black.
    pub fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        self.detect_parts(image, PoseParts::BODY, PartNetworks::default(), &mut || {
            Ok(())
        })
    }

    /// The pose map of `parts` of each person found in an RGB image, at its size; the
    /// face and hand networks are needed where faces and hands are drawn. `between_passes`
    /// runs before each face and hand network pass (a crowd makes many) and stops the run
    /// with its error.
    pub fn detect_parts(
        &self,
        image: &RgbImage,
        parts: PoseParts,
        networks: PartNetworks,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<RgbImage> {
        Ok(self
            .detect_people(image, parts, networks, between_passes)?
            .draw(parts))
    }

    /// The people found in an RGB image, with the faces and hands `parts` asks for, as
    /// [`OpenPoseDetector::detect_parts`] finds them before drawing.
    pub fn detect_people(
        &self,
        image: &RgbImage,
        parts: PoseParts,
        networks: PartNetworks,
        between_passes: &mut dyn FnMut() -> Result<()>,
    ) -> Result<DetectedPeople> {
        let (input, geometry) = network_input(image)?;
        let (affinities, heatmaps) = self.network.forward(&input, between_passes)?;
        let maps = pose_maps(&affinities, &heatmaps, geometry)?;
        let (candidates, people) = maps.decode();
        let mut details = vec![PersonDetails::default(); people.len()];
        let missing = |what: &str| {
            EngineError::Internal(format!(
                "{what} asked of a pose detector without their network"
            ))
        };
        // Every face and hand pass goes through here, its stages checked as the body's.
        let mut pass =
            |network: &CpmNetwork, input: &Tensor| network.forward(input, between_passes);
        if parts.hands {
            let hand = networks.hand.ok_or_else(|| missing("hands"))?;
            let hands = find_hands(image, &candidates, &people, |input| pass(hand, input))?;
            for (person, [left, right]) in details.iter_mut().zip(hands) {
                (person.left_hand, person.right_hand) = (left, right);
            }
        }
        if parts.face {
            let face = networks.face.ok_or_else(|| missing("faces"))?;
            let faces = find_faces(image, &candidates, &people, |input| pass(face, input))?;
            for (person, face) in details.iter_mut().zip(faces) {
                person.face = face;
            }
        }
        let size = (maps.width, maps.height);
        Ok(DetectedPeople::new(candidates, people, details, size))
    }
}

/// What a pose detection found on a `width`×`height` image: the body parts, the people
/// they make, and what was found of each beyond the body.
pub struct DetectedPeople {
    candidates: Vec<Candidate>,
    people: Vec<Person>,
    details: Vec<PersonDetails>,
    width: usize,
    height: usize,
}

impl DetectedPeople {
    /// What was found: the body parts, the people they make and each person's details,
    /// on a `width`×`height` image.
    pub fn new(
        candidates: Vec<Candidate>,
        people: Vec<Person>,
        details: Vec<PersonDetails>,
        (width, height): (usize, usize),
    ) -> Self {
        Self {
            candidates,
            people,
            details,
            width,
            height,
        }
    }

    /// The map of `parts`, as the reference draws its detections.
    pub fn draw(&self, parts: PoseParts) -> RgbImage {
        let (people, details) = (&self.people, &self.details);
        draw_poses(
            &self.candidates,
            people,
            details,
            parts,
            self.width,
            self.height,
        )
    }

    /// The people as a pose set on the image's canvas, normalised by its size: body
    /// keypoints as the reference normalises them, hand and face points at the centre of
    /// the pixel they are drawn at (the reference's float32 positions, drawn again in
    /// double precision, would land a pixel off at times), those it gave up missing. So
    /// drawn, they give the detection's map again.
    pub fn poses(&self) -> PoseSet {
        let (w, h) = (self.width as f64, self.height as f64);
        let size = (self.width as u32, self.height as u32);
        let found = |points: &Option<Vec<(f32, f32)>>| -> Vec<PosePoint> {
            let point = |&(x, y): &(f32, f32)| {
                let (px, py) = float32_pixel((x, y), size);
                let centre = ((f64::from(px) + 0.5) / w, (f64::from(py) + 0.5) / h);
                (x >= 0.0 && y >= 0.0).then_some(centre)
            };
            points.iter().flatten().map(point).collect()
        };
        let people = self.people.iter().enumerate().map(|(i, person)| {
            let details = self.details.get(i).cloned().unwrap_or_default();
            PersonPose {
                body: keypoints(&self.candidates, person)
                    .into_iter()
                    .map(|p| p.map(|(x, y)| (x / w, y / h)))
                    .collect(),
                left_hand: found(&details.left_hand),
                right_hand: found(&details.right_hand),
                face: found(&details.face),
            }
        });
        PoseSet {
            width: self.width as u32,
            height: self.height as u32,
            people: people.collect(),
        }
    }
}

/// A person's 18 keypoints in image pixels (`None`: not found).
fn keypoints(candidates: &[Candidate], person: &Person) -> Vec<Option<(f64, f64)>> {
    person
        .parts
        .iter()
        .map(|&index| {
            (index >= 0.0)
                .then(|| candidates.get(index as usize))
                .flatten()
                .map(|c| (c.x, c.y))
        })
        .collect()
}

/// Each person's face landmarks (`detect_face`, `face_maps` running the face network),
/// normalised as the reference draws them: `None` where no square is found around the
/// head or no map has a landmark.
pub fn find_faces(
    image: &RgbImage,
    candidates: &[Candidate],
    people: &[Person],
    mut face_maps: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Option<FaceLandmarks>>> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    people
        .iter()
        .map(|person| {
            let Some(square) = face_box(&keypoints(candidates, person), width, height) else {
                return Ok(None);
            };
            let landmarks = face_landmarks(image, square, &mut face_maps)?;
            Ok((!landmarks.is_empty())
                .then(|| normalised(&landmarks, (square.x, square.y), width, height)))
        })
        .collect()
}

/// Each person's hands' keypoints (`detect_hands`, `hand_maps` running the hand network),
/// left then right, normalised as the reference draws them: `None` for a hand whose
/// square is not found.
pub fn find_hands(
    image: &RgbImage,
    candidates: &[Candidate],
    people: &[Person],
    mut hand_maps: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<[Option<HandKeypoints>; 2]>> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    people
        .iter()
        .map(|person| {
            let mut hands = [None, None];
            for square in hand_boxes(&keypoints(candidates, person), width, height) {
                let found = hand_keypoints(image, square, &mut hand_maps)?;
                let normal = normalised(&found, (square.x, square.y), width, height);
                hands[usize::from(!square.left)] = Some(normal);
            }
            Ok(hands)
        })
        .collect()
}

/// The network's input [1, 3, h, w] (BGR, value / 256 - 0.5) and the sizes it came from.
pub fn network_input(image: &RgbImage) -> Result<(Tensor, PoseGeometry)> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let scaled = network_size(image.width(), image.height());
    if scaled.0 == 0 || scaled.1 == 0 {
        return Err(EngineError::InvalidRequest(format!(
            "a {width}x{height} image is too narrow for pose detection (it scales to {}x{})",
            scaled.0, scaled.1
        )));
    }
    let resized = smart_resize(image, scaled);
    let padded = (
        scaled.0.div_ceil(STRIDE) * STRIDE,
        scaled.1.div_ceil(STRIDE) * STRIDE,
    );
    let tensor = bgr_input(&resized, padded, PAD_VALUE);
    let geometry = PoseGeometry {
        image: (width, height),
        scaled,
        padded,
    };
    Ok((tensor, geometry))
}

/// Heatmaps and affinity fields at the image's size, channel-last in double precision.
pub struct PoseMapsOwned {
    pub heatmaps: Vec<f64>,
    pub affinities: Vec<f64>,
    /// The image's size.
    pub width: usize,
    pub height: usize,
}

impl PoseMapsOwned {
    /// The body parts found in the maps and the people they make.
    pub fn decode(&self) -> (Vec<Candidate>, Vec<Person>) {
        decode(&PoseMaps {
            width: self.width,
            height: self.height,
            heatmaps: &self.heatmaps,
            affinities: &self.affinities,
        })
    }
}

/// The network's outputs ([1, C, h/8, w/8]) brought to the image as `Body.__call__`
/// does: each channel enlarged ×8 with Lanczos4, the padding cropped, resized to the
/// image.
pub fn pose_maps(
    affinities: &Tensor,
    heatmaps: &Tensor,
    geometry: PoseGeometry,
) -> Result<PoseMapsOwned> {
    let (width, height) = geometry.image;
    Ok(PoseMapsOwned {
        heatmaps: channels_to_image(heatmaps, geometry)?,
        affinities: channels_to_image(affinities, geometry)?,
        width,
        height,
    })
}

fn channels_to_image(maps: &Tensor, geometry: PoseGeometry) -> Result<Vec<f64>> {
    let size = maps.size();
    let (pw, ph) = geometry.padded;
    let (gw, gh) = (pw / STRIDE, ph / STRIDE);
    if size.len() != 4 || size[2] as usize != gh || size[3] as usize != gw {
        return Err(EngineError::Internal(format!(
            "pose maps of shape {size:?} for a {pw}x{ph} input"
        )));
    }
    let channels = size[1] as usize;
    let values = Vec::<f32>::try_from(maps.to_kind(Kind::Float).contiguous().view(-1))?;
    let (sw, sh) = geometry.scaled;
    let (width, height) = geometry.image;
    let mut out = vec![0f64; width * height * channels];
    for (c, plane) in values.chunks_exact(gw * gh).enumerate() {
        let fitted = plane_back(plane, (gw, gh), (pw, ph), (sw, sh), (width, height));
        for (i, value) in fitted.into_iter().enumerate() {
            out[i * channels + c] = f64::from(value);
        }
    }
    Ok(out)
}

/// The people's skeletons on a black `width`×`height` canvas, as `draw_bodypose` draws
/// them from keypoints normalised by the image's size.
pub fn draw_people(
    candidates: &[Candidate],
    people: &[Person],
    width: usize,
    height: usize,
) -> RgbImage {
    draw_poses(candidates, people, &[], PoseParts::BODY, width, height)
}

/// `draw_poses`: person by person, of the parts asked for, the skeleton
/// (`draw_bodypose`), the left then the right hand (`draw_handpose`) and the face's
/// landmarks (`draw_facepose`), from `details` by person.
pub fn draw_poses(
    candidates: &[Candidate],
    people: &[Person],
    details: &[PersonDetails],
    parts: PoseParts,
    width: usize,
    height: usize,
) -> RgbImage {
    let mut canvas = RgbImage::new(width as u32, height as u32);
    for (i, person) in people.iter().enumerate() {
        if parts.body {
            // Normalised and scaled back, as the reference's round trip rounds them.
            let (w, h) = (width as f64, height as f64);
            let scaled: Vec<_> = keypoints(candidates, person)
                .into_iter()
                .map(|p| p.map(|(x, y)| (x / w * w, y / h * h)))
                .collect();
            draw_body(&mut canvas, &scaled);
        }
        let Some(found) = details.get(i) else {
            continue;
        };
        if parts.hands {
            for hand in [&found.left_hand, &found.right_hand].into_iter().flatten() {
                draw_hand(&mut canvas, hand);
            }
        }
        if let Some(face) = found.face.as_ref().filter(|_| parts.face) {
            draw_face(&mut canvas, face);
        }
    }
    canvas
}
