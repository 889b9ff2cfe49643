//! The OpenPose face and hand preprocessors over gRPC (`PREPROCESSOR_OPENPOSE_FACE`,
//! `_FACEONLY`, `_HAND`, `_FULL`): the body, face and hand networks, all random, found as
//! the configured defaults, their maps equal to controlnet_aux's `OpenposeDetector`
//! with `include_face` and `include_hand` (fixtures from
//! `tests/fixtures/pose_face_fixtures.py`), through the Preprocess RPC and a ControlNet
//! unit; a face or hand network missing or misplaced is refused naming its key or field.
//! The random body network finds no whole arm, so no hand is drawn here; the hands'
//! drawing is proved in `tests/pose_hands.rs`.

use crate::common;

use common::detector_fixtures;
use common::server::{error_reason, TestServer};
use sdxld::proto::v1 as pb;
use tonic::Code;

/// The reference maps: (case, image, detect resolution).
const CASES: [(&str, &str, u32); 2] = [
    ("square", "photo.png", 128),
    ("portrait", "photo_odd.png", 128),
];

/// A preprocessor root with the random `wide` body network and the face and hand
/// networks under the defaults' names, and the face network under another name.
fn detector_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let openpose = detector_fixtures().join("openpose");
    for (from, to) in [
        ("wide.safetensors", "body_pose_model.safetensors"),
        ("cpm_face.safetensors", "facenet.safetensors"),
        ("cpm_face.safetensors", "my_face.safetensors"),
        ("cpm_hand.safetensors", "hand_pose_model.safetensors"),
    ] {
        std::fs::copy(openpose.join(from), dir.path().join(to)).expect("copy");
    }
    dir
}

/// A ControlNet root with the tiny2 union model.
fn controlnet_root() -> tempfile::TempDir {
    common::controlnet_root(&[("tiny2/union", "union_xl")])
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(detector_fixtures().join("images").join(name)).expect("image")
}

fn params(resolution: u32, model: &str) -> Option<pb::PreprocessorParams> {
    Some(pb::PreprocessorParams {
        detect_resolution: resolution,
        model: model.into(),
        ..Default::default()
    })
}

fn request(preprocessor: pb::Preprocessor, model: &str) -> pb::PreprocessRequest {
    pb::PreprocessRequest {
        image: image("photo.png"),
        preprocessor: preprocessor as i32,
        preprocessor_params: params(128, model),
        poses: None,
    }
}

/// Asserts that a PNG is the reference map pixel for pixel.
fn assert_reference(what: &str, png: &[u8], reference: &str) {
    let got = image::load_from_memory(png).expect("png").to_rgb8();
    let path = detector_fixtures().join("openpose").join(reference);
    common::assert_same_map(what, &got, &path);
}

/// Pixels of a PNG map that are landmark white.
fn white_pixels(png: &[u8]) -> usize {
    let map = image::load_from_memory(png).expect("png").to_rgb8();
    map.pixels().filter(|p| p.0 == [255, 255, 255]).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn face_and_hand_maps_equal_controlnet_aux_through_preprocess_and_a_unit() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &[]).await;
    for (case, file, resolution) in CASES {
        for (preprocessor, parts) in [
            (pb::Preprocessor::OpenposeFace, "face"),
            (pb::Preprocessor::OpenposeFaceonly, "faceonly"),
            (pb::Preprocessor::OpenposeHand, "hand"),
            (pb::Preprocessor::OpenposeFull, "full"),
        ] {
            let what = format!("{case} {parts}");
            let map = server
                .preprocess(pb::PreprocessRequest {
                    image: image(file),
                    preprocessor: preprocessor as i32,
                    preprocessor_params: params(resolution, ""),
                    poses: None,
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_reference(
                &what,
                &map.control_map,
                &format!("service_{case}_{parts}.png"),
            );
            let landmarks = white_pixels(&map.control_map);
            assert_eq!(
                landmarks > 100,
                parts != "hand",
                "{what}: {landmarks} landmark pixels"
            );
            // The people found, on the map's canvas, faces where they are looked for;
            // sent back with the same preprocessor they draw the same map.
            let poses = map.poses.clone().expect("poses");
            assert_eq!(
                (poses.canvas_width, poses.canvas_height),
                (map.width, map.height)
            );
            assert!(poses.people.iter().all(|p| p.body.len() == 18), "{what}");
            let faces = poses.people.iter().filter(|p| !p.face.is_empty()).count();
            assert_eq!(faces > 0, parts != "hand", "{what}: {faces} faces");
            let drawn = server
                .preprocess(pb::PreprocessRequest {
                    preprocessor: preprocessor as i32,
                    poses: Some(poses),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{what} drawn back: {e}"));
            let decoded = |png: &[u8]| image::load_from_memory(png).expect("png").to_rgb8();
            let (again, first) = (decoded(&drawn.control_map), decoded(&map.control_map));
            assert!(again == first, "{what}: the poses drawn back differ");
        }
    }
    // The body alone draws no landmark, so the white dots are the face network's; its
    // poses hold no face or hand.
    let body = server
        .preprocess(request(pb::Preprocessor::Openpose, ""))
        .await
        .expect("body");
    assert_eq!(white_pixels(&body.control_map), 0);
    let people = body.poses.expect("poses").people;
    assert!(!people.is_empty());
    let parts = |p: &pb::PersonPose| p.face.len() + p.left_hand.len() + p.right_hand.len();
    assert!(people.iter().all(|p| parts(p) == 0));
    // A unit draws the same map, records its module and reports both networks.
    let response = server
        .images(pb::GenerationSpec {
            steps: 2,
            width: 128,
            height: 128,
            scheduler: pb::Scheduler::Euler as i32,
            controlnets: vec![pb::ControlNetUnit {
                model: "union_xl".into(),
                image: image("photo.png"),
                preprocessor: pb::Preprocessor::OpenposeFull as i32,
                preprocessor_params: params(128, ""),
                ..Default::default()
            }],
            output: Some(pb::OutputOptions {
                return_control_maps: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("a unit with faces");
    assert_reference(
        "unit",
        &response.control_maps[0].data,
        "service_square_full.png",
    );
    let parameters = common::png_parameters(&response.images[0].data);
    assert!(
        parameters.contains("Module: openpose_full, Processor Res: 128,"),
        "{parameters}"
    );
    let completed = response.completed.expect("completed");
    let detectors: Vec<_> = completed
        .models
        .iter()
        .filter(|m| m.kind == pb::ModelKind::Preprocessor as i32)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(detectors, ["body_pose_model", "facenet", "hand_pose_model"]);
    // Both networks stayed in the cache, listed with what they are.
    let listed = server.list_models(pb::ModelKind::Preprocessor).await;
    let network = |name: &str| {
        let model = listed
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} listed"));
        let info = model.preprocessor.clone().expect("preprocessor info");
        (model.resident, info.network, info.error)
    };
    assert_eq!(network("facenet"), (true, "facenet".into(), String::new()));
    assert_eq!(
        network("body_pose_model"),
        (true, "openpose".into(), String::new())
    );
    assert_eq!(
        network("hand_pose_model"),
        (true, "handpose".into(), String::new())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_misplaced_face_or_hand_network_is_refused_by_name() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let absent = [
        ("SDXLD__PREPROCESSING__OPENPOSE_FACE_MODEL", "absent"),
        ("SDXLD__PREPROCESSING__OPENPOSE_HAND_MODEL", "no_hands"),
    ];
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &absent).await;
    // The face network is looked for first where both are drawn.
    for (preprocessor, key, file) in [
        (pb::Preprocessor::OpenposeFace, "face", "absent"),
        (pb::Preprocessor::OpenposeFaceonly, "face", "absent"),
        (pb::Preprocessor::OpenposeHand, "hand", "no_hands"),
        (pb::Preprocessor::OpenposeFull, "face", "absent"),
    ] {
        let status = server
            .preprocess(request(preprocessor, ""))
            .await
            .expect_err("no face or hand network");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let (why, metadata) = error_reason(&status);
        assert_eq!(why, "PREPROCESSOR_MODEL_MISSING");
        assert_eq!(
            metadata["config_key"],
            format!("preprocessing.openpose_{key}_model")
        );
        assert_eq!(metadata["expected_file"], format!("{file}.safetensors"));
    }
    // The body alone still runs; the capabilities say which is ready and why not.
    server
        .preprocess(request(pb::Preprocessor::Openpose, ""))
        .await
        .expect("the body alone");
    let support = server.capabilities().await.preprocessor_support;
    let ready = |kind: pb::Preprocessor| {
        let entry = support
            .iter()
            .find(|s| s.preprocessor == kind as i32)
            .unwrap_or_else(|| panic!("{kind:?} listed"));
        (entry.ready, entry.reason.clone())
    };
    assert_eq!(ready(pb::Preprocessor::Openpose), (true, String::new()));
    for (kind, key) in [
        (pb::Preprocessor::OpenposeFace, "face"),
        (pb::Preprocessor::OpenposeHand, "hand"),
    ] {
        let (is_ready, why) = ready(kind);
        let key = format!("preprocessing.openpose_{key}_model");
        assert!(!is_ready && why.contains(&key), "{kind:?}: {why}");
    }
    // A unit of a generation is refused the same way before it is admitted.
    let unit = pb::GenerationSpec {
        steps: 2,
        width: 64,
        height: 64,
        controlnets: vec![pb::ControlNetUnit {
            model: "union_xl".into(),
            image: image("photo.png"),
            preprocessor: pb::Preprocessor::OpenposeFaceonly as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = server.images(unit).await.expect_err("no face network");
    assert_eq!(
        error_reason(&status).1["config_key"],
        "preprocessing.openpose_face_model"
    );
    // A face file named as the body network is the request's mistake; a face default
    // that holds the body network is the operator's.
    let status = server
        .preprocess(request(pb::Preprocessor::Openpose, "my_face"))
        .await
        .expect_err("a face file as the body");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        common::server::violated_fields(&status),
        ["preprocessor_params.model"]
    );
    assert!(status.message().contains("facenet"), "{}", status.message());
    drop(server);
    // The face and hand files swapped in the configuration.
    let swapped = [
        (
            "SDXLD__PREPROCESSING__OPENPOSE_FACE_MODEL",
            "hand_pose_model",
        ),
        ("SDXLD__PREPROCESSING__OPENPOSE_HAND_MODEL", "facenet"),
    ];
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &swapped).await;
    for (kind, key) in [
        (pb::Preprocessor::OpenposeFace, "face"),
        (pb::Preprocessor::OpenposeHand, "hand"),
    ] {
        let status = server
            .preprocess(request(kind, ""))
            .await
            .expect_err("a swapped network");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(error_reason(&status).0, "PREPROCESSOR_MODEL_MISMATCH");
        let key = format!("preprocessing.openpose_{key}_model");
        assert!(status.message().contains(&key), "{}", status.message());
    }
}

/// The face and hand preprocessors on images of a few pixels at their own size run, their map
/// that size, or are refused naming `detect_resolution` (a pose network input no pixel
/// wide); none fails inside a network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_images_run_or_name_the_detect_resolution() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &[]).await;
    let mut ran = 0;
    for (width, height) in [(1, 1), (2, 9), (5, 5), (40, 3), (3, 40), (23, 21)] {
        let pixels = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 37 % 256) as u8, (y * 91 % 256) as u8, 128])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(pixels)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        for preprocessor in [
            pb::Preprocessor::OpenposeFace,
            pb::Preprocessor::OpenposeFaceonly,
            pb::Preprocessor::OpenposeHand,
            pb::Preprocessor::OpenposeFull,
        ] {
            let what = format!("{preprocessor:?} at {width}x{height}");
            let request = pb::PreprocessRequest {
                image: png.clone(),
                preprocessor: preprocessor as i32,
                preprocessor_params: Some(pb::PreprocessorParams::default()),
                poses: None,
            };
            match server.preprocess(request).await {
                Ok(reply) => {
                    let map = image::load_from_memory(&reply.control_map).expect("png");
                    assert_eq!((map.width(), map.height()), (width, height), "{what}");
                    ran += 1;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
                    assert_eq!(
                        common::server::violated_fields(&status),
                        ["preprocessor_params.detect_resolution"],
                        "{what}"
                    );
                }
            }
        }
    }
    assert!(ran >= 16, "{ran} ran");
}

/// Face and hand networks named in the request (`face_model`, `hand_model`) are used in
/// place of the configured defaults, absent here; a name for a part the preprocessor does
/// not draw, a file of another network and an unknown name are refused by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn face_and_hand_networks_named_in_the_request_serve_or_are_refused_by_field() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let absent = [
        ("SDXLD__PREPROCESSING__OPENPOSE_FACE_MODEL", "absent"),
        ("SDXLD__PREPROCESSING__OPENPOSE_HAND_MODEL", "no_hands"),
    ];
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &absent).await;
    let named = |preprocessor: pb::Preprocessor, face: &str, hand: &str| pb::PreprocessRequest {
        preprocessor_params: Some(pb::PreprocessorParams {
            face_model: face.into(),
            hand_model: hand.into(),
            ..params(128, "").unwrap_or_default()
        }),
        ..request(preprocessor, "")
    };
    let full = server
        .preprocess(named(
            pb::Preprocessor::OpenposeFull,
            "my_face",
            "hand_pose_model",
        ))
        .await
        .expect("the named networks");
    assert_reference("named", &full.control_map, "service_square_full.png");
    let face = server
        .preprocess(named(pb::Preprocessor::OpenposeFaceonly, "my_face", ""))
        .await
        .expect("the named face network");
    assert_reference(
        "named face",
        &face.control_map,
        "service_square_faceonly.png",
    );
    let (face_field, hand_field) = (
        "preprocessor_params.face_model",
        "preprocessor_params.hand_model",
    );
    let invalid = [
        (
            named(pb::Preprocessor::Openpose, "my_face", ""),
            vec![face_field],
        ),
        (
            named(pb::Preprocessor::OpenposeFace, "my_face", "hand_pose_model"),
            vec![hand_field],
        ),
        (
            named(pb::Preprocessor::OpenposeFull, "hand_pose_model", "my_face"),
            vec![face_field, hand_field],
        ),
        (
            named(pb::Preprocessor::Canny, "", "hand_pose_model"),
            vec![hand_field],
        ),
    ];
    for (request, fields) in invalid {
        let status = server.preprocess(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            common::server::violated_fields(&status),
            fields,
            "{status:?}"
        );
    }
    let status = server
        .preprocess(named(pb::Preprocessor::OpenposeFace, "no_such_face", ""))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // Without a name the absent default is still the operator's to install.
    let status = server
        .preprocess(named(pb::Preprocessor::OpenposeHand, "", ""))
        .await
        .expect_err("no default");
    assert_eq!(error_reason(&status).0, "PREPROCESSOR_MODEL_MISSING");
}
