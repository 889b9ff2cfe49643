//! OpenPose's hand keypoints against controlnet_aux 0.0.10 (`OpenposeDetector` with
//! `include_hand`), on fixtures from `tests/fixtures/pose_hand_fixtures.py`: the hand
//! squares `handDetect` finds on random bodies, and the whole pipeline (crops, the four
//! scales' network inputs, the averaged maps' regions and peaks, thick bones and dots,
//! with and without faces) pixel for pixel with the networks answering known maps.

use crate::common;

use std::collections::HashMap;

use common::{assert_same_map, detector_fixtures, random_bodies, read_tensors};
use sdxld::engine::preprocess::pose::{
    draw_poses, find_faces, find_hands, network_input, pose_maps, DetectedPeople, PersonDetails,
    PoseParts,
};
use sdxld::engine::preprocess::pose_hand::{hand_boxes, HandBox};
use tch::{Kind, Tensor};

#[test]
fn hand_squares_are_those_hand_detect_finds() {
    let path = detector_fixtures().join("openpose/hand_boxes.safetensors");
    let (mut left, mut right) = (0, 0);
    for (k, (points, (width, height), want)) in random_bodies(&path).into_iter().enumerate() {
        let got = hand_boxes(&points, width, height);
        let want: Vec<HandBox> = want
            .chunks(4)
            .filter(|b| b[0] >= 0)
            .map(|b| HandBox {
                x: b[0] as usize,
                y: b[1] as usize,
                side: b[2] as usize,
                left: b[3] == 1,
            })
            .collect();
        assert_eq!(got, want, "body {k}");
        left += got.iter().filter(|b| b.left).count();
        right += got.iter().filter(|b| !b.left).count();
    }
    assert!(
        left > 50 && right > 20,
        "{left} left and {right} right hands"
    );
}

/// The 8-bit BGR image an OpenPose network input [1, 3, s, s] (value / 256 - 0.5) came
/// from, [s, s, 3], as the fixtures store it.
fn input_pixels(input: &Tensor) -> Tensor {
    ((input.get(0).permute([1, 2, 0]) + 0.5) * 256.0)
        .round()
        .to_kind(Kind::Uint8)
}

/// The pipeline's people, faces and hands for one case, each network answering with the
/// reference's answer once its input is the reference's.
fn case_details(
    case: &str,
    image: &image::RgbImage,
    io: &HashMap<String, Tensor>,
) -> (
    Vec<sdxld::engine::preprocess::pose_decode::Candidate>,
    Vec<sdxld::engine::preprocess::pose_decode::Person>,
    Vec<PersonDetails>,
    (usize, usize),
) {
    let (_, geometry) = network_input(image).expect("input");
    let maps = pose_maps(&io["pafs"], &io["heatmaps"], geometry).expect("maps");
    let (candidates, people) = maps.decode();
    let mut calls = 0;
    let hands = find_hands(image, &candidates, &people, |input: &Tensor| {
        let k = calls;
        calls += 1;
        let want = io
            .get(&format!("hand_input.{k}"))
            .unwrap_or_else(|| panic!("{case}: hand call {k} more than the reference's"));
        let got = input_pixels(input);
        assert_eq!(
            got.size(),
            want.size(),
            "{case}: hand call {k}'s input size"
        );
        let differing = got.ne_tensor(want).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differing, 0, "{case}: hand call {k}'s input");
        Ok(io[&format!("hand_maps.{k}")].shallow_clone())
    })
    .expect("hands");
    assert!(
        io.contains_key(&format!("hand_input.{}", calls - 1))
            && !io.contains_key(&format!("hand_input.{calls}")),
        "{case}: {calls} hand calls, unlike the reference's"
    );
    let (face_inputs, face_maps) = (&io["face_inputs"], &io["face_maps"]);
    let mut face_calls = 0;
    let faces = find_faces(image, &candidates, &people, |input: &Tensor| {
        let k = face_calls;
        face_calls += 1;
        let want = face_inputs.narrow(0, k, 1);
        let most = (input - &want).abs().max().double_value(&[]);
        assert_eq!(most, 0.0, "{case}: face call {k}'s input");
        Ok(face_maps.narrow(0, k, 1))
    })
    .expect("faces");
    assert_eq!(face_calls, face_inputs.size()[0], "{case}: face calls");
    let details: Vec<PersonDetails> = hands
        .into_iter()
        .zip(faces)
        .map(|([left_hand, right_hand], face)| PersonDetails {
            face,
            left_hand,
            right_hand,
        })
        .collect();
    let found = details
        .iter()
        .map(|d| usize::from(d.left_hand.is_some()) + usize::from(d.right_hand.is_some()))
        .sum::<usize>();
    assert!(found >= 4, "{case}: {found} hands");
    (candidates, people, details, (maps.width, maps.height))
}

#[test]
fn the_openpose_pipeline_draws_hands_as_controlnet_aux_draws_them() {
    let root = detector_fixtures().join("openpose");
    for case in ["landscape", "square"] {
        let image = image::open(root.join(format!("hands_{case}.png")))
            .expect("image")
            .to_rgb8();
        let io = read_tensors(&root.join(format!("hands_{case}.safetensors")));
        let (candidates, people, details, (width, height)) = case_details(case, &image, &io);
        for (suffix, parts) in [
            ("hand", PoseParts::BODY_AND_HANDS),
            ("full", PoseParts::FULL),
        ] {
            let map = draw_poses(&candidates, &people, &details, parts, width, height);
            let reference = root.join(format!("hands_{case}_{suffix}_map.png"));
            assert_same_map(&format!("{case} {suffix}"), &map, &reference);
            // The people as the Preprocess RPC hands them out, drawn as a client sends
            // them back: the same map.
            let found = (candidates.clone(), people.clone(), details.clone());
            let poses = DetectedPeople::new(found.0, found.1, found.2, (width, height)).poses();
            let hands = poses
                .people
                .iter()
                .map(|p| p.left_hand.len() + p.right_hand.len());
            assert!(hands.sum::<usize>() >= 4 * 21, "{case}: hands handed out");
            let what = format!("{case} {suffix} poses");
            assert_same_map(&what, &poses.draw(parts), &reference);
        }
    }
}
