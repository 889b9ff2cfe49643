//! PiDiNet against controlnet_aux 0.0.10 on random weights built by
//! `tests/fixtures/make_detector_fixtures.py` (its carv4 network as table5_pidinet.pth,
//! stored under `module.`; one with attention only; one with neither module): the five
//! sigmoid outputs within 1e-3 at three sizes (odd ones pooled down and brought back),
//! `PidiNetDetector`'s soft edges and scribbles through the soft-edge and scribble
//! preprocessors, its `apply_filter` sketches through the sketch preprocessor, and over gRPC a PiDiNet file serving the soft-edge preprocessor by
//! name while the line-art preprocessor refuses it.

use crate::common;

use std::path::PathBuf;

use common::edges::{assert_map, server_with_detector, unit_parameters};
use common::{assert_close, detector_fixtures, read_tensors};
use sdxld::engine::preprocess::detector::{network_of, Detector, DetectorNetwork};
use sdxld::engine::preprocess::pidinet::PiDiNet;
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
use tch::{Device, Kind};

const MODELS: [&str; 3] = ["table5", "attention", "plain"];

fn path(name: &str) -> PathBuf {
    detector_fixtures().join(format!("pidinet/{name}.safetensors"))
}

fn reference(name: &str) -> image::GrayImage {
    image::open(detector_fixtures().join(format!("pidinet/{name}.png")))
        .expect("map")
        .to_luma8()
}

#[test]
fn the_pidinet_network_equals_controlnet_aux() {
    for name in MODELS {
        assert_eq!(
            network_of(&path(name)).expect("known"),
            DetectorNetwork::PiDiNet
        );
        let network = PiDiNet::load(&path(name), Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_tensors(&detector_fixtures().join(format!("pidinet/{name}.io.safetensors")));
        for k in 0..3 {
            let outputs = network
                .forward(&io[&format!("input.{k}")], &mut || Ok(()))
                .expect("forward");
            assert_eq!(outputs.len(), 5, "{name}: four sides and the fused map");
            for (j, edges) in outputs.iter().enumerate() {
                let want = &io[&format!("output.{k}.{j}")];
                assert_close(&format!("{name} input {k} output {j}"), edges, want);
            }
        }
    }
}

#[test]
fn soft_edges_and_scribbles_equal_pidinet_detector() {
    let photo = image::open(detector_fixtures().join("images/photo.png")).expect("photo");
    let photo256 = image::open(detector_fixtures().join("images/photo256.png")).expect("photo");
    for name in MODELS {
        let detector = Detector::load(&path(name), Device::Cpu, Kind::Float).expect("load");
        assert_eq!(detector.network(), DetectorNetwork::PiDiNet);
        for (preprocessor, image, resolution, map, most) in [
            (
                Preprocessor::SoftEdge { safe_steps: None },
                &photo,
                64,
                "map",
                1,
            ),
            (
                Preprocessor::SoftEdge { safe_steps: None },
                &photo256,
                256,
                "map256",
                1,
            ),
            (Preprocessor::Scribble, &photo, 64, "scribble", 0),
            // Three levels: an edge a bit from a step may land on its other side.
            (
                Preprocessor::SoftEdge {
                    safe_steps: Some(2),
                },
                &photo,
                64,
                "safe",
                128,
            ),
        ] {
            let preprocessing = Preprocessing {
                preprocessor,
                detect_resolution: Some(resolution),
            };
            // A stop asked between the blocks ends the map there.
            let got = common::assert_stops_between_passes(name, 4, |between| {
                preprocessing.run_interruptible(image, Networks::detector(Some(&detector)), between)
            });
            let got = image::DynamicImage::ImageRgb8(got).to_luma8();
            let want = reference(&format!("{name}_{map}"));
            assert_map(&format!("{name} {map}"), &got, &want, most);
            let distinct: std::collections::HashSet<u8> = got.iter().copied().collect();
            if map == "safe" {
                assert!(
                    distinct.iter().all(|v| [0, 127, 255].contains(v)),
                    "{distinct:?}"
                );
            }
            if preprocessor == (Preprocessor::SoftEdge { safe_steps: None }) {
                assert!(
                    distinct.len() > 64,
                    "{name} {map}: soft, {} levels",
                    distinct.len()
                );
            }
        }
    }
}

#[test]
fn sketches_are_the_edges_above_one_half() {
    // PidiNetDetector's apply_filter keeps an edge probability above 0.5: white exactly
    // where the reference's soft map is 128 or more (v × 255 truncated), black where it
    // is 126 or less; a level either side of the half may fall either way.
    let photo = image::open(detector_fixtures().join("images/photo.png")).expect("photo");
    for name in MODELS {
        let detector = Detector::load(&path(name), Device::Cpu, Kind::Float).expect("load");
        let sketch = Preprocessing {
            preprocessor: Preprocessor::Sketch,
            detect_resolution: Some(64),
        };
        let got = sketch
            .run(&photo, Networks::detector(Some(&detector)))
            .expect("a sketch");
        let got = image::DynamicImage::ImageRgb8(got).to_luma8();
        let soft = reference(&format!("{name}_map"));
        assert_eq!(got.dimensions(), soft.dimensions(), "{name}");
        let mut white = 0;
        for (g, s) in got.iter().zip(soft.iter()) {
            assert!(*g == 0 || *g == 255, "{name}: black and white");
            match s {
                0..=126 => assert_eq!(*g, 0, "{name}: soft {s}"),
                129..=255 => assert_eq!(*g, 255, "{name}: soft {s}"),
                _ => {}
            }
            white += usize::from(*g == 255);
        }
        assert!(white > 0 && white < got.len(), "{name}: {white} white");
    }
}

#[test]
fn images_the_network_cannot_pool_are_refused() {
    let network = PiDiNet::load(&path("plain"), Device::Cpu, Kind::Float).expect("load");
    let err = network
        .detect(&image::RgbImage::new(7, 64))
        .expect_err("too narrow");
    assert!(err.to_string().contains("at least 8"), "{err}");
    let map = network.detect(&image::RgbImage::new(8, 9)).expect("8x9");
    assert_eq!(map.dimensions(), (8, 9));
    // HED's four poolings: 16 pixels.
    let hed = detector_fixtures().join("hed/full.safetensors");
    let hed =
        sdxld::engine::preprocess::hed::Hed::load(&hed, Device::Cpu, Kind::Float).expect("hed");
    let err = hed
        .detect(&image::RgbImage::new(15, 40))
        .expect_err("too narrow");
    assert!(err.to_string().contains("at least 16"), "{err}");
    assert_eq!(
        hed.detect(&image::RgbImage::new(16, 16))
            .expect("16²")
            .dimensions(),
        (16, 16)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pidinet_file_serves_soft_edges_by_name_and_only_them() {
    use sdxld::proto::v1 as pb;
    let (server, _roots) = server_with_detector(&path("table5"), "table5_pidinet", &[]).await;
    let photo = std::fs::read(detector_fixtures().join("images/photo.png")).expect("photo");
    let request = |preprocessor: pb::Preprocessor| pb::PreprocessRequest {
        image: photo.clone(),
        preprocessor: preprocessor as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            detect_resolution: 64,
            model: "table5_pidinet".into(),
            ..Default::default()
        }),
        poses: None,
    };
    let safe = |preprocessor: pb::Preprocessor| {
        let mut safe = request(preprocessor);
        if let Some(params) = safe.preprocessor_params.as_mut() {
            params.safe_steps = Some(2);
        }
        safe
    };
    for (request, map, most) in [
        (request(pb::Preprocessor::Softedge), "table5_map", 1),
        (request(pb::Preprocessor::Scribble), "table5_scribble", 0),
        (safe(pb::Preprocessor::Softedge), "table5_safe", 128),
    ] {
        let mut client = server.generation().await;
        let reply = client.preprocess(request).await.expect(map);
        let got = image::load_from_memory(&reply.into_inner().control_map)
            .expect("png")
            .to_luma8();
        assert_map(map, &got, &reference(map), most);
    }
    let mut client = server.generation().await;
    // Safe steps on scribbles; three steps, which PiDiNet's safe=True does not take.
    let mut three = safe(pb::Preprocessor::Softedge);
    if let Some(params) = three.preprocessor_params.as_mut() {
        params.safe_steps = Some(3);
    }
    for refused in [safe(pb::Preprocessor::Scribble), three] {
        let status = client.preprocess(refused).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(
            common::server::violated_fields(&status),
            ["preprocessor_params.safe_steps"]
        );
    }
    let status = client
        .preprocess(request(pb::Preprocessor::Lineart))
        .await
        .expect_err("another network");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        common::server::violated_fields(&status),
        ["preprocessor_params.model"]
    );
    assert!(status.message().contains("pidinet"), "{}", status.message());
    // At its own size an image too small to pool is refused before it runs.
    let mut tiny = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::new(6, 30))
        .write_to(
            &mut std::io::Cursor::new(&mut tiny),
            image::ImageFormat::Png,
        )
        .expect("png");
    let mut small = request(pb::Preprocessor::Softedge);
    small.image = tiny;
    if let Some(params) = small.preprocessor_params.as_mut() {
        params.detect_resolution = 0;
    }
    let status = client.preprocess(small).await.expect_err("too small");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        common::server::violated_fields(&status),
        ["preprocessor_params.detect_resolution"]
    );
    // A unit's PNG entry names the network that drew its soft edges, and their levels.
    for (params, module) in [
        (request(pb::Preprocessor::Softedge), "softedge_pidinet"),
        (safe(pb::Preprocessor::Softedge), "softedge_pidisafe"),
    ] {
        let parameters = unit_parameters(
            &server,
            pb::Preprocessor::Softedge,
            &photo,
            params.preprocessor_params,
        )
        .await;
        let entry = format!("Module: {module}, Processor Res: 64,");
        assert!(parameters.contains(&entry), "{parameters}");
    }
    // Sketches: the edges above one half in black and white; a unit records A1111's
    // module for them.
    let sketch = client
        .preprocess(request(pb::Preprocessor::Sketch))
        .await
        .expect("a sketch")
        .into_inner();
    let sketch = image::load_from_memory(&sketch.control_map)
        .expect("png")
        .to_luma8();
    assert!(sketch.iter().all(|&v| v == 0 || v == 255));
    assert!(sketch.contains(&255));
    // The file is also the default preprocessing.sketch_model: a request naming none
    // gets the same sketch; the capabilities list sketches ready under that key, soft
    // edges still under HED's.
    let mut unnamed = request(pb::Preprocessor::Sketch);
    if let Some(params) = unnamed.preprocessor_params.as_mut() {
        params.model.clear();
    }
    let by_default = client
        .preprocess(unnamed)
        .await
        .expect("a sketch from the default")
        .into_inner();
    let by_default = image::load_from_memory(&by_default.control_map)
        .expect("png")
        .to_luma8();
    assert_eq!(by_default, sketch);
    let sketches = server.preprocessor_support(pb::Preprocessor::Sketch).await;
    assert!(sketches.ready, "{sketches:?}");
    assert_eq!(
        (
            sketches.config_key.as_str(),
            sketches.default_model.as_str()
        ),
        ("preprocessing.sketch_model", "table5_pidinet")
    );
    let soft_edges = server
        .preprocessor_support(pb::Preprocessor::Softedge)
        .await;
    assert_eq!(soft_edges.config_key, "preprocessing.hed_model");
    let params = request(pb::Preprocessor::Sketch).preprocessor_params;
    let parameters = unit_parameters(&server, pb::Preprocessor::Sketch, &photo, params).await;
    let entry = "Module: t2ia_sketch_pidi, Processor Res: 64,";
    assert!(parameters.contains(entry), "{parameters}");
    let listed = server.list_models(pb::ModelKind::Preprocessor).await;
    let entry = listed
        .iter()
        .find(|m| m.name == "table5_pidinet")
        .expect("listed");
    let network = entry.preprocessor.as_ref().map(|p| p.network.as_str());
    assert_eq!(network, Some("pidinet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sketch_default_of_another_network_is_the_configurations_fault() {
    use sdxld::proto::v1 as pb;
    use tonic_types::StatusExt;
    // A HED file under the sketch default's name.
    let hed = detector_fixtures().join("hed/full.safetensors");
    let (server, _roots) = server_with_detector(&hed, "table5_pidinet", &[]).await;
    let photo = std::fs::read(detector_fixtures().join("images/photo.png")).expect("photo");
    let mut client = server.generation().await;
    let status = client
        .preprocess(pb::PreprocessRequest {
            image: photo,
            preprocessor: pb::Preprocessor::Sketch as i32,
            preprocessor_params: Some(pb::PreprocessorParams {
                detect_resolution: 64,
                ..Default::default()
            }),
            poses: None,
        })
        .await
        .expect_err("sketches from HED");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "PREPROCESSOR_MODEL_MISMATCH");
    assert_eq!(info.metadata["config_key"], "preprocessing.sketch_model");
    let sketches = server.preprocessor_support(pb::Preprocessor::Sketch).await;
    assert!(!sketches.ready, "{sketches:?}");
}
