//! Perturbed-attention guidance against diffusers' PAG pipelines
//! (`tests/fixtures/make_pag_fixtures.py`) over gRPC: images within two levels and
//! latents within 1e-3 on both tiny pipelines for txt2img (with classifier-free guidance
//! on a batch of two, PAG alone, the adaptive scale with guidance rescale at 64×96),
//! inpainting, an IP-Adapter Plus image prompt, img2img and a ControlNet, each with
//! other layers; the same with fused
//! projections; the layers each of 20 patterns finds, as diffusers finds them; the PNG
//! parameters; an image that differs from the one without PAG;
//! refusals naming their fields; the CLI.

use crate::common;

use std::path::Path;

use common::server::TestServer;
use common::{
    assert_images_match, controlnet_fixtures, fixtures, ip_adapter_fixtures, pag_fixtures,
    read_tensors,
};
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn cases(config: &str) -> Vec<Value> {
    let path = pag_fixtures().join(config).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A ControlNet root holding tiny3's `from_unet` as `wide_xl`.
fn controlnet_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let to = root.path().join("wide_xl");
    std::fs::create_dir_all(&to).expect("mkdir");
    let from = controlnet_fixtures().join("tiny3/from_unet");
    for entry in std::fs::read_dir(&from).expect("read_dir").flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
    root
}

async fn server(controlnets: &Path, fused: bool) -> TestServer {
    let ip = ip_adapter_fixtures();
    let encoders = ip.join("encoders");
    TestServer::with_pipelines(&[
        (
            "SDXLD__MODELS__CONTROLNET_ROOTS",
            controlnets.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__IP_ADAPTER_ROOTS",
            ip.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__IMAGE_ENCODER_ROOTS",
            encoders.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__ENGINE__FUSED_PROJECTIONS",
            if fused { "true" } else { "false" },
        ),
    ])
    .await
}

fn pag_of(case: &Value) -> pb::PerturbedAttentionGuidance {
    let pag = &case["pag"];
    pb::PerturbedAttentionGuidance {
        scale: pag["scale"].as_f64().map(|s| s as f32),
        adaptive_scale: pag["adaptive_scale"].as_f64().map(|s| s as f32),
        layers: pag["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l.as_str().expect("layer").to_string())
            .collect(),
    }
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let dir = fixtures().join(config);
    let kind = case["kind"].as_str().expect("kind");
    let strength = case["strength"].as_f64().map(|s| s as f32);
    let init_image = matches!(kind, "img2img" | "inpaint").then(|| pb::InitImage {
        image: read(&dir.join("init.png")),
        mask: if kind == "inpaint" {
            read(&dir.join("mask.png"))
        } else {
            Vec::new()
        },
        strength,
        ..Default::default()
    });
    let controlnets = (kind == "controlnet")
        .then(|| pb::ControlNetUnit {
            model: "wide_xl".into(),
            image: read(&controlnet_fixtures().join(config).join("control_a.png")),
            conditioning_scale: case["conditioning_scale"].as_f64().map(|s| s as f32),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let ip_adapters = case["ip_adapter"]
        .as_array()
        .map(|a| {
            let image = a[2].as_str().expect("image");
            let path = ip_adapter_fixtures().join(format!("images/{image}.png"));
            pb::ImagePrompt {
                adapter: format!("{config}/ip_adapters/{}", a[0].as_str().expect("name")),
                image_encoder: a[1].as_str().expect("encoder").into(),
                images: vec![read(&path)],
                scale: a[3].as_f64().map(|s| s as f32),
                ..Default::default()
            }
        })
        .into_iter()
        .collect();
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        num_images: case["n"].as_u64().expect("n") as u32,
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        guidance_rescale: case["guidance_rescale"].as_f64().unwrap_or(0.0) as f32,
        scheduler: pb::Scheduler::Euler as i32,
        init_image,
        controlnets,
        ip_adapters,
        pag: Some(pag_of(case)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pag_matches_diffusers() {
    let root = controlnet_root();
    let server = server(root.path(), false).await;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&pag_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let key = case["name"].as_str().expect("name");
            let name = format!("{config} {key} ({})", case["kind"]);
            server
                .assert_matches_case(&name, spec_of(config, &case), &reference, key)
                .await;
        }
    }
    // The defaults (scale 3, the mid block) in the PNG parameters; without PAG another
    // image.
    let spec = pb::GenerationSpec {
        pag: Some(pb::PerturbedAttentionGuidance::default()),
        ..spec_of("tiny2", &cases("tiny2")[0])
    };
    let without = pb::GenerationSpec {
        pag: None,
        ..spec.clone()
    };
    let entry = "PAG: \"scale 3, adaptive scale 0, layers mid\"";
    server
        .assert_entry_and_effect("PAG", spec, without, entry)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pag_matches_diffusers_with_fused_projections() {
    let root = controlnet_root();
    let server = server(root.path(), true).await;
    for (config, index) in [("tiny2", 1), ("tiny3", 0)] {
        let reference = read_tensors(&pag_fixtures().join(config).join("cases.safetensors"));
        let case = &cases(config)[index];
        let key = case["name"].as_str().expect("name");
        let name = format!("fused {config} {key}");
        server
            .assert_matches_case(&name, spec_of(config, case), &reference, key)
            .await;
    }
}

/// Every recorded pattern finds, among the self-attention layers sdxld names from each
/// UNet's config, the layers diffusers gives a PAG processor; a pattern diffusers finds
/// nothing with is refused before admission.
#[test]
fn layer_patterns_find_the_layers_diffusers_perturbs() {
    use sdxld::engine::config_check::read_config;
    use sdxld::engine::models::unet::UNet2DConditionModel;
    use sdxld::engine::models::unet_config::UNetConfig;
    use sdxld::engine::request::PagLayer;

    for config in ["tiny2", "tiny3"] {
        let unet: UNetConfig =
            read_config(&fixtures().join(config).join("pipeline/unet/config.json"))
                .expect("config");
        let names = UNet2DConditionModel::self_attention_names(&unet);
        let path = pag_fixtures().join(config).join("layers.json");
        let recorded: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(path).expect("layers.json"))
                .expect("json");
        assert!(
            recorded.len() >= 20,
            "{config}: {} patterns",
            recorded.len()
        );
        for (pattern, expected) in recorded {
            let layer = PagLayer::parse(&pattern).expect("a recorded pattern parses");
            let mut found: Vec<&str> = names
                .iter()
                .filter(|n| layer.matches(n))
                .map(String::as_str)
                .collect();
            found.sort();
            let expected: Vec<&str> = expected
                .as_array()
                .expect("names")
                .iter()
                .map(|n| n.as_str().expect("name"))
                .collect();
            assert_eq!(found, expected, "{config}: {pattern:?}");
        }
    }
}

fn refused_spec(pag: pb::PerturbedAttentionGuidance) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a boat".into(),
        steps: 1,
        width: 64,
        height: 64,
        pag: Some(pag),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pag_refusals_name_their_fields_and_the_refiner_runs_without() {
    let root = controlnet_root();
    let server = server(root.path(), false).await;
    let layers = |names: &[&str]| pb::PerturbedAttentionGuidance {
        layers: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    let refusals = [
        (
            pb::PerturbedAttentionGuidance {
                scale: Some(0.0),
                ..Default::default()
            },
            vec!["spec.pag.scale"],
        ),
        (
            pb::PerturbedAttentionGuidance {
                scale: Some(f32::INFINITY),
                adaptive_scale: Some(f32::NAN),
                ..Default::default()
            },
            vec!["spec.pag.adaptive_scale", "spec.pag.scale"],
        ),
        (
            pb::PerturbedAttentionGuidance {
                adaptive_scale: Some(1.5),
                ..Default::default()
            },
            vec!["spec.pag.adaptive_scale"],
        ),
        // tiny2's first down block and second up block have no attention.
        (
            layers(&["mid", "middle", "down_blocks.0", "up_blocks.1", "mid[0]"]),
            vec![
                "spec.pag.layers[1]",
                "spec.pag.layers[2]",
                "spec.pag.layers[3]",
                "spec.pag.layers[4]",
            ],
        ),
        (layers(&["mid"; 17]), vec!["spec.pag.layers"]),
    ];
    for (pag, fields) in refusals {
        let what = format!("{pag:?}");
        server
            .assert_invalid(&what, refused_spec(pag), &fields)
            .await;
    }
    let guess = pb::GenerationSpec {
        controlnets: vec![pb::ControlNetUnit {
            model: "wide_xl".into(),
            image: read(&controlnet_fixtures().join("tiny3/control_a.png")),
            control_mode: pb::ControlMode::Guess as i32,
            ..Default::default()
        }],
        model: "tiny3/pipeline".into(),
        ..refused_spec(pb::PerturbedAttentionGuidance::default())
    };
    server
        .assert_invalid("guess mode", guess, &["spec.controlnets[0].control_mode"])
        .await;
    // The refiner has its own layers: PAG stays on the base, and the server serves on.
    let refined = pb::GenerationSpec {
        steps: 4,
        refiner: Some(pb::RefinerStage {
            model: "tiny2/refiner".into(),
            mode: pb::RefinerMode::EnsembleOfExperts as i32,
            high_noise_fraction: Some(0.5),
            ..Default::default()
        }),
        ..refused_spec(layers(&["up_blocks.0"]))
    };
    let done = server.images(refined).await.expect("with a refiner");
    assert_eq!(done.images.len(), 1);
}

/// `sdxld generate --pag 2 --pag-layer ... --guidance 1` runs the tiny2 case of PAG
/// alone; a scale of 0 is refused naming the flag, a layer without --pag too.
#[test]
fn pag_over_the_cli_matches_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny2")[1];
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("pag.png");
    let run = |scale: &str| {
        let mut command = sdxld("generate")
            .flag("--model", fixtures().join("tiny2/pipeline"))
            .flag("--pag", scale)
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args(["--guidance", &case["guidance"].to_string()])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--steps",
                &case["steps"].to_string(),
            ]);
        for layer in case["pag"]["layers"].as_array().expect("layers") {
            command = command.flag("--pag-layer", layer.as_str().expect("layer"));
        }
        command.flag("--output", &png)
    };
    run(&case["pag"]["scale"].to_string()).succeeds();
    let reference = read_tensors(&pag_fixtures().join("tiny2/cases.safetensors"));
    assert_images_match(
        "CLI PAG",
        &common::image_file(&png),
        &reference["pag_1.images"].get(0),
    );
    let message = run("0").fails();
    assert!(message.contains("--pag"), "{message}");
    let message = sdxld("generate")
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .flag("--pag-layer", "mid")
        .args(["--prompt", "a boat", "--steps", "1"])
        .flag("--output", &png)
        .fails();
    assert!(message.contains("--pag-layer needs --pag"), "{message}");
}
