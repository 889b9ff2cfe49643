//! Anyline against controlnet_aux 0.0.10's `AnylineDetector` on the TEED models of the
//! detector fixtures (`tests/fixtures/make_detector_fixtures.py`): skimage's
//! small-object removal as it calls it on random line maps, bit for bit; the whole map
//! on a photo and on drawings with specks at their own size and at detection sizes; and
//! over gRPC the default MTEED file serving it, its refusals by field, its PNG entry and
//! a missing default named by its key.

use crate::common;

use std::path::PathBuf;

use common::edges::{black_png, server_with_detector, unit_parameters};
use common::server::violated_fields;
use common::{detector_fixtures, read_tensors};
use sdxld::engine::preprocess::anyline::{remove_small_groups, LEAST_LINE_PIXELS};
use sdxld::engine::preprocess::detector::Detector;
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
use sdxld::proto::v1 as pb;
use tch::{Device, Kind};
use tonic_types::StatusExt;

/// (TEED model, image, detect resolution; 0: its own size), as the fixture script's
/// `ANYLINE_CASES`.
const CASES: [(&str, &str, u32); 5] = [
    ("seed3", "photo", 64),
    ("seed3", "dotted_96x64", 0),
    ("seed3", "dotted_100x76", 128),
    ("seed9", "dotted_96x64", 0),
    ("seed9", "photo256", 256),
];

fn teed(name: &str) -> PathBuf {
    detector_fixtures().join(format!("teed/{name}.safetensors"))
}

fn reference(model: &str, image: &str, resolution: u32) -> image::GrayImage {
    let path = format!("anyline/{model}_{image}_{resolution}.png");
    image::open(detector_fixtures().join(path))
        .expect("map")
        .to_luma8()
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(detector_fixtures().join(format!("images/{name}.png"))).expect("image")
}

#[test]
fn small_groups_go_as_skimage_removes_them() {
    let cases = read_tensors(&detector_fixtures().join("anyline/groups.safetensors"));
    let plane = |name: &str| {
        let tensor = &cases[name];
        let (h, w) = tensor.size2().expect("a plane");
        let values = Vec::<u8>::try_from(tensor.contiguous().view(-1)).expect("bytes");
        image::GrayImage::from_raw(w as u32, h as u32, values).expect("plane")
    };
    let count = cases.len() / 2;
    assert!(count >= 6, "{count} cases");
    for k in 0..count {
        let mut lines = plane(&format!("input.{k}"));
        let before = lines.clone();
        remove_small_groups(&mut lines, LEAST_LINE_PIXELS);
        assert_ne!(lines, before, "case {k}: some groups go");
        assert_eq!(lines, plane(&format!("output.{k}")), "case {k}");
    }
}

#[test]
fn anyline_maps_equal_anyline_detector() {
    for (model, name, resolution) in CASES {
        let detector = Detector::load(&teed(model), Device::Cpu, Kind::Float).expect("teed");
        let image = image::load_from_memory(&image_bytes(name)).expect("image");
        let preprocessing = Preprocessing {
            preprocessor: Preprocessor::Anyline,
            detect_resolution: (resolution > 0).then_some(resolution),
        };
        let map = preprocessing
            .run(&image, Networks::detector(Some(&detector)))
            .expect("map");
        let got = image::DynamicImage::ImageRgb8(map).to_luma8();
        let what = format!("{model} {name} at {resolution}");
        assert_nearly_equal(&what, &got, &reference(model, name, resolution));
    }
}

/// Equal but on at most one pixel in a thousand (TEED's last float bit can move an edge
/// a step, which the lines' wrapping arithmetic then carries anywhere; the lines are
/// OpenCV's and skimage's own). A line group of 12 pixels kept moves more than that.
fn assert_nearly_equal(what: &str, got: &image::GrayImage, want: &image::GrayImage) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}");
    let off = got.iter().zip(want.iter()).filter(|(g, w)| g != w).count();
    assert!(off * 1000 <= got.len(), "{what}: {off} pixels differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_teed_file_serves_anyline_and_its_fields_are_checked() {
    let (server, _roots) = server_with_detector(&teed("seed3"), "MTEED", &[]).await;
    let anyline = server.preprocessor_support(pb::Preprocessor::Anyline).await;
    assert!(anyline.ready, "{anyline:?}");
    assert_eq!(
        (anyline.config_key.as_str(), anyline.default_model.as_str()),
        ("preprocessing.anyline_model", "MTEED")
    );
    let request = |image: Vec<u8>, params: pb::PreprocessorParams| pb::PreprocessRequest {
        image,
        preprocessor: pb::Preprocessor::Anyline as i32,
        preprocessor_params: Some(params),
        poses: None,
    };
    let mut client = server.generation().await;
    let reply = client
        .preprocess(request(image_bytes("dotted_96x64"), Default::default()))
        .await
        .expect("anyline");
    let got = image::load_from_memory(&reply.into_inner().control_map)
        .expect("png")
        .to_luma8();
    assert_nearly_equal("default", &got, &reference("seed3", "dotted_96x64", 0));

    // Safe steps (fixed at 2), a 62-pixel side at its own size: refused by field.
    let narrow = black_png(62, 64);
    let safe = pb::PreprocessorParams {
        safe_steps: Some(2),
        ..Default::default()
    };
    for (refused, field) in [
        (
            request(image_bytes("photo"), safe),
            "preprocessor_params.safe_steps",
        ),
        (
            request(narrow, Default::default()),
            "preprocessor_params.detect_resolution",
        ),
    ] {
        let status = client.preprocess(refused).await.expect_err(field);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), [field]);
    }
    // A unit's PNG entry: A1111's module.
    let params = pb::PreprocessorParams {
        detect_resolution: 64,
        ..Default::default()
    };
    let photo = image_bytes("photo");
    let parameters =
        unit_parameters(&server, pb::Preprocessor::Anyline, &photo, Some(params)).await;
    assert!(parameters.contains("Module: softedge_anyline, Processor Res: 64,"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anyline_refuses_other_networks_and_names_a_missing_default() {
    let hed = detector_fixtures().join("hed/narrow.safetensors");
    let (server, _roots) = server_with_detector(&hed, "edges", &[]).await;
    let mut client = server.generation().await;
    let request = |model: &str| pb::PreprocessRequest {
        image: image_bytes("photo"),
        preprocessor: pb::Preprocessor::Anyline as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            model: model.into(),
            ..Default::default()
        }),
        poses: None,
    };
    let status = client.preprocess(request("edges")).await.expect_err("hed");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["preprocessor_params.model"]);
    assert!(
        status.message().contains("runs teed"),
        "{}",
        status.message()
    );
    let status = client.preprocess(request("")).await.expect_err("no MTEED");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "PREPROCESSOR_MODEL_MISSING");
    assert_eq!(info.metadata["config_key"], "preprocessing.anyline_model");
    assert!(
        info.metadata["expected_file"].contains("MTEED.safetensors"),
        "{:?}",
        info.metadata
    );
}
