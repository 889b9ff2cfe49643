//! OpenPose's face landmarks against controlnet_aux 0.0.10 (`OpenposeDetector` with
//! `include_face`), on fixtures from `tests/fixtures/pose_face_fixtures.py`: the hand
//! and face network on random weights in both stored layouts, the face squares
//! `faceDetect` finds on random bodies, and the whole pipeline (crop, network input,
//! landmarks, drawing with and without the bodies) pixel for pixel with the networks
//! answering known maps; and a stop between face passes ending the run there.

use crate::common;

use common::{
    assert_close, assert_same_map, assert_stops_between_passes, detector_fixtures, random_bodies,
    read_tensors, Checkpoint,
};
use sdxld::engine::preprocess::detector::Detector;
use sdxld::engine::preprocess::openpose::is_body_pose;
use sdxld::engine::preprocess::openpose_cpm::{is_cpm, CpmNetwork};
use sdxld::engine::preprocess::pose::{
    draw_poses, find_faces, network_input, pose_maps, DetectedPeople, PersonDetails, PoseParts,
};
use sdxld::engine::preprocess::pose_face::{face_box, FaceBox};
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
use sdxld::engine::weights::read_shapes;
use tch::{Device, Kind, Tensor};

#[test]
fn the_hand_and_face_network_equals_controlnet_aux() {
    let root = detector_fixtures().join("openpose");
    for (name, maps) in [("face", 71), ("hand", 22)] {
        let path = root.join(format!("cpm_{name}.safetensors"));
        let (shapes, _) = read_shapes(&path).expect("shapes");
        let names = || shapes.iter().map(|(n, _)| n.as_str());
        assert!(
            is_cpm(names()) && !is_body_pose(names()),
            "{name}: told apart"
        );
        let network = CpmNetwork::load(&path, Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(network.maps(), maps, "{name}");
        let io = read_tensors(&root.join(format!("cpm_{name}.io.safetensors")));
        for k in 0..2 {
            let got = network
                .forward(&io[&format!("input.{k}")], &mut || Ok(()))
                .expect("a pass");
            assert_close(
                &format!("{name} input {k}"),
                &got,
                &io[&format!("maps.{k}")],
            );
        }
    }
    let (body, _) = read_shapes(&root.join("wide.safetensors")).expect("shapes");
    assert!(
        !is_cpm(body.iter().map(|(n, _)| n.as_str())),
        "a body network is not one"
    );
}

#[test]
fn face_squares_are_those_face_detect_finds() {
    let path = detector_fixtures().join("openpose/face_boxes.safetensors");
    let mut found = 0;
    for (k, (points, (width, height), want)) in random_bodies(&path).into_iter().enumerate() {
        let got = face_box(&points, width, height);
        let want = (want[0] >= 0).then(|| FaceBox {
            x: want[0] as usize,
            y: want[1] as usize,
            side: want[2] as usize,
        });
        assert_eq!(got, want, "body {k}");
        found += usize::from(got.is_some());
    }
    assert!(found > 50, "{found} squares found");
}

#[test]
fn the_openpose_pipeline_draws_faces_as_controlnet_aux_draws_them() {
    let root = detector_fixtures().join("openpose");
    for case in ["landscape", "square"] {
        let image = image::open(root.join(format!("faces_{case}.png")))
            .expect("image")
            .to_rgb8();
        let io = read_tensors(&root.join(format!("faces_{case}.safetensors")));
        let (_, geometry) = network_input(&image).expect("input");
        let maps = pose_maps(&io["pafs"], &io["heatmaps"], geometry).expect("maps");
        let (candidates, people) = maps.decode();
        // The face network answers each call with the reference's answer to it, once
        // its input is the reference's.
        let (inputs, answers) = (&io["inputs"], &io["maps"]);
        let mut calls = 0;
        let faces = find_faces(&image, &candidates, &people, |input: &Tensor| {
            let k = calls;
            calls += 1;
            assert!(
                k < inputs.size()[0] as usize,
                "{case}: call {k} more than the reference's"
            );
            let want = inputs.narrow(0, k as i64, 1);
            assert_eq!(input.size(), want.size(), "{case}: call {k}'s input size");
            let most = (input - &want).abs().max().double_value(&[]);
            assert_eq!(most, 0.0, "{case}: call {k}'s input");
            Ok(answers.narrow(0, k as i64, 1))
        })
        .expect("faces");
        assert_eq!(
            calls as i64,
            inputs.size()[0],
            "{case}: the reference's face calls"
        );
        assert!(faces.iter().flatten().count() >= 2, "{case}: faces");
        let details: Vec<PersonDetails> = faces
            .into_iter()
            .map(|face| PersonDetails {
                face,
                ..Default::default()
            })
            .collect();
        for (suffix, body) in [("face", true), ("faceonly", false)] {
            let parts = PoseParts {
                body,
                hands: false,
                face: true,
            };
            let map = draw_poses(
                &candidates,
                &people,
                &details,
                parts,
                maps.width,
                maps.height,
            );
            let reference = root.join(format!("faces_{case}_{suffix}_map.png"));
            assert_same_map(&format!("{case} {suffix}"), &map, &reference);
            // Handed out as poses and drawn as a client sends them back: the same map.
            let found = (candidates.clone(), people.clone(), details.clone());
            let size = (maps.width, maps.height);
            let poses = DetectedPeople::new(found.0, found.1, found.2, size).poses();
            let what = format!("{case} {suffix} poses");
            assert_same_map(&what, &poses.draw(parts), &reference);
        }
    }
}

/// The pose map with faces drawn by the random `wide` body and face networks on the
/// service's square case, with `between_passes` run between network passes.
fn full_map(between_passes: Checkpoint) -> sdxld::engine::error::Result<image::RgbImage> {
    let root = detector_fixtures();
    let load = |name: &str| {
        let path = root.join("openpose").join(name);
        Detector::load(&path, Device::Cpu, Kind::Float).expect(name)
    };
    let (body, face, hand) = (
        load("wide.safetensors"),
        load("cpm_face.safetensors"),
        load("cpm_hand.safetensors"),
    );
    let photo = image::open(root.join("images/photo.png")).expect("photo");
    let preprocessing = Preprocessing {
        preprocessor: Preprocessor::OpenPose(PoseParts::FULL),
        detect_resolution: Some(128),
    };
    let networks = Networks {
        detector: Some(&body),
        face: Some(&face),
        hand: Some(&hand),
    };
    preprocessing.run_interruptible(&photo, networks, between_passes)
}

#[test]
fn a_stop_between_face_passes_ends_the_run_before_the_next_pass() {
    // Uninterrupted: the reference's map, after a check before every stage of the body
    // pass and of each face pass (two faces here); stopped at the first or the last, no
    // stage runs after the stop.
    let map = assert_stops_between_passes("openpose_full", 2, full_map);
    let reference = detector_fixtures().join("openpose/service_square_full.png");
    assert_same_map("uninterrupted", &map, &reference);
}
