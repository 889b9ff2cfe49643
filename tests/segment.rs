//! UperNet segmentation against transformers on random weights built by
//! `tests/fixtures/make_detector_fixtures.py`: two ConvNeXt configurations (with and
//! without layer scales; other widths, depths and pool scales; random batch-norm
//! statistics; the auxiliary head in the file, not loaded) at square, oblong and odd
//! sizes, logits within 1e-3; the processor's input equal to `SegformerImageProcessorPil`'s;
//! the whole detector's map (argmax, ADE20K palette) equal to the reference's but where
//! two classes tie to float precision; the palette equal to controlnet_aux's.

use crate::common;

use common::{assert_io_cases, detector_fixtures, read_tensors};
use sdxld::engine::preprocess::ade20k::ADE20K;
use sdxld::engine::preprocess::detector::{network_of, DetectorNetwork};
use sdxld::engine::preprocess::segment::SegmentDetector;
use tch::{Device, Kind};

const MODELS: [&str; 2] = ["small", "plain"];

fn load(name: &str) -> SegmentDetector {
    let dir = detector_fixtures().join("segment").join(name);
    assert_eq!(network_of(&dir).expect("served"), DetectorNetwork::UperNet);
    SegmentDetector::load(&dir, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn upernet_equals_transformers() {
    for name in MODELS {
        let detector = load(name);
        let io = read_tensors(&detector_fixtures().join(format!("segment/{name}.io.safetensors")));
        assert_io_cases(name, &io, 3, |x| {
            detector
                .network()
                .forward(x, &mut || Ok(()))
                .expect("a pass")
        });
    }
}

#[test]
fn the_segmentation_detector_equals_transformers_and_paints_ade20k() {
    let root = detector_fixtures();
    let palette: Vec<[u8; 3]> = serde_json::from_str(
        &std::fs::read_to_string(root.join("segment/palette.json")).expect("palette"),
    )
    .expect("json");
    assert_eq!(palette, ADE20K.to_vec(), "controlnet_aux's ADE20K palette");
    for name in MODELS {
        let detector = load(name);
        for suffix in ["", "_odd"] {
            let photo = image::open(root.join(format!("images/photo{suffix}.png")))
                .expect("photo")
                .to_rgb8();
            // A stop asked between the backbone's blocks ends the map there.
            let map = common::assert_stops_between_passes(name, 4, |between| {
                detector.detect_between(&photo, between)
            });
            let want = image::open(root.join(format!("segment/{name}_map{suffix}.png")))
                .expect("map")
                .to_rgb8();
            assert_eq!(map.dimensions(), want.dimensions(), "{name}{suffix}");
            let off = map
                .pixels()
                .zip(want.pixels())
                .filter(|(g, w)| g != w)
                .count();
            assert!(
                off * 100 <= map.pixels().len(),
                "{name}{suffix}: {off} pixels differ"
            );
            let colours: std::collections::HashSet<[u8; 3]> = map.pixels().map(|p| p.0).collect();
            assert!(colours.len() > 3, "{name}{suffix}: several classes");
        }
    }
}
