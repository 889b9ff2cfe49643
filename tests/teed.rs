//! TEED against controlnet_aux 0.0.10 on random weights built by
//! `tests/fixtures/make_detector_fixtures.py` (its `TED` at two seeds): the four outputs
//! within 1e-3 at three sizes (asking to go on before each block, a stop at the first or
//! the last ending the pass), `TEEDdetector`'s soft edges with 0, 2 (its default) and 5
//! safe steps through the soft-edge preprocessor, and over gRPC a TEED file serving soft
//! edges by name, refused for scribbles, its own-size rule and its steps' range; as the
//! configured default, soft edges served and scribbles listed as not ready.

use crate::common;

use std::path::PathBuf;

use common::edges::{assert_map, black_png, server_with_detector, unit_parameters};
use common::{assert_close, detector_fixtures, read_tensors};
use sdxld::engine::preprocess::detector::{network_of, Detector, DetectorNetwork};
use sdxld::engine::preprocess::teed::Teed;
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
use tch::{Device, Kind};

const MODELS: [&str; 2] = ["seed3", "seed9"];

fn path(name: &str) -> PathBuf {
    detector_fixtures().join(format!("teed/{name}.safetensors"))
}

fn reference(name: &str) -> image::GrayImage {
    image::open(detector_fixtures().join(format!("teed/{name}.png")))
        .expect("map")
        .to_luma8()
}

#[test]
fn the_teed_network_equals_controlnet_aux() {
    for name in MODELS {
        assert_eq!(
            network_of(&path(name)).expect("known"),
            DetectorNetwork::Teed
        );
        let network = Teed::load(&path(name), Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_tensors(&detector_fixtures().join(format!("teed/{name}.io.safetensors")));
        for k in 0..3 {
            let input = &io[&format!("input.{k}")];
            // Two stems, the dense layers, three up branches and the fusion's three steps.
            let what = format!("{name} input {k}");
            let least = 8 + network_dense_blocks(&path(name));
            let outputs = common::assert_stops_between_passes(&what, least, |between| {
                network.forward(input, between)
            });
            assert_eq!(outputs.len(), 4, "{name}: three branches and the fused map");
            for (j, edges) in outputs.iter().enumerate() {
                let want = &io[&format!("output.{k}.{j}")];
                assert_close(&format!("{name} input {k} output {j}"), edges, want);
            }
        }
        // Its branches meet only at sides that are multiples of 4.
        let odd = tch::Tensor::zeros([1, 3, 64, 62], (Kind::Float, Device::Cpu));
        assert!(
            network.forward(&odd, &mut || Ok(())).is_err(),
            "{name}: 62 wide"
        );
    }
}

/// The dense layers a TEED file holds (`dblock_3.denselayer<n>`).
fn network_dense_blocks(file: &std::path::Path) -> usize {
    let tensors = read_tensors(file);
    let layers: std::collections::HashSet<&str> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("dblock_3.")?.split('.').next())
        .collect();
    layers.len()
}

#[test]
fn files_whose_shapes_do_not_fit_together_are_refused_naming_the_tensor() {
    let tensors = read_tensors(&path("seed3"));
    let dir = tempfile::tempdir().expect("tempdir");
    let zeros = |shape: &[i64]| tch::Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    for (name, shape) in [
        ("side_1.conv", [16i64, 16, 1, 1]),
        ("up_block_3.features.5", [2, 1, 4, 4]),
        ("block_cat.DWconv1", [24, 2, 3, 3]),
    ] {
        let mut changed: Vec<(String, tch::Tensor)> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        for (key, tensor) in changed.iter_mut() {
            if *key == format!("{name}.weight") {
                *tensor = zeros(&shape);
            }
            if *key == format!("{name}.bias") {
                let outputs = if name.contains("features") {
                    shape[1]
                } else {
                    shape[0]
                };
                *tensor = zeros(&[outputs]);
            }
        }
        let file = dir.path().join("bad.safetensors");
        tch::Tensor::write_safetensors(&changed, &file).expect("write");
        let error = Teed::load(&file, Device::Cpu, Kind::Float)
            .err()
            .unwrap_or_else(|| panic!("{name}: loaded"));
        assert!(error.to_string().contains(name), "{name}: {error}");
    }
}

#[test]
fn soft_edges_in_steps_equal_teed_detector() {
    let photo = image::open(detector_fixtures().join("images/photo.png")).expect("photo");
    let photo256 = image::open(detector_fixtures().join("images/photo256.png")).expect("photo");
    for name in MODELS {
        let detector = Detector::load(&path(name), Device::Cpu, Kind::Float).expect("load");
        assert_eq!(detector.network(), DetectorNetwork::Teed);
        // A step apart where an edge lies a bit from a step's edge: 255 / steps levels.
        for (steps, image, resolution, map, most) in [
            (Some(0), &photo, 64, "steps0", 1),
            (Some(2), &photo, 64, "steps2", 128),
            (None, &photo, 64, "steps2", 128),
            (Some(5), &photo, 64, "steps5", 51),
            (None, &photo256, 256, "map256", 128),
        ] {
            let preprocessing = Preprocessing {
                preprocessor: Preprocessor::SoftEdge { safe_steps: steps },
                detect_resolution: Some(resolution),
            };
            let got = preprocessing
                .run(image, Networks::detector(Some(&detector)))
                .expect("detect");
            let got = image::DynamicImage::ImageRgb8(got).to_luma8();
            let want = reference(&format!("{name}_{map}"));
            assert_map(&format!("{name} {map} ({steps:?})"), &got, &want, most);
            let distinct: std::collections::HashSet<u8> = got.iter().copied().collect();
            let least = if steps == Some(0) { 32 } else { 3 };
            assert!(
                distinct.len() >= least,
                "{name} {map}: {} levels",
                distinct.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teed_file_serves_soft_edges_by_name_and_only_them() {
    use sdxld::proto::v1 as pb;
    let (server, _roots) = server_with_detector(&path("seed3"), "teed", &[]).await;
    let photo = std::fs::read(detector_fixtures().join("images/photo.png")).expect("photo");
    let request = |preprocessor: pb::Preprocessor, steps: Option<u32>| pb::PreprocessRequest {
        image: photo.clone(),
        preprocessor: preprocessor as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            detect_resolution: 64,
            model: "teed".into(),
            safe_steps: steps,
            ..Default::default()
        }),
        poses: None,
    };
    for (steps, map, most) in [(None, "seed3_steps2", 128), (Some(0), "seed3_steps0", 1)] {
        let mut client = server.generation().await;
        let reply = client
            .preprocess(request(pb::Preprocessor::Softedge, steps))
            .await
            .expect(map);
        let got = image::load_from_memory(&reply.into_inner().control_map)
            .expect("png")
            .to_luma8();
        assert_map(map, &got, &reference(map), most);
    }
    // Scribbles, eleven steps, and a 62-pixel side at the image's own size: refused.
    let mut own_size = request(pb::Preprocessor::Softedge, None);
    let narrow = black_png(62, 64);
    own_size.image = narrow;
    if let Some(params) = own_size.preprocessor_params.as_mut() {
        params.detect_resolution = 0;
    }
    for (refused, field) in [
        (
            request(pb::Preprocessor::Scribble, None),
            "preprocessor_params.model",
        ),
        (
            request(pb::Preprocessor::Softedge, Some(11)),
            "preprocessor_params.safe_steps",
        ),
        (own_size, "preprocessor_params.detect_resolution"),
    ] {
        let mut client = server.generation().await;
        let status = client.preprocess(refused).await.expect_err(field);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(common::server::violated_fields(&status), [field]);
    }
    // A unit's PNG entry: A1111's TEED module with its steps as Threshold A.
    let params = request(pb::Preprocessor::Softedge, Some(3)).preprocessor_params;
    let parameters = unit_parameters(&server, pb::Preprocessor::Softedge, &photo, params).await;
    let entry = "Module: softedge_teed, Threshold A: 3, Processor Res: 64,";
    assert!(parameters.contains(entry), "{parameters}");
    let listed = server.list_models(pb::ModelKind::Preprocessor).await;
    let entry = listed.iter().find(|m| m.name == "teed").expect("listed");
    let network = entry.preprocessor.as_ref().map(|p| p.network.as_str());
    assert_eq!(network, Some("teed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teed_default_serves_soft_edges_and_is_not_offered_for_scribbles() {
    use sdxld::proto::v1 as pb;
    use tonic_types::StatusExt;
    let default = [("SDXLD__PREPROCESSING__HED_MODEL", "teed")];
    let (server, _roots) = server_with_detector(&path("seed3"), "teed", &default).await;
    let soft_edges = server
        .preprocessor_support(pb::Preprocessor::Softedge)
        .await;
    assert!(soft_edges.ready, "{soft_edges:?}");
    assert_eq!(soft_edges.default_model, "teed");
    let scribbles = server
        .preprocessor_support(pb::Preprocessor::Scribble)
        .await;
    assert!(!scribbles.ready, "{scribbles:?}");
    assert_eq!(scribbles.config_key, "preprocessing.hed_model");
    assert!(
        scribbles.reason.contains("teed") && scribbles.reason.contains("hed or pidinet"),
        "{}",
        scribbles.reason
    );

    let photo = std::fs::read(detector_fixtures().join("images/photo.png")).expect("photo");
    let request = |preprocessor: pb::Preprocessor| pb::PreprocessRequest {
        image: photo.clone(),
        preprocessor: preprocessor as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            detect_resolution: 64,
            ..Default::default()
        }),
        poses: None,
    };
    // Soft edges from the default, in its two safe steps.
    let mut client = server.generation().await;
    let reply = client
        .preprocess(request(pb::Preprocessor::Softedge))
        .await
        .expect("soft edges");
    let got = image::load_from_memory(&reply.into_inner().control_map)
        .expect("png")
        .to_luma8();
    assert_map("default", &got, &reference("seed3_steps2"), 128);
    // Scribbles from it: the configuration is at fault, not the request.
    let status = client
        .preprocess(request(pb::Preprocessor::Scribble))
        .await
        .expect_err("scribbles from teed");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "PREPROCESSOR_MODEL_MISMATCH");
    assert_eq!(info.metadata["config_key"], "preprocessing.hed_model");
}
