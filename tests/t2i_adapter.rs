//! T2I-Adapters as ControlNet units against diffusers (`tests/fixtures/
//! make_t2i_adapter_fixtures.py`): each layout's features equal `T2IAdapter.forward`'s,
//! from folders and from single files; over gRPC, images equal
//! StableDiffusionXLAdapterPipeline's (one adapter, two summed, a window under Euler and
//! under Heun, two images, a grey adapter, the UNet's mid block joined or not, the base
//! of an ensemble of experts) and the same features passed through diffusers'
//! image-to-image, inpainting and ControlNet pipelines; units run beside PAG and
//! masked-area inpainting, and outside a guider's interval with the prompt's batch alone;
//! adapters list as such, and bad units are refused by field or by model.

use crate::common;

use std::path::Path;

use common::server::TestServer;
use common::{
    assert_close, assert_images_match, cases_at, decoded_image, fixtures, read_tensors,
    t2i_adapter_fixtures, Case,
};
use sdxld::engine::device::Placement;
use sdxld::engine::models::control_model::ControlModel;
use sdxld::engine::models::t2i_adapter::T2IAdapter;
use sdxld::proto::v1 as pb;
use tch::Tensor;
use tonic::Code;
use tonic_types::StatusExt;

fn load(path: &Path) -> ControlModel {
    ControlModel::load_path(path, Placement::cpu())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts that `adapter` makes diffusers' features of every map in `io`.
fn assert_features(
    what: &str,
    adapter: &T2IAdapter,
    io: &std::collections::HashMap<String, Tensor>,
) {
    let mut maps = 0;
    for (key, image) in io.iter().filter(|(k, _)| k.starts_with("image.")) {
        let size = key.trim_start_matches("image.");
        let features = adapter.forward(image).expect("features");
        let expected = io
            .keys()
            .filter(|k| k.starts_with(&format!("feature.{size}.")))
            .count();
        assert_eq!(features.len(), expected, "{what} at {size}");
        for (k, feature) in features.iter().enumerate() {
            let reference = &io[&format!("feature.{size}.{k}")];
            assert_close(
                &format!("{what} at {size}, feature {k}"),
                feature,
                reference,
            );
        }
        maps += 1;
    }
    assert_eq!(maps, 2, "{what}: two map sizes");
}

#[test]
fn every_layout_makes_diffusers_features_from_folders_and_single_files() {
    let root = t2i_adapter_fixtures();
    let adapters = [
        ("tiny2", "xl", Some("tiny2_xl")),
        ("tiny2", "grey", Some("tiny2_grey")),
        ("tiny3", "xl", None),
        ("tiny3", "grey", None),
        ("other", "sd15", Some("sd15")),
        ("other", "light", Some("light")),
    ];
    for (group, name, single) in adapters {
        let what = format!("{group}/{name}");
        let dir = root.join(group).join(name);
        let io = read_tensors(&dir.with_extension("safetensors"));
        let folder = load(&dir);
        let adapter = folder.adapter().expect("an adapter");
        assert!(folder.controlnet().is_none());
        assert_features(&what, adapter, &io);
        // A map of another size than the factor allows is refused, not cropped.
        let factor = adapter.config().downscale_factor;
        let odd = Tensor::zeros(
            [1, 3, factor * 2 + factor / 2, factor * 2],
            tch::kind::FLOAT_CPU,
        );
        assert!(adapter.forward(&odd).is_err(), "{what}");
        if let Some(file) = single {
            let path = root.join("single").join(format!("{file}.safetensors"));
            let model = load(&path);
            let from_file = model.adapter().expect("a single-file adapter");
            assert_eq!(
                from_file.config(),
                adapter.config(),
                "{what}: inferred config"
            );
            assert_features(&format!("{what} (single file)"), from_file, &io);
        }
    }
}

/// A ControlNet root holding the fixtures' adapters (two as folders, two as single files)
/// and tiny3's ControlNet under names of their own.
fn adapter_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let fixtures = t2i_adapter_fixtures();
    for (from, name) in [
        ("tiny2/xl", "xl_t2i"),
        ("tiny3/xl", "xl3_t2i"),
        ("tiny3/grey", "grey3_t2i"),
        ("tiny3/controlnet", "cn3"),
        ("other/sd15", "sd15_t2i"),
    ] {
        let to = root.path().join(name);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(fixtures.join(from))
            .expect("read_dir")
            .flatten()
        {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    for (file, name) in [("tiny2_grey", "grey_t2i"), ("light", "light_t2i")] {
        std::fs::copy(
            fixtures.join(format!("single/{file}.safetensors")),
            root.path().join(format!("{name}.safetensors")),
        )
        .expect("copy");
    }
    root
}

async fn server(config: &str, root: &Path) -> TestServer {
    let pipeline = fixtures().join(config).join("pipeline");
    TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipeline.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__CONTROLNET_ROOTS",
            root.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__REFINER_ROOTS",
            fixtures().join(config).to_str().expect("utf-8"),
        ),
        ("SDXLD__LIMITS__MAX_WIDTH", "256"),
        ("SDXLD__LIMITS__MAX_HEIGHT", "256"),
    ])
    .await
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The request a fixture case of `config` describes, its adapters by their names here.
fn spec_of(config: &str, case: &Case) -> pb::GenerationSpec {
    let dir = t2i_adapter_fixtures().join(config);
    let name = |model: &str| match (config, model) {
        ("tiny2", "xl") => "xl_t2i",
        ("tiny2", _) => "grey_t2i",
        (_, "xl") => "xl3_t2i",
        _ => "grey3_t2i",
    };
    let mut controlnets: Vec<pb::ControlNetUnit> = case["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| pb::ControlNetUnit {
            model: name(u["model"].as_str().expect("model")).into(),
            image: read(&dir.join(u["image"].as_str().expect("image"))),
            conditioning_scale: u["scale"].as_f64().map(|s| s as f32),
            guidance_end: u["end"].as_f64().map(|e| e as f32),
            ..Default::default()
        })
        .collect();
    let kind = case["kind"].as_str().unwrap_or("txt2img");
    if kind == "controlnet" {
        let unit = &case["controlnet"];
        controlnets.push(pb::ControlNetUnit {
            model: "cn3".into(),
            image: read(&dir.join(unit["image"].as_str().expect("image"))),
            conditioning_scale: unit["scale"].as_f64().map(|s| s as f32),
            ..Default::default()
        });
    }
    let init_image = ["img2img", "inpaint"]
        .contains(&kind)
        .then(|| pb::InitImage {
            image: read(&fixtures().join(config).join("init.png")),
            strength: Some(case.float("strength") as f32),
            mask: if kind == "inpaint" {
                read(&fixtures().join(config).join("mask.png"))
            } else {
                Vec::new()
            },
            ..Default::default()
        });
    // The base of an ensemble of experts, the fixtures' refiner taking over.
    let refiner = (kind == "ensemble").then(|| pb::RefinerStage {
        model: "refiner".into(),
        mode: pb::RefinerMode::EnsembleOfExperts as i32,
        high_noise_fraction: Some(case.float("fraction") as f32),
        steps: case.int("steps") as u32,
        guidance_scale: Some(5.0),
        ..Default::default()
    });
    let scheduler = match case["scheduler"].as_str() {
        Some("HeunDiscreteScheduler") => pb::Scheduler::Heun,
        _ => pb::Scheduler::Euler,
    };
    pb::GenerationSpec {
        prompt: case.text("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: Some(case.int("seed")),
        steps: case.int("steps") as u32,
        guidance_scale: Some(case.float("guidance") as f32),
        width: case["width"].as_u64().unwrap_or(64) as u32,
        height: case["height"].as_u64().unwrap_or(64) as u32,
        num_images: case["num_images"].as_u64().unwrap_or(1) as u32,
        scheduler: scheduler as i32,
        controlnets,
        init_image,
        refiner,
        ..Default::default()
    }
}

/// Every case of `config` over gRPC: the images diffusers made with the adapters, not
/// those it made without them.
async fn assert_cases_match(config: &str, server: &TestServer) {
    let dir = t2i_adapter_fixtures().join(config);
    let reference = read_tensors(&dir.join("cases.safetensors"));
    for case in cases_at(&dir.join("cases.json")) {
        let name = case.name();
        let response = server
            .images(spec_of(config, &case))
            .await
            .unwrap_or_else(|e| panic!("{config} {name}: {e}"));
        let expected = &reference[&format!("{name}.images")];
        let plain = &reference[&format!("{name}.plain.images")];
        assert_eq!(response.images.len() as i64, expected.size()[0], "{name}");
        for (i, image) in response.images.iter().enumerate() {
            let what = format!("{config} {name} image {i}");
            let actual = decoded_image(&image.data);
            assert_images_match(&what, &actual, &expected.get(i as i64));
            let moved = (actual.to_kind(tch::Kind::Int)
                - plain.get(i as i64).to_kind(tch::Kind::Int))
            .abs()
            .max()
            .int64_value(&[]);
            assert!(
                moved > 8,
                "{what}: the adapter moved the image by only {moved} levels"
            );
        }
    }
}

/// Outside a guider's interval the prompt's batch runs alone with its part of the units'
/// features: under a guider that guides no step, every guided case of `config` (but the
/// ensembles, whose refiner guides on its own) gives its unguided images.
async fn assert_unguided_outside_a_guiders_interval(config: &str, server: &TestServer) {
    let dir = t2i_adapter_fixtures().join(config);
    let guided = cases_at(&dir.join("cases.json"))
        .into_iter()
        .filter(|c| c.float("guidance") > 1.0 && c["kind"] != "ensemble");
    for case in guided {
        let what = format!("{config} {} under a guider", case.name());
        server
            .assert_unguided_outside_the_interval(&what, spec_of(config, &case))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_units_over_grpc_equal_diffusers_on_tiny2() {
    let root = adapter_root();
    let server = server("tiny2", root.path()).await;
    assert_cases_match("tiny2", &server).await;
    assert_unguided_outside_a_guiders_interval("tiny2", &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_units_over_grpc_equal_diffusers_on_tiny3_beside_a_controlnet() {
    let root = adapter_root();
    let server = server("tiny3", root.path()).await;
    assert_cases_match("tiny3", &server).await;
    assert_unguided_outside_a_guiders_interval("tiny3", &server).await;
}

/// A 64x64 request of one unit of `model` with tiny2's first map.
fn with_unit(model: &str) -> pb::GenerationSpec {
    let map = read(&t2i_adapter_fixtures().join("tiny2/control_a.png"));
    pb::GenerationSpec {
        prompt: "a house".into(),
        seed: Some(3),
        steps: 2,
        width: 64,
        height: 64,
        controlnets: vec![pb::ControlNetUnit {
            model: model.into(),
            image: map,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_list_as_such_and_bad_units_are_refused_by_field_or_model() {
    let root = adapter_root();
    let server = server("tiny2", root.path()).await;
    let plain = pb::GenerationSpec {
        controlnets: Vec::new(),
        ..with_unit("xl_t2i")
    };
    let before = server.images(plain.clone()).await.expect("plain");

    let mut guess = with_unit("xl_t2i");
    guess.controlnets[0].control_mode = pb::ControlMode::Guess as i32;
    server
        .assert_invalid("guess", guess, &["spec.controlnets[0].control_mode"])
        .await;
    let mut typed = with_unit("grey_t2i");
    typed.controlnets[0].control_type = pb::ControlType::Depth as i32;
    server
        .assert_invalid("control type", typed, &["spec.controlnets[0].control_type"])
        .await;
    // 72 is a multiple of 8 (the pipeline's) but not of 16 (the adapter's factor).
    for (width, height, fields) in [
        (72, 64, vec!["spec.width"]),
        (64, 88, vec!["spec.height"]),
        (72, 88, vec!["spec.width", "spec.height"]),
    ] {
        let spec = pb::GenerationSpec {
            width,
            height,
            ..with_unit("grey_t2i")
        };
        server.assert_invalid("size", spec, &fields).await;
    }
    let status = server.images(with_unit("xl_t2i")).await.map(|_| ());
    assert!(status.is_ok(), "{status:?}");

    // Layouts of SD 1.5's UNet: their first feature is twice the size SDXL's first
    // down block gives.
    for model in ["sd15_t2i", "light_t2i"] {
        let status = server.images(with_unit(model)).await.expect_err(model);
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{model}: {status:?}"
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INCOMPATIBLE_MODELS", "{model}");
        let message = status.message();
        assert!(
            message.contains(model) && message.contains("feature 0"),
            "{message}"
        );
        assert!(message.contains("spec.controlnets[0].model"), "{message}");
    }

    // Beside perturbed-attention guidance (a third batch part) and inpainting only the
    // masked area (the map cut to the area), an adapter unit runs and acts.
    let pag = |units: bool| pb::GenerationSpec {
        pag: Some(pb::PerturbedAttentionGuidance::default()),
        ..if units {
            with_unit("xl_t2i")
        } else {
            plain.clone()
        }
    };
    let masked = |units: bool| pb::GenerationSpec {
        init_image: Some(pb::InitImage {
            image: read(&fixtures().join("tiny2/init.png")),
            mask: read(&fixtures().join("tiny2/mask.png")),
            padding_mask_crop: Some(4),
            ..Default::default()
        }),
        ..if units {
            with_unit("grey_t2i")
        } else {
            plain.clone()
        }
    };
    for (what, with, without) in [
        ("PAG", pag(true), pag(false)),
        ("masked area", masked(true), masked(false)),
    ] {
        let with = server
            .images(with)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let without = server.images(without).await.expect(what);
        assert_ne!(
            with.images[0].data, without.images[0].data,
            "{what}: the adapter did nothing"
        );
    }

    let after = server.images(plain).await.expect("plain again");
    assert_eq!(
        before.images[0].data, after.images[0].data,
        "a unit left a trace"
    );

    let listed = server.list_models(pb::ModelKind::Controlnet).await;
    let info = |name: &str| {
        listed
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.controlnet.clone())
            .unwrap_or_else(|| panic!("{name} is not listed: {listed:?}"))
    };
    for (name, base, factor) in [
        ("xl_t2i", "sdxl", 16),
        ("grey_t2i", "sdxl", 16),
        ("sd15_t2i", "sd1", 8),
        ("light_t2i", "sd1", 8),
    ] {
        let info = info(name);
        assert!(info.t2i_adapter && !info.union, "{name}: {info:?}");
        assert_eq!(
            (info.base.as_str(), info.downscale_factor),
            (base, factor),
            "{name}"
        );
    }
    let controlnet = info("cn3");
    assert!(!controlnet.t2i_adapter && controlnet.downscale_factor == 0);
}

#[test]
fn an_adapter_file_over_the_cli_equals_diffusers() {
    let out = tempfile::tempdir().expect("tempdir");
    let root = t2i_adapter_fixtures();
    let reference = read_tensors(&root.join("tiny2/cases.safetensors"));
    let png = out.path().join("grey_heun.png");
    let unit = format!(
        "{},{},scale=1.2,end=0.8",
        root.join("single/tiny2_grey.safetensors").display(),
        root.join("tiny2/control_b.png").display()
    );
    common::cli::sdxld("generate")
        .args([
            "--prompt",
            "a house by a lake",
            "--seed",
            "42",
            "--steps",
            "3",
        ])
        .args(["--guidance", "5", "--scheduler", "heun"])
        .args(["--width", "64", "--height", "64"])
        .flag("--controlnet", unit)
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI grey adapter under Heun",
        &common::image_file(&png),
        &reference["grey_heun.images"].get(0),
    );
}

#[test]
fn impossible_adapter_configs_are_refused_naming_the_key() {
    use sdxld::engine::models::t2i_adapter::T2IAdapterConfig;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.json");
    let base = serde_json::json!({
        "_class_name": "T2IAdapter",
        "in_channels": 3,
        "channels": [32, 64, 64, 64],
        "num_res_blocks": 2,
        "downscale_factor": 16,
        "adapter_type": "full_adapter_xl",
    });
    std::fs::write(&path, base.to_string()).expect("write");
    T2IAdapterConfig::read(&path).expect("the base config is fine");
    for (key, value) in [
        ("in_channels", serde_json::json!(4)),
        ("channels", serde_json::json!([])),
        ("channels", serde_json::json!([32, 0, 64, 64])),
        ("channels", serde_json::json!([32, 64, 64, 96])),
        ("num_res_blocks", serde_json::json!(-1)),
        ("downscale_factor", serde_json::json!(0)),
        ("downscale_factor", serde_json::json!(1_i64 << 40)),
        ("adapter_type", serde_json::json!("coadapter")),
    ] {
        let mut config = base.clone();
        config[key] = value.clone();
        std::fs::write(&path, config.to_string()).expect("write");
        let err = T2IAdapterConfig::read(&path)
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} was accepted"))
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "{key} = {value}: {err}");
    }
    // A light adapter's inner width is a quarter of each width.
    let mut light = base.clone();
    light["adapter_type"] = serde_json::json!("light_adapter");
    light["channels"] = serde_json::json!([32, 2, 64]);
    std::fs::write(&path, light.to_string()).expect("write");
    let Err(err) = T2IAdapterConfig::read(&path) else {
        panic!("a light adapter of width 2 was accepted");
    };
    let err = err.to_string();
    assert!(err.contains("`channels`"), "{err}");
}
