//! Poses drawn into control maps against controlnet_aux 0.0.10's `draw_poses` (what
//! A1111's render_openpose_json draws a pose JSON with; `pose_render_fixtures.py`):
//! random people on six canvases with every combination of parts the OpenPose
//! preprocessors draw, pixel for pixel, in the engine and through the Preprocess RPC;
//! a keypoint sent as missing drawn as the reference's given-up keypoint is (nowhere);
//! the pose set's refusals by field; ControlNet units and union conditions that draw
//! their poses as the reference's map given as an image does, and their refusals.

use crate::common;

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
    assert_eq!(cases.len(), 40);
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
            edited(&|p| (p.canvas_width, p.canvas_height) = (16_000, 16_000)),
            vec!["poses.canvas_width", "poses.canvas_height"],
        ),
        // Thin canvases within the pixel limit, whose limbs would be filled down
        // millions of rows.
        (
            edited(&|p| (p.canvas_width, p.canvas_height) = (1, 16_000_000)),
            vec!["poses.canvas_height"],
        ),
        (
            edited(&|p| (p.canvas_width, p.canvas_height) = (16_385, 2)),
            vec!["poses.canvas_width"],
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
    // An OpenPose detection at a size with a side over the canvas limit is refused
    // before it runs: its poses could not be drawn again.
    let wide = image::RgbImage::new(16_400, 1_000);
    let status = server
        .preprocess(pb::PreprocessRequest {
            image: png(&wide),
            preprocessor: pb::Preprocessor::Openpose as i32,
            ..Default::default()
        })
        .await
        .expect_err("a map too wide for poses");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["preprocessor_params.detect_resolution"]
    );
    assert!(status.message().contains("16384"), "{}", status.message());
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

/// A generation of two Euler steps at 96x64 with `units`, their control maps returned.
fn unit_spec(units: Vec<pb::ControlNetUnit>) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a dancer".into(),
        seed: Some(7),
        steps: 2,
        width: 96,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        controlnets: units,
        output: Some(pb::OutputOptions {
            return_control_maps: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn png(map: &image::RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    map.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .expect("png");
    bytes
}

fn pixels(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).expect("png").to_rgb8()
}

/// A unit (and a union unit's further condition) given poses makes what the reference's
/// drawn map given as an image makes with no preprocessor and the OpenPose type: the
/// same control maps, the same images (so the OpenPose control type followed from the
/// preprocessor); its PNG parameters record a map given. Bad poses, or an image, another
/// preprocessor or parameters beside them, are refused by field under the unit's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_draw_their_poses_as_the_reference_map_given_as_an_image() {
    let detectors = tempfile::tempdir().expect("tempdir");
    let controlnets = common::controlnet_root(&[("tiny2/union", "union_xl")]);
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &[]).await;
    server.assert_feature("controlnets.poses").await;
    let cases = cases();
    // A square canvas of bodies and a 37x53 one of every part.
    let picked = [cases[0].clone(), cases[14].clone()];
    let resize_modes = [pb::ResizeMode::CropAndResize, pb::ResizeMode::JustResize];
    for (((poses, parts, expected), resize), pixel_perfect) in
        picked.iter().zip(resize_modes).zip([true, false])
    {
        let (kind, _) = preprocessor(parts);
        let posed = pb::ControlNetUnit {
            model: "union_xl".into(),
            poses: Some(wire_poses(&pose_set(poses))),
            preprocessor: kind as i32,
            resize_mode: resize as i32,
            pixel_perfect,
            ..Default::default()
        };
        let given = pb::ControlNetUnit {
            poses: None,
            image: png(expected),
            preprocessor: pb::Preprocessor::None as i32,
            control_type: pb::ControlType::Openpose as i32,
            ..posed.clone()
        };
        let drawn = server
            .images(unit_spec(vec![posed]))
            .await
            .unwrap_or_else(|e| panic!("{parts}: {e}"));
        let reference = server
            .images(unit_spec(vec![given]))
            .await
            .unwrap_or_else(|e| panic!("{parts} given: {e}"));
        let maps = |r: &pb::GenerateImagesResponse| pixels(&r.control_maps[0].data);
        assert!(maps(&drawn) == maps(&reference), "{parts}: control maps");
        let images = |r: &pb::GenerateImagesResponse| pixels(&r.images[0].data);
        assert!(images(&drawn) == images(&reference), "{parts}: images");
        let parameters = common::png_parameters(&drawn.images[0].data);
        assert!(
            parameters.contains("ControlNet 0: \"Module: none, Model: union_xl"),
            "{parameters}"
        );
    }
    // A union unit's further condition drawn from poses, beside an image's condition.
    let (poses, parts, expected) = &picked[1];
    let kind = preprocessor(parts).0 as i32;
    let canny = image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([if (x / 8 + y / 8) % 2 == 0 { 255 } else { 0 }; 3])
    });
    let unit = |more: pb::UnionCondition| pb::ControlNetUnit {
        model: "union_xl".into(),
        image: png(&canny),
        control_type: pb::ControlType::CannyLineart as i32,
        more_conditions: vec![more],
        ..Default::default()
    };
    let posed = pb::UnionCondition {
        poses: Some(wire_poses(&pose_set(poses))),
        preprocessor: kind,
        ..Default::default()
    };
    let given = pb::UnionCondition {
        image: png(expected),
        control_type: pb::ControlType::Openpose as i32,
        ..Default::default()
    };
    let drawn = server
        .images(unit_spec(vec![unit(posed.clone())]))
        .await
        .expect("a posed condition");
    let reference = server
        .images(unit_spec(vec![unit(given)]))
        .await
        .expect("a given condition");
    let map = |r: &pb::GenerateImagesResponse| {
        let map = r.control_maps.iter().find(|m| m.condition_index == 1);
        pixels(&map.expect("the condition's map").data)
    };
    assert!(map(&drawn) == map(&reference), "condition maps");
    let image = |r: &pb::GenerateImagesResponse| pixels(&r.images[0].data);
    assert!(image(&drawn) == image(&reference), "condition images");
    // Refusals, each under the unit's path.
    let set = pose_set(poses);
    let unit_with = |edit: &dyn Fn(&mut pb::ControlNetUnit)| {
        let mut unit = pb::ControlNetUnit {
            model: "union_xl".into(),
            poses: Some(wire_poses(&set)),
            preprocessor: kind,
            ..Default::default()
        };
        edit(&mut unit);
        unit_spec(vec![unit])
    };
    let p = "spec.controlnets[0]";
    let refused: Vec<(pb::GenerationSpec, Vec<String>)> = vec![
        (
            unit_with(&|u| u.image = png(expected)),
            vec![format!("{p}.image")],
        ),
        (
            unit_with(&|u| u.preprocessor = pb::Preprocessor::Canny as i32),
            vec![format!("{p}.preprocessor")],
        ),
        (
            unit_with(&|u| {
                u.preprocessor_params = Some(pb::PreprocessorParams {
                    detect_resolution: 512,
                    ..Default::default()
                })
            }),
            vec![format!("{p}.preprocessor_params")],
        ),
        (
            unit_with(&|u| {
                if let Some(poses) = u.poses.as_mut() {
                    poses.people[0].body[2] = keypoint(f64::NAN, 0.5);
                }
            }),
            vec![format!("{p}.poses.people[0].body[2].x")],
        ),
        (
            unit_with(&|u| {
                u.more_conditions = vec![pb::UnionCondition {
                    poses: Some(pb::Poses {
                        canvas_width: 0,
                        ..wire_poses(&set)
                    }),
                    preprocessor: kind,
                    ..Default::default()
                }]
            }),
            vec![format!("{p}.more_conditions[0].poses.canvas_width")],
        ),
    ];
    for (spec, fields) in refused {
        let status = server.images(spec).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), fields, "{}", status.message());
    }
}
