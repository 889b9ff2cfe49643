//! Depth Anything against transformers on random weights built by
//! `tests/fixtures/make_detector_fixtures.py`: two configurations (a V2-like model stored
//! under the published checkpoints' tensor names; a SwiGLU, metric-depth model reading
//! other layers) at square and oblong patch grids, the stored position grid and others,
//! within 1e-3; the processor's input equal to `DPTImageProcessorPil`'s; the whole
//! detector's 8-bit map within one level of the reference's.

mod common;

use common::{assert_close, detector_fixtures, read_tensors};
use sdxld::engine::preprocess::depth::DepthDetector;
use sdxld::engine::preprocess::detector::{network_of, DetectorNetwork};
use tch::{Device, Kind};

const MODELS: [&str; 2] = ["small", "swiglu"];

fn load(name: &str) -> DepthDetector {
    let dir = detector_fixtures().join("depth").join(name);
    assert_eq!(
        network_of(&dir).expect("a served folder"),
        DetectorNetwork::DepthAnything
    );
    DepthDetector::load(&dir, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn depth_anything_equals_transformers() {
    for name in MODELS {
        let detector = load(name);
        let io = read_tensors(&detector_fixtures().join(format!("depth/{name}.io.safetensors")));
        let cases = io.keys().filter(|k| k.starts_with("input.")).count();
        assert!(cases >= 2, "{name}: several sizes");
        for k in 0..cases {
            let got = detector.network().forward(&io[&format!("input.{k}")]);
            assert_close(
                &format!("{name} input {k}"),
                &got,
                &io[&format!("output.{k}")],
            );
        }
    }
}

#[test]
fn the_depth_detector_equals_transformers_processor_and_post_processing() {
    let root = detector_fixtures();
    for name in MODELS {
        let detector = load(name);
        for suffix in ["", "_odd"] {
            let photo = image::open(root.join(format!("images/photo{suffix}.png")))
                .expect("photo")
                .to_rgb8();
            let pixels =
                read_tensors(&root.join(format!("depth/{name}_pixels{suffix}.safetensors")));
            let expected = &pixels["pixels"];
            let input = detector.input(&photo);
            assert_eq!(
                input.size(),
                expected.size(),
                "{name}{suffix}: the processor's size"
            );
            let most = (&input - expected).abs().max().double_value(&[]);
            assert!(most < 1e-5, "{name}{suffix}: the input differs by {most}");
            let map = detector.detect(&photo).expect("detect");
            let want = image::open(root.join(format!("depth/{name}_map{suffix}.png")))
                .expect("map")
                .to_luma8();
            assert_eq!(map.dimensions(), want.dimensions(), "{name}{suffix}");
            let mut off = 0;
            for (g, w) in map.iter().zip(want.iter()) {
                assert!(g.abs_diff(*w) <= 1, "{name}{suffix}: {g} against {w}");
                off += usize::from(g != w);
            }
            assert!(
                off * 100 <= map.len(),
                "{name}{suffix}: {off} pixels differ"
            );
            let distinct: std::collections::HashSet<u8> = map.iter().copied().collect();
            assert!(
                distinct.len() > 16,
                "{name}{suffix}: a map with depth in it"
            );
        }
    }
}

#[test]
fn a_folder_of_another_model_type_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "dpt"}"#).expect("write");
    let error = network_of(dir.path()).expect_err("refused").to_string();
    assert!(
        error.contains("dpt") && error.contains("config.json"),
        "{error}"
    );
}
