//! LeReS depth over gRPC: a LeReS file under a preprocessor root serves PREPROCESSOR_DEPTH
//! when a request names it, listed as `leres`; its near and background cuts reach the map
//! and the PNG's `depth_leres` entry; the cuts' refusals name their fields before a job
//! is admitted.

use crate::common;

use common::server::{violated_fields, TestServer};
use common::{detector_fixtures, leres_fixtures};
use sdxld::proto::v1 as pb;
use tonic::Code;

/// The Depth Anything folder under the default's name, and the LeReS network as
/// `res101` (the published file's name, converted).
fn detector_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        leres_fixtures().join("leres/x8.safetensors"),
        dir.path().join("res101.safetensors"),
    )
    .expect("copy");
    common::copy_tree(
        &detector_fixtures().join("depth/small"),
        &dir.path().join("depth-anything/Depth-Anything-V2-Small-hf"),
    );
    dir
}

fn photo() -> Vec<u8> {
    std::fs::read(leres_fixtures().join("images/photo.png")).expect("photo")
}

/// LeReS's map of the photo at 128 with the cuts of make_leres_fixtures.py's second case.
fn leres_request(near: Option<f32>, background: Option<f32>) -> pb::PreprocessRequest {
    pb::PreprocessRequest {
        image: photo(),
        preprocessor: pb::Preprocessor::Depth as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            detect_resolution: 128,
            model: "res101".into(),
            remove_near: near,
            remove_background: background,
            ..Default::default()
        }),
        poses: None,
    }
}

/// Values more than a level from the fixture's map `name`.
fn apart(png: &[u8], name: &str) -> usize {
    let got = image::load_from_memory(png).expect("png").to_luma8();
    let want = image::open(leres_fixtures().join(name))
        .expect("png")
        .to_luma8();
    assert_eq!(got.dimensions(), want.dimensions(), "{name}");
    let raw = got.as_raw().iter().zip(want.as_raw());
    raw.filter(|(a, b)| a.abs_diff(**b) > 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leres_detector_serves_depth_with_its_cuts_and_names_bad_ones() {
    let detectors = detector_root();
    let controlnets = common::controlnet_root(&[("tiny2/from_unet", "lines_xl")]);
    let server = TestServer::with_detectors(detectors.path(), controlnets.path(), &[]).await;
    let map = server
        .preprocess(leres_request(Some(30.0), None))
        .await
        .expect("a LeReS map");
    assert_eq!((map.width, map.height), (128, 128));
    assert!(apart(&map.control_map, "leres/x8_1.png") * 500 <= 128 * 128);
    // Without the cut it is another map.
    let uncut = server
        .preprocess(leres_request(None, None))
        .await
        .expect("a LeReS map");
    assert_ne!(uncut.control_map, map.control_map);
    let listed = server.list_models(pb::ModelKind::Preprocessor).await;
    let leres = listed.iter().find(|m| m.name == "res101").expect("listed");
    assert_eq!(
        leres.preprocessor.as_ref().map(|p| p.network.as_str()),
        Some("leres")
    );

    let near = "preprocessor_params.remove_near";
    let background = "preprocessor_params.remove_background";
    let canny = pb::PreprocessRequest {
        preprocessor: pb::Preprocessor::Canny as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            remove_background: Some(10.0),
            ..Default::default()
        }),
        ..leres_request(None, None)
    };
    let mut depth_anything = leres_request(Some(20.0), Some(5.0));
    if let Some(params) = depth_anything.preprocessor_params.as_mut() {
        params.model.clear();
    }
    let mut own_size = leres_request(None, None);
    own_size.image = common::edges::black_png(80, 64);
    if let Some(params) = own_size.preprocessor_params.as_mut() {
        params.detect_resolution = 0;
    }
    let invalid = [
        (leres_request(Some(f32::NAN), None), vec![near]),
        (
            leres_request(Some(100.5), Some(-1.0)),
            vec![near, background],
        ),
        (canny, vec![background]),
        (depth_anything, vec![near, background]),
        (own_size, vec!["preprocessor_params.detect_resolution"]),
    ];
    for (request, fields) in invalid {
        let status = server.preprocess(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), fields, "{status:?}");
    }

    // A unit on it writes A1111's module with its cuts and returns the same map.
    let spec = pb::GenerationSpec {
        prompt: "a house by a lake".into(),
        seed: Some(42),
        steps: 3,
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        controlnets: vec![pb::ControlNetUnit {
            model: "lines_xl".into(),
            image: photo(),
            preprocessor: pb::Preprocessor::Depth as i32,
            preprocessor_params: leres_request(Some(30.0), None).preprocessor_params,
            ..Default::default()
        }],
        output: Some(pb::OutputOptions {
            return_control_maps: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = server.images(spec).await.expect("a LeReS unit");
    let parameters = common::png_parameters(&response.images[0].data);
    let entry =
        "Module: depth_leres, Threshold A: 30, Threshold B: 0, Processor Res: 128, Model: lines_xl";
    assert!(parameters.contains(entry), "{parameters}");
    let used = &response.control_maps[0];
    let resized = image::load_from_memory(&used.data).expect("png");
    assert_eq!((resized.width(), resized.height()), (64, 64));
}
