//! Depth Anything and DPT against transformers on random weights built by
//! `tests/fixtures/make_detector_fixtures.py`: three Depth Anything configurations (a
//! V2-like model stored under the published checkpoints' tensor names; a SwiGLU,
//! metric-depth model reading other layers; a V1-like model reading the last four) at
//! square and oblong patch grids, and two DPT
//! ones (readout projected as Intel/dpt-large, its processor config in the old style;
//! readout added with batch norms in the fusion) at square grids, odd ones included, the
//! stored position grid and others, and two DPT-Hybrid ones (a BiT backbone as
//! Intel/dpt-hybrid-midas; other depths and groups, an unpadded pool, an enlarged level)
//! at their image size, within 1e-3; the processor's input equal to
//! `DPTImageProcessorPil`'s; the whole detector's 8-bit map within one level of the
//! reference's.

use crate::common;

use common::{assert_io_cases, detector_fixtures, read_tensors};
use sdxld::engine::preprocess::depth::DepthDetector;
use sdxld::engine::preprocess::depth_anything::{version_of, DepthAnythingVersion};
use sdxld::engine::preprocess::detector::{network_of, DetectorNetwork};
use tch::{Device, Kind};

/// (fixture folder, model, network).
const MODELS: [(&str, &str, DetectorNetwork); 7] = [
    ("depth", "small", DetectorNetwork::DepthAnything),
    ("depth", "swiglu", DetectorNetwork::DepthAnything),
    ("depth", "first", DetectorNetwork::DepthAnything),
    ("dpt", "project", DetectorNetwork::Dpt),
    ("dpt", "add", DetectorNetwork::Dpt),
    ("dpt", "hybrid", DetectorNetwork::Dpt),
    ("dpt", "hybrid_bn", DetectorNetwork::Dpt),
];

fn load(family: &str, name: &str, network: DetectorNetwork) -> DepthDetector {
    let dir = detector_fixtures().join(family).join(name);
    assert_eq!(network_of(&dir).expect("a served folder"), network);
    let dpt = network == DetectorNetwork::Dpt;
    DepthDetector::load(&dir, dpt, Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn depth_anything_equals_transformers() {
    for (family, name, network) in MODELS {
        let detector = load(family, name, network);
        let io = read_tensors(&detector_fixtures().join(format!("{family}/{name}.io.safetensors")));
        let cases = io.keys().filter(|k| k.starts_with("input.")).count();
        // DPT-Hybrid takes its image_size only: two inputs of it.
        assert!(cases >= 2, "{name}: several inputs");
        assert_io_cases(name, &io, cases, |x| {
            detector
                .network()
                .forward(x, &mut || Ok(()))
                .expect("a pass")
        });
    }
}

#[test]
fn depth_anything_folders_are_told_apart_by_the_layers_their_neck_reads() {
    // The last four layers read: the first version; layers spread over the depth, or a
    // metric head (which only the second has): the second.
    for (name, version) in [
        ("first", DepthAnythingVersion::First),
        ("small", DepthAnythingVersion::Second),
        ("swiglu", DepthAnythingVersion::Second),
    ] {
        let dir = detector_fixtures().join("depth").join(name);
        assert_eq!(version_of(&dir).expect("a config"), version, "{name}");
    }
}

#[test]
fn the_depth_detector_equals_transformers_processor_and_post_processing() {
    let root = detector_fixtures();
    for (family, name, network) in MODELS {
        let detector = load(family, name, network);
        for suffix in ["", "_odd"] {
            let photo = image::open(root.join(format!("images/photo{suffix}.png")))
                .expect("photo")
                .to_rgb8();
            let pixels =
                read_tensors(&root.join(format!("{family}/{name}_pixels{suffix}.safetensors")));
            let expected = &pixels["pixels"];
            let input = detector.input(&photo);
            assert_eq!(
                input.size(),
                expected.size(),
                "{name}{suffix}: the processor's size"
            );
            let most = (&input - expected).abs().max().double_value(&[]);
            assert!(most < 1e-5, "{name}{suffix}: the input differs by {most}");
            // A stop asked between the backbone's layers ends the map there.
            let map = common::assert_stops_between_passes(name, 2, |between| {
                detector.detect_between(&photo, between)
            });
            let want = image::open(root.join(format!("{family}/{name}_map{suffix}.png")))
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
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "glpn"}"#).expect("write");
    let error = network_of(dir.path()).expect_err("refused").to_string();
    assert!(
        error.contains("glpn") && error.contains("config.json"),
        "{error}"
    );
}

/// A change to a model's config.json.
type ConfigEdit = fn(&mut serde_json::Value);

/// A copy of the DPT fixture `name` in a temporary folder.
fn dpt_copy(name: &str) -> tempfile::TempDir {
    let root = detector_fixtures().join("dpt").join(name);
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&root).expect("dir").flatten() {
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

/// The error loading the DPT folder `dir` gives, as text.
fn dpt_refusal(dir: &std::path::Path) -> String {
    DepthDetector::load(dir, true, Device::Cpu, Kind::Float)
        .err()
        .expect("refused")
        .to_string()
}

#[test]
fn dpt_hybrid_settings_it_cannot_run_and_non_square_processors_are_refused_naming_them() {
    let dir = dpt_copy("hybrid");
    let config = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config).expect("config");
    let edits: [(&str, ConfigEdit); 4] = [
        ("preactivation", |c| {
            c["backbone_config"]["layer_type"] = "preactivation".into()
        }),
        ("patch_size 8", |c| c["patch_size"] = 8.into()),
        ("neck_ignore_stages [0]", |c| {
            c["neck_ignore_stages"] = serde_json::json!([0])
        }),
        ("backbone's stages", |c| {
            c["neck_hidden_sizes"][1] = 16.into()
        }),
    ];
    for (named, edit) in edits {
        let mut value: serde_json::Value = serde_json::from_str(&original).expect("json");
        edit(&mut value);
        std::fs::write(&config, value.to_string()).expect("write");
        let error = dpt_refusal(dir.path());
        assert!(error.contains(named), "{named}: {error}");
        if named != "backbone's stages" {
            assert!(
                error.contains("DPT-Hybrid") && error.contains("config.json"),
                "{error}"
            );
        }
    }
    // Its processor resizing to another size than its image_size.
    std::fs::write(&config, &original).expect("write");
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"size": 48}"#,
    )
    .expect("write");
    let error = dpt_refusal(dir.path());
    assert!(
        error.contains("preprocessor_config.json") && error.contains("64x64"),
        "{error}"
    );
    // A ViT DPT whose processor asks for oblong inputs.
    let dir = dpt_copy("project");
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"size": {"height": 64, "width": 96}}"#,
    )
    .expect("write");
    assert!(dpt_refusal(dir.path()).contains("not square"));
}
