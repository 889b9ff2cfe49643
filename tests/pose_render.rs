//! Poses drawn into control maps against controlnet_aux 0.0.10's `draw_poses` (what
//! A1111's render_openpose_json draws a pose JSON with; `pose_render_fixtures.py`):
//! random people on six canvases with every combination of parts the OpenPose
//! preprocessors draw, pixel for pixel, in the engine and through the Preprocess RPC;
//! a keypoint sent as missing drawn as the reference's given-up keypoint is (nowhere);
//! the pose set's refusals by field.

mod common;

use common::server::{violated_fields, TestServer};
use sdxld::api::convert::poses as wire_poses;
use sdxld::engine::preprocess::pose_set::{PersonPose, PoseParts, PosePoint, PoseSet};
use sdxld::proto::v1 as pb;
use serde_json::Value;

/// The fixture's cases: (pose set, parts' name, expected map).
fn cases() -> Vec<(Value, String, image::RgbImage)> {
    let root = common::preprocess_fixtures();
    let text = std::fs::read_to_string(root.join("poses.json")).expect("poses.json");
    let cases: Vec<Value> = serde_json::from_str(&text).expect("json");
    cases
        .into_iter()
        .map(|case| {
            let expected = root.join(case["expected"].as_str().expect("expected"));
            let expected = image::open(expected).expect("png").to_rgb8();
            let parts = case["parts"].as_str().expect("parts").to_string();
            (case["poses"].clone(), parts, expected)
        })
        .collect()
}

/// The preprocessor drawing the fixture's `parts`, and those parts.
fn preprocessor(parts: &str) -> (pb::Preprocessor, PoseParts) {
    match parts {
        "body" => (pb::Preprocessor::Openpose, PoseParts::BODY),
        "body_face" => (pb::Preprocessor::OpenposeFace, PoseParts::BODY_AND_FACE),
        "face" => (pb::Preprocessor::OpenposeFaceonly, PoseParts::FACE),
        "body_hands" => (pb::Preprocessor::OpenposeHand, PoseParts::BODY_AND_HANDS),
        "full" => (pb::Preprocessor::OpenposeFull, PoseParts::FULL),
        other => panic!("parts {other}"),
    }
}

/// A part's keypoints: [x, y] or null.
fn points(part: &Value) -> Vec<PosePoint> {
    part.as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            let xy = p.as_array()?;
            Some((xy[0].as_f64()?, xy[1].as_f64()?))
        })
        .collect()
}

fn pose_set(poses: &Value) -> PoseSet {
    let size = |key: &str| poses[key].as_u64().expect("size") as u32;
    let people = poses["people"].as_array().expect("people");
    PoseSet {
        width: size("canvas_width"),
        height: size("canvas_height"),
        people: people
            .iter()
            .map(|p| PersonPose {
                body: points(&p["body"]),
                left_hand: points(&p["left_hand"]),
                right_hand: points(&p["right_hand"]),
                face: points(&p["face"]),
            })
            .collect(),
    }
}

#[test]
fn pose_sets_draw_as_controlnet_aux_draws_them() {
    let cases = cases();
    assert_eq!(cases.len(), 30);
    for (poses, parts, expected) in &cases {
        let map = pose_set(poses).draw(preprocessor(parts).1);
        assert_eq!(map.dimensions(), expected.dimensions(), "{parts}");
        let off = map.pixels().zip(expected.pixels()).filter(|(a, b)| a != b);
        assert_eq!(off.count(), 0, "{}x{} {parts}", map.width(), map.height());
    }
    // The fixtures draw something of every part.
    let lit = |parts: &str| {
        cases
            .iter()
            .filter(|(_, p, _)| p == parts)
            .all(|(poses, _, map)| {
                poses["people"].as_array().is_some_and(Vec::is_empty)
                    || map.pixels().any(|p| p.0 != [0, 0, 0])
            })
    };
    assert!(["body", "face", "body_hands", "full"].into_iter().all(lit));
}

#[test]
fn a_missing_hand_or_face_point_is_drawn_nowhere_as_a_given_up_one() {
    // The reference marks a keypoint it gave up with a negative position; sent as
    // missing, it (and its bones) is not drawn either.
    let mut changed = 0;
    for (poses, parts, expected) in cases() {
        let mut set = pose_set(&poses);
        for person in &mut set.people {
            for part in [
                &mut person.left_hand,
                &mut person.right_hand,
                &mut person.face,
            ] {
                for point in part.iter_mut() {
                    if point.is_some_and(|(x, y)| x < 0.0 || y < 0.0) {
                        *point = None;
                        changed += 1;
                    }
                }
            }
        }
        assert_eq!(set.draw(preprocessor(&parts).1), expected, "{parts}");
    }
    assert!(changed > 10, "{changed} points given up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preprocess_rpc_draws_poses_and_names_each_bad_part() {
    let server = TestServer::start(&[]).await;
    let request = |set: &PoseSet, kind: pb::Preprocessor| pb::PreprocessRequest {
        preprocessor: kind as i32,
        poses: Some(wire_poses(set)),
        ..Default::default()
    };
    for (poses, parts, expected) in cases() {
        let set = pose_set(&poses);
        let reply = server
            .preprocess(request(&set, preprocessor(&parts).0))
            .await
            .unwrap_or_else(|e| panic!("{parts}: {e}"));
        assert_eq!((reply.width, reply.height), expected.dimensions());
        let map = image::load_from_memory(&reply.control_map).expect("png");
        assert_eq!(map.to_rgb8(), expected, "{parts}");
    }
    let (poses, _, _) = cases().into_iter().nth(5).expect("a case");
    let set = pose_set(&poses);
    assert!(!set.people.is_empty());
    let full = pb::Preprocessor::OpenposeFull;
    let edited = |edit: &dyn Fn(&mut pb::Poses)| {
        let mut request = request(&set, full);
        if let Some(poses) = request.poses.as_mut() {
            edit(poses);
        }
        request
    };
    let mut with_image = request(&set, full);
    with_image.image = vec![1, 2, 3];
    let mut with_params = request(&set, full);
    with_params.preprocessor_params = Some(pb::PreprocessorParams {
        detect_resolution: 512,
        ..Default::default()
    });
    let refused: Vec<(pb::PreprocessRequest, Vec<&str>)> = vec![
        (with_image, vec!["image"]),
        (request(&set, pb::Preprocessor::Canny), vec!["preprocessor"]),
        (
            request(&set, pb::Preprocessor::Unspecified),
            vec!["preprocessor"],
        ),
        (with_params, vec!["preprocessor_params"]),
        (edited(&|p| p.canvas_width = 0), vec!["poses.canvas_width"]),
        (
            edited(&|p| (p.canvas_width, p.canvas_height) = (100_000, 100_000)),
            vec!["poses.canvas_width", "poses.canvas_height"],
        ),
        (
            edited(&|p| p.people[0].body[2] = keypoint(f64::NAN, 0.5)),
            vec!["poses.people[0].body[2].x"],
        ),
        (
            edited(&|p| p.people[0].body[3] = keypoint(0.5, f64::INFINITY)),
            vec!["poses.people[0].body[3].y"],
        ),
        (
            edited(&|p| p.people[0].body[4] = keypoint(-1.5, 2.5)),
            vec!["poses.people[0].body[4].x", "poses.people[0].body[4].y"],
        ),
        (
            edited(&|p| {
                p.people[0].body.pop();
                p.people[0].left_hand = vec![keypoint(0.5, 0.5); 5];
                p.people[0].face = vec![keypoint(0.5, 0.5); 71];
            }),
            vec![
                "poses.people[0].body",
                "poses.people[0].left_hand",
                "poses.people[0].face",
            ],
        ),
        (
            edited(&|p| p.people = vec![pb::PersonPose::default(); 101]),
            vec!["poses.people"],
        ),
    ];
    for (request, fields) in refused {
        let status = server.preprocess(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), fields, "{}", status.message());
    }
    // The server serves on: a hundred empty people draw a black canvas.
    let reply = server
        .preprocess(edited(&|p| p.people = vec![pb::PersonPose::default(); 100]))
        .await
        .expect("empty people");
    let map = image::load_from_memory(&reply.control_map)
        .expect("png")
        .to_rgb8();
    assert!(map.pixels().all(|p| p.0 == [0, 0, 0]));
}

fn keypoint(x: f64, y: f64) -> pb::PoseKeypoint {
    pb::PoseKeypoint {
        x,
        y,
        missing: false,
    }
}
