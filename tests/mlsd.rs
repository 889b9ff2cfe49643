//! M-LSD against controlnet_aux 0.0.10 on random weights built by
//! `tests/fixtures/make_detector_fixtures.py` (its `MobileV2_MLSD_Large` and a narrower
//! variant with other stage widths, depths, expansions and outputs): the network's
//! outputs within 1e-3 relative at three sizes, the segments decoded from the reference's
//! own outputs drawn pixel for pixel, `MLSDdetector`'s whole map pixel for pixel at
//! several resolutions and thresholds, OpenCV's `cv2.line` pixel for pixel on lines
//! inside, across and far outside a canvas, and files that are not M-LSD refused.

use crate::common;

use std::path::PathBuf;

use common::{assert_io_cases, detector_fixtures, read_tensors};
use sdxld::engine::preprocess::cv_line::draw_line;
use sdxld::engine::preprocess::detector::{network_of, DetectorNetwork};
use sdxld::engine::preprocess::mlsd::Mlsd;
use sdxld::engine::preprocess::mlsd_lines::{line_map, segments, LineThresholds};
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
use serde_json::Value;
use tch::{Device, Kind};

const MODELS: [&str; 2] = ["large", "narrow"];

fn root() -> PathBuf {
    detector_fixtures().join("mlsd")
}

fn load(name: &str) -> Mlsd {
    let path = root().join(format!("{name}.safetensors"));
    assert_eq!(network_of(&path).expect("known"), DetectorNetwork::Mlsd);
    Mlsd::load(&path, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The map cases: name, model, image, detect resolution and thresholds.
fn map_cases() -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(detector_fixtures().join("cases.json")).expect("cases");
    let cases: Value = serde_json::from_str(&text).expect("json");
    let maps = cases["mlsd_maps"].as_object().expect("mlsd_maps");
    assert!(maps.len() >= 5, "map cases");
    maps.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn thresholds(case: &Value) -> LineThresholds {
    LineThresholds {
        score: case["thr_v"].as_f64().expect("thr_v") as f32,
        distance: case["thr_d"].as_f64().expect("thr_d") as f32,
    }
}

fn reference_map(case_name: &str, case: &Value) -> image::GrayImage {
    let model = case["model"].as_str().expect("model");
    image::open(root().join(format!("{model}_{case_name}.png")))
        .expect("map")
        .to_luma8()
}

fn assert_same_pixels(what: &str, got: &image::GrayImage, want: &image::GrayImage) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}");
    let differing = got.iter().zip(want.iter()).filter(|(g, w)| g != w).count();
    assert_eq!(
        differing, 0,
        "{what}: {differing} pixels unlike the reference"
    );
}

#[test]
fn the_mlsd_network_equals_controlnet_aux() {
    for name in MODELS {
        let network = load(name);
        let io = read_tensors(&root().join(format!("{name}.io.safetensors")));
        let cases = io.keys().filter(|k| k.starts_with("input.")).count();
        assert_eq!(cases, 3, "{name}: three input sizes");
        assert_io_cases(name, &io, cases, |x| {
            network.forward(x, &mut || Ok(())).expect("forward")
        });
    }
}

#[test]
fn segments_decoded_from_the_references_outputs_are_drawn_as_it_draws_them() {
    for (name, case) in map_cases() {
        let model = case["model"].as_str().expect("model");
        let io = read_tensors(&root().join(format!("{model}_{name}.safetensors")));
        let want = reference_map(&name, &case);
        let (w, h) = want.dimensions();
        let got = line_map(&io["tpmap"], w, h, thresholds(&case)).expect("lines");
        assert_same_pixels(&name, &got, &want);
        let lit = got.iter().filter(|&&v| v == 255).count();
        assert_eq!(lit as u64, case["lit"].as_u64().expect("lit"), "{name}");
        // The thresholds count: none at all draws more, an unreachable score nothing.
        let loose = LineThresholds {
            score: 0.0,
            distance: 0.0,
        };
        let all = segments(&io["tpmap"], loose).expect("all").len();
        let kept = segments(&io["tpmap"], thresholds(&case))
            .expect("kept")
            .len();
        assert!(kept < all, "{name}: {kept} of {all} segments kept");
        let strict = LineThresholds {
            score: 1.0,
            distance: 0.0,
        };
        let none = line_map(&io["tpmap"], w, h, strict).expect("none");
        assert!(
            none.iter().all(|&v| v == 0),
            "{name}: nothing scores above 1"
        );
    }
}

#[test]
fn the_whole_detector_equals_mlsd_detector() {
    use sdxld::engine::preprocess::detector::Detector;
    // Each network loaded once serves every case of its model, through the preprocessing
    // (HWC3, resize_image, the detector) and on the already-sized image.
    let detectors: Vec<(&str, Detector)> = MODELS
        .iter()
        .map(|&n| (n, Detector::Mlsd(Box::new(load(n)))))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (name, case) in map_cases() {
        let model = case["model"].as_str().expect("model");
        let detector = &detectors
            .iter()
            .find(|(n, _)| *n == model)
            .expect("model")
            .1;
        let Detector::Mlsd(network) = detector else {
            unreachable!("an M-LSD detector")
        };
        let image = case["image"].as_str().expect("image");
        let photo =
            image::open(detector_fixtures().join(format!("images/{image}.png"))).expect("photo");
        let resolution = case["detect_resolution"].as_u64().expect("resolution") as u32;
        let preprocessing = Preprocessing {
            preprocessor: Preprocessor::Mlsd(thresholds(&case)),
            detect_resolution: Some(resolution),
        };
        let got = preprocessing
            .run(&photo, Networks::detector(Some(detector)))
            .expect("detect");
        let got = image::DynamicImage::ImageRgb8(got).to_luma8();
        assert_same_pixels(&name, &got, &reference_map(&name, &case));
        let sized = sdxld::engine::preprocess::resize_for_detection(&photo.to_rgb8(), resolution);
        // A stop asked between the network's blocks ends the map there.
        let direct = common::assert_stops_between_passes(&name, 4, |between| {
            network.detect(&sized, thresholds(&case), between)
        });
        assert_same_pixels(&format!("{name} direct"), &direct, &got);
        seen.insert(got.dimensions());
    }
    assert!(seen.len() >= 3, "square and oblong sizes: {seen:?}");
}

#[test]
fn opencv_lines_are_drawn_pixel_for_pixel() {
    let io = read_tensors(&root().join("lines.safetensors"));
    let lines = Vec::<i64>::try_from(io["lines"].contiguous().view(-1)).expect("i64");
    let canvases = Vec::<u8>::try_from(io["canvases"].contiguous().view(-1)).expect("u8");
    let (width, height) = (80u32, 60u32);
    let plane = (width * height) as usize;
    let mut lit_lines = 0;
    for (k, line) in lines.chunks(4).enumerate() {
        let mut canvas = image::GrayImage::new(width, height);
        draw_line(&mut canvas, (line[0], line[1]), (line[2], line[3]), 255);
        let want = &canvases[k * plane..(k + 1) * plane];
        let differing = canvas.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "line {k} {line:?}: {differing} pixels unlike OpenCV's"
        );
        lit_lines += usize::from(want.iter().any(|&v| v != 0));
    }
    assert!(lit_lines > 200, "{lit_lines} lines cross the canvas");
}

#[test]
fn sizes_the_network_cannot_take_are_refused() {
    let network = load("narrow");
    for (w, h) in [(72, 64), (64, 40), (16, 32)] {
        let image = image::RgbImage::new(w, h);
        let err = network
            .detect(&image, LineThresholds::default(), &mut || Ok(()))
            .expect_err("refused");
        assert!(err.to_string().contains("M-LSD"), "{w}x{h}: {err}");
    }
    // 48×32 holds 24×16 = 384 candidates: detected (a blank image has no segments).
    let blank = network
        .detect(
            &image::RgbImage::new(48, 32),
            LineThresholds::default(),
            &mut || Ok(()),
        )
        .expect("48x32");
    assert_eq!(blank.dimensions(), (48, 32));
}

#[test]
fn a_file_that_is_not_mlsd_is_refused_naming_what_it_lacks() {
    let fixtures = detector_fixtures();
    let dir = tempfile::tempdir().expect("tempdir");
    // The large network without its head's projection.
    let mut tensors = read_tensors(&root().join("large.safetensors"));
    tensors.retain(|name, _| !name.starts_with("block23.conv3"));
    tensors.insert(
        "block23.conv3.weight".into(),
        tch::Tensor::zeros([4, 64, 1, 1], (Kind::Float, Device::Cpu)),
    );
    let path = dir.path().join("short.safetensors");
    let named: Vec<(String, tch::Tensor)> = tensors.into_iter().collect();
    tch::Tensor::write_safetensors(&named, &path).expect("write");
    let err = Mlsd::load(&path, Device::Cpu, Kind::Float)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("block23.conv3"), "{err}");
    // Another network's file.
    let hed = fixtures.join("hed/narrow.safetensors");
    assert!(Mlsd::load(&hed, Device::Cpu, Kind::Float).is_err());
}

/// A server on tiny2 with the M-LSD files as preprocessor networks: the narrow one under
/// the default's name, the large one as `mlsd_large`.
async fn server() -> (common::server::TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (from, to) in [("narrow", "mlsd_large_512_fp32"), ("large", "mlsd_large")] {
        let from = root().join(format!("{from}.safetensors"));
        std::fs::copy(from, dir.path().join(format!("{to}.safetensors"))).expect("copy");
    }
    let pipeline = common::fixtures().join("tiny2/pipeline");
    let server = common::server::TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipeline.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__PREPROCESSOR_ROOTS",
            dir.path().to_str().expect("utf-8"),
        ),
    ])
    .await;
    (server, dir)
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(detector_fixtures().join(format!("images/{name}.png"))).expect("image")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preprocess_rpc_draws_mlsd_maps_and_refuses_what_it_cannot_draw() {
    use sdxld::proto::v1 as pb;
    let (server, _dir) = server().await;
    let run = |image: &str, params: pb::PreprocessorParams| pb::PreprocessRequest {
        image: image_bytes(image),
        preprocessor: pb::Preprocessor::Mlsd as i32,
        preprocessor_params: Some(params),
        poses: None,
    };
    // Every map case over the wire, the thresholds as the client sends them.
    for (name, case) in map_cases() {
        let model = case["model"].as_str().expect("model");
        let params = pb::PreprocessorParams {
            detect_resolution: case["detect_resolution"].as_u64().expect("resolution") as u32,
            model: if model == "large" {
                "mlsd_large".into()
            } else {
                String::new()
            },
            mlsd_score_threshold: Some(case["thr_v"].as_f64().expect("thr_v") as f32),
            mlsd_distance_threshold: Some(case["thr_d"].as_f64().expect("thr_d") as f32),
            ..Default::default()
        };
        let request = run(case["image"].as_str().expect("image"), params);
        let mut client = server.generation().await;
        let response = client.preprocess(request).await.expect(&name).into_inner();
        let got = image::load_from_memory(&response.control_map)
            .expect("png")
            .to_luma8();
        assert_same_pixels(&name, &got, &reference_map(&name, &case));
    }
    // Bad thresholds, named together; a size the network cannot take at its own size.
    let bad = pb::PreprocessorParams {
        detect_resolution: 64,
        mlsd_score_threshold: Some(f32::NAN),
        mlsd_distance_threshold: Some(20.5),
        ..Default::default()
    };
    let odd = pb::PreprocessorParams::default();
    for (request, fields) in [
        (
            run("photo", bad),
            vec![
                "preprocessor_params.mlsd_score_threshold",
                "preprocessor_params.mlsd_distance_threshold",
            ],
        ),
        (
            run("photo_odd", odd),
            vec!["preprocessor_params.detect_resolution"],
        ),
    ] {
        let mut client = server.generation().await;
        let status = client.preprocess(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let named = common::server::violated_fields(&status);
        assert_eq!(named, fields, "{status:?}");
    }
    // The server serves on: a 64² photo at its own size is a valid M-LSD input.
    let mut client = server.generation().await;
    let fine = client
        .preprocess(run("photo", pb::PreprocessorParams::default()))
        .await;
    assert_eq!(fine.expect("served").into_inner().width, 64);
}
