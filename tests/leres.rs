//! LeReS depth against controlnet_aux on random weights built by
//! `tests/fixtures/make_leres_fixtures.py`: two configurations (a ResNeXt of 8 groups under
//! the names `sdxld convert` gives the published checkpoint, and ungrouped bottlenecks
//! under the model's own names; other depths and decoder widths) at square and oblong
//! inputs within 1e-3; `LeresDetector`'s input; its 8-bit maps with the near and
//! background cuts; files it cannot run refused naming the tensor.

use crate::common;

use common::{assert_io_cases, leres_fixtures, read_tensors};
use sdxld::engine::preprocess::detector::{network_of, Detector, DetectorNetwork};
use sdxld::engine::preprocess::image_filters::Param;
use sdxld::engine::preprocess::leres::{DepthCuts, LeresDetector};
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 2] = ["x8", "plain"];

fn path(name: &str) -> std::path::PathBuf {
    leres_fixtures().join(format!("leres/{name}.safetensors"))
}

fn load(name: &str) -> LeresDetector {
    LeresDetector::load(&path(name), Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(leres_fixtures().join("cases.json")).expect("cases");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn leres_equals_controlnet_aux() {
    for name in MODELS {
        let detector = load(name);
        let io = read_tensors(&leres_fixtures().join(format!("leres/{name}.io.safetensors")));
        let count = io.keys().filter(|k| k.starts_with("input.")).count();
        assert!(count >= 2, "{name}: several inputs");
        assert_io_cases(name, &io, count, |x| {
            detector.forward(x, &mut || Ok(())).expect("a pass")
        });
    }
}

#[test]
fn the_published_checkpoints_layout_converts_and_loads() {
    // torch.save's {"depth_model": DataParallel state dict, "optimizer": ...}: the
    // optimiser's tensors stay beside the network and feed nothing.
    let dir = tempfile::tempdir().expect("dir");
    let converted = dir.path().join("res101.safetensors");
    let pth = leres_fixtures().join("leres/x8.pth");
    sdxld::convert::convert(&pth, &converted).expect("convert");
    assert_eq!(
        network_of(&converted).expect("network"),
        DetectorNetwork::Leres
    );
    let detector = LeresDetector::load(&converted, Device::Cpu, Kind::Float).expect("load");
    let io = read_tensors(&leres_fixtures().join("leres/x8.io.safetensors"));
    assert_io_cases("converted", &io, 1, |x| {
        detector.forward(x, &mut || Ok(())).expect("a pass")
    });
}

#[test]
fn the_input_is_bgr_from_0_to_255_normalised() {
    let image = image::RgbImage::from_fn(2, 1, |x, _| image::Rgb([10 + x as u8, 100, 250]));
    let input = LeresDetector::input(&image);
    assert_eq!(input.size(), [1, 3, 1, 2]);
    // Channel 0 is blue: (250 - 0.485) / 0.229.
    let blue = input.double_value(&[0, 0, 0, 0]);
    assert!((blue - (250.0 - 0.485) / 0.229).abs() < 1e-3, "{blue}");
    let red = input.double_value(&[0, 2, 0, 1]);
    assert!((red - (11.0 - 0.406) / 0.225).abs() < 1e-3, "{red}");
}

#[test]
fn the_maps_equal_leres_detectors_within_a_level() {
    let root = leres_fixtures();
    let cases = cases();
    let (mut equal, mut total) = (0, 0);
    for name in MODELS {
        let detector = Detector::load(&path(name), Device::Cpu, Kind::Float).expect("load");
        assert_eq!(detector.network(), DetectorNetwork::Leres);
        let maps = cases[name]["maps"].as_array().expect("maps");
        assert_eq!(maps.len(), 4);
        for case in maps {
            let field = |key: &str| case[key].as_f64().expect(key) as f32;
            let cuts = DepthCuts {
                near: Param(field("near")),
                background: Param(field("background")),
            };
            let resolution = case["resolution"].as_u64().expect("resolution") as u32;
            let image = image::open(
                root.join("images")
                    .join(case["image"].as_str().expect("image")),
            )
            .expect("image");
            let depth = Preprocessing {
                preprocessor: Preprocessor::Depth(cuts),
                detect_resolution: Some(resolution),
            };
            // A stop asked between the encoder's blocks ends the map there.
            let map = common::assert_stops_between_passes(name, 4, |between| {
                depth.run_interruptible(&image, Networks::detector(Some(&detector)), between)
            });
            let want = image::open(root.join(case["map"].as_str().expect("map")))
                .expect("png")
                .to_luma8();
            assert_eq!(map.dimensions(), want.dimensions(), "{name} {case}");
            let got: Vec<u8> = map.pixels().map(|p| p[0]).collect();
            let diff = |(a, b): (&u8, &u8)| a.abs_diff(*b);
            let off = got
                .iter()
                .zip(want.as_raw())
                .filter(|p| diff(*p) > 1)
                .count();
            // A value within a level of a cut may fall on the other side of it.
            assert!(off * 500 <= got.len(), "{name} {case}: {off} values apart");
            equal += got
                .iter()
                .zip(want.as_raw())
                .filter(|p| diff(*p) == 0)
                .count();
            total += got.len();
        }
    }
    // Float32 convolutions summed in another order move a 16-bit value across an 8-bit
    // rounding edge now and then (2 of 139,264 here).
    assert!(
        equal * 1000 >= total * 999,
        "{equal} of {total} values equal"
    );
}

#[test]
fn a_leres_file_is_a_depth_detector_and_one_it_cannot_run_is_refused_naming_the_tensor() {
    for name in MODELS {
        assert_eq!(
            network_of(&path(name)).expect("network"),
            DetectorNetwork::Leres
        );
        assert!(Preprocessor::Depth(DepthCuts::NONE).runs_on(DetectorNetwork::Leres));
    }
    // A decoder convolution one channel wider than its input, and an encoder of other
    // stage widths: each refused at load, naming the tensor.
    let cases = [
        "depth_model.module.depth_model.decoder_modules.ffm1.ftb1.conv1.weight",
        "depth_model.module.depth_model.encoder_modules.encoder.layer2.0.conv3.weight",
    ];
    for key in cases {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("res101.safetensors");
        let mut tensors: Vec<(String, Tensor)> =
            Tensor::read_safetensors(path("x8")).expect("read");
        for (name, tensor) in tensors.iter_mut() {
            if name == key {
                let mut size = tensor.size();
                size[1] += 1;
                *tensor = Tensor::zeros(size.as_slice(), (Kind::Float, Device::Cpu));
            }
        }
        Tensor::write_safetensors(&tensors, &file).expect("write");
        let error = LeresDetector::load(&file, Device::Cpu, Kind::Float)
            .err()
            .unwrap_or_else(|| panic!("{key}: loaded"))
            .to_string();
        assert!(error.contains(key), "{key}: {error}");
    }
}
