//! IP-Adapter image prompts over gRPC against diffusers
//! (`tests/fixtures/make_ip_adapter_fixtures.py`): images within two levels and latents
//! within 1e-3 on both tiny pipelines (text to image, image to image, beside a ControlNet,
//! with a hires pass), the models used and the PNG parameters, scale 0
//! equal to no adapter, nothing left behind for the next request, the prompt's image
//! prompts alone outside a guider's interval; bad image prompts
//! refused naming the field, adapters that do not fit refused naming both models, and
//! the listing of adapters and image encoders.

use crate::common;

use common::server::{violated_fields, TestServer};
use common::{
    assert_images_match, controlnet_fixtures, fixtures, ip_adapter_fixtures, read_tensors,
};
use sdxld::proto::v1 as pb;
use serde_json::Value;

pub(crate) fn cases(config: &str) -> Vec<Value> {
    let path = ip_adapter_fixtures().join(config).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json")
}

/// A server over the pipeline fixtures, with the fixtures' adapters (and `extra`) as
/// IP-Adapter roots and their encoders as image encoder roots.
pub(crate) async fn server(extra: &std::path::Path) -> TestServer {
    let pipelines = fixtures();
    let root = ip_adapter_fixtures();
    let adapters = format!("{},{}", root.display(), extra.display());
    TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipelines.join("tiny2/pipeline").to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__BASE_ROOTS",
            pipelines.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__CONTROLNET_ROOTS",
            controlnet_fixtures().to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__REFINER_ROOTS",
            pipelines.to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__IP_ADAPTER_ROOTS", &adapters),
        (
            "SDXLD__MODELS__IMAGE_ENCODER_ROOTS",
            root.join("encoders").to_str().expect("utf-8"),
        ),
        ("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
    ])
    .await
}

/// A `width`×`height` grey PNG.
fn banner(width: u32, height: u32) -> Vec<u8> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
        width,
        height,
        image::Luma([90]),
    ))
    .write_to(&mut png, image::ImageFormat::Png)
    .expect("png");
    png.into_inner()
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(
        ip_adapter_fixtures()
            .join("images")
            .join(format!("{name}.png")),
    )
    .expect("png")
}

/// The request of a recorded case on `config`.
pub(crate) fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let encoder = case["encoder"].as_str().expect("encoder");
    let ip_adapters = case["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| pb::ImagePrompt {
            adapter: format!("{config}/ip_adapters/{}", a[0].as_str().expect("name")),
            image_encoder: encoder.into(),
            images: a[1]
                .as_array()
                .expect("images")
                .iter()
                .map(|i| image_bytes(i.as_str().expect("image")))
                .collect(),
            scale: Some(a[2].as_f64().expect("scale") as f32),
            layers: match a[3].as_str() {
                Some("style") => pb::ImagePromptLayers::Style as i32,
                _ => 0,
            },
            masks: Vec::new(),
        })
        .collect();
    let init_image = (case["kind"] == "img2img").then(|| pb::InitImage {
        image: std::fs::read(fixtures().join(config).join("init.png")).expect("init.png"),
        strength: case["strength"].as_f64().map(|s| s as f32),
        ..Default::default()
    });
    let controlnets = match case["kind"].as_str() {
        Some("controlnet") => vec![pb::ControlNetUnit {
            model: format!("{config}/from_unet"),
            image: std::fs::read(controlnet_fixtures().join(config).join("control_a.png"))
                .expect("control_a.png"),
            conditioning_scale: case["conditioning_scale"].as_f64().map(|s| s as f32),
            ..Default::default()
        }],
        _ => Vec::new(),
    };
    let hires = (case["kind"] == "hires").then(|| pb::HiresPass {
        scale: case["hires_scale"].as_f64().map(|s| s as f32),
        steps: case["hires_steps"].as_u64().expect("hires_steps") as u32,
        strength: case["hires_strength"].as_f64().map(|s| s as f32),
        ..Default::default()
    });
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        init_image,
        hires,
        controlnets,
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        num_images: case["n"].as_u64().expect("n") as u32,
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        ip_adapters,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_prompts_match_diffusers_and_leave_nothing_behind() {
    let extra = tempfile::tempdir().expect("tempdir");
    let server = server(extra.path()).await;
    let first = &cases("tiny2")[0];
    let plain = pb::GenerationSpec {
        ip_adapters: Vec::new(),
        ..spec_of("tiny2", first)
    };
    let before = server.images(plain.clone()).await.expect("plain").images;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&ip_adapter_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let key = case["name"].as_str().expect("name");
            let name = format!("{config} {key}");
            let spec = spec_of(config, &case);
            server
                .assert_matches_case(&name, spec, &reference, key)
                .await;
        }
    }

    // The first case's models and parameters.
    let done = server
        .images(spec_of("tiny2", first))
        .await
        .expect("case 0");
    let used: Vec<(String, i32, f32)> = done
        .completed
        .as_ref()
        .expect("completed")
        .models
        .iter()
        .filter(|m| !m.sha256.is_empty())
        .map(|m| (m.name.clone(), m.kind, m.weight))
        .collect();
    assert!(
        used.contains(&(
            "tiny2/ip_adapters/ip_basic".into(),
            pb::ModelKind::IpAdapter as i32,
            0.8
        )),
        "{used:?}"
    );
    assert!(
        used.contains(&("vision_g".into(), pb::ModelKind::ImageEncoder as i32, 0.0)),
        "{used:?}"
    );
    let parameters = common::png_parameters(&done.images[0].data);
    assert!(
        parameters.contains(
            "ControlNet 0: \"Module: ip-adapter_clip, Model: tiny2/ip_adapters/ip_basic ["
        ) && parameters.contains("Weight: 0.8, Image Encoder: vision_g ["),
        "{parameters}"
    );
    // The image prompt moves the image; at scale 0 it is the plain image; the plain
    // request after every image prompt gives the bytes it gave before any.
    let with = common::decoded_image(&done.images[0].data);
    let without = common::decoded_image(&before[0].data);
    let moved = common::image_difference(&with, &without);
    assert!(
        moved > 20,
        "the image prompt moves the image by {moved} levels only"
    );
    let mut zero = spec_of("tiny2", first);
    zero.ip_adapters[0].scale = Some(0.0);
    let zero = server.images(zero).await.expect("scale 0").images;
    assert_eq!(
        common::decoded_image(&zero[0].data),
        without,
        "scale 0 differs from no adapter"
    );
    let after = server.images(plain).await.expect("plain again").images;
    assert_eq!(
        before[0].data, after[0].data,
        "the image prompts left something behind"
    );
}

/// Outside a guider's interval the prompt's batch runs alone with its image prompts' keys:
/// a guider that guides no step gives the unguided images (two images, two adapters one
/// in the style layers only, beside a ControlNet, with a hires pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_prompts_outside_a_guiders_interval_are_the_prompts_alone() {
    let extra = tempfile::tempdir().expect("tempdir");
    let server = server(extra.path()).await;
    let guided: Vec<Value> = cases("tiny2")
        .into_iter()
        .filter(|c| c["guidance"].as_f64() > Some(1.0))
        .collect();
    assert!(guided.len() >= 4, "{} guided cases", guided.len());
    for case in guided {
        let name = format!("tiny2 {}", case["name"]);
        server
            .assert_unguided_outside_the_interval(&name, spec_of("tiny2", &case))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_prompts_are_refused_naming_the_field() {
    let extra = tempfile::tempdir().expect("tempdir");
    let lora = fixtures().join("tiny2/lora/style_peft.safetensors");
    std::fs::copy(&lora, extra.path().join("not_an_adapter.safetensors")).expect("copy");
    let server = server(extra.path()).await;
    let good = || pb::ImagePrompt {
        adapter: "tiny2/ip_adapters/ip_basic".into(),
        image_encoder: "vision_g".into(),
        images: vec![image_bytes("lighthouse")],
        scale: None,
        layers: 0,
        masks: Vec::new(),
    };
    let spec = |prompts: Vec<pb::ImagePrompt>| pb::GenerationSpec {
        prompt: "a lighthouse".into(),
        steps: 1,
        width: 64,
        height: 64,
        ip_adapters: prompts,
        ..Default::default()
    };
    let refused: Vec<(pb::ImagePrompt, &str)> = vec![
        (
            pb::ImagePrompt {
                adapter: String::new(),
                ..good()
            },
            "spec.ip_adapters[0].adapter",
        ),
        (
            pb::ImagePrompt {
                adapter: "../x".into(),
                ..good()
            },
            "spec.ip_adapters[0].adapter",
        ),
        (
            pb::ImagePrompt {
                image_encoder: String::new(),
                ..good()
            },
            "spec.ip_adapters[0].image_encoder",
        ),
        (
            pb::ImagePrompt {
                images: vec![],
                ..good()
            },
            "spec.ip_adapters[0].images",
        ),
        (
            pb::ImagePrompt {
                images: vec![image_bytes("sail"); 5],
                ..good()
            },
            "spec.ip_adapters[0].images",
        ),
        (
            pb::ImagePrompt {
                images: vec![image_bytes("sail"), b"not an image".to_vec()],
                ..good()
            },
            "spec.ip_adapters[0].images[1]",
        ),
        (
            pb::ImagePrompt {
                scale: Some(f32::NAN),
                ..good()
            },
            "spec.ip_adapters[0].scale",
        ),
        (
            pb::ImagePrompt {
                scale: Some(2.5),
                ..good()
            },
            "spec.ip_adapters[0].scale",
        ),
        (
            pb::ImagePrompt {
                scale: Some(-0.1),
                ..good()
            },
            "spec.ip_adapters[0].scale",
        ),
        (
            pb::ImagePrompt {
                images: vec![image_bytes("sail"), banner(1, 65)],
                ..good()
            },
            "spec.ip_adapters[0].images[1]",
        ),
        // tiny2's UNet has two levels: no `down_blocks.2`.
        (
            pb::ImagePrompt {
                layers: pb::ImagePromptLayers::Composition as i32,
                ..good()
            },
            "spec.ip_adapters[0].layers",
        ),
        (
            pb::ImagePrompt {
                layers: 9,
                ..good()
            },
            "spec.ip_adapters[0].layers",
        ),
    ];
    for (prompt, field) in refused {
        server
            .assert_invalid(field, spec(vec![prompt]), &[field])
            .await;
    }
    let status = server
        .images(spec(vec![good(); 5]))
        .await
        .expect_err("5 prompts");
    assert_eq!(
        violated_fields(&status),
        vec!["spec.ip_adapters".to_string()]
    );
    for prompt in [
        pb::ImagePrompt {
            adapter: "tiny2/ip_adapters/absent".into(),
            ..good()
        },
        pb::ImagePrompt {
            image_encoder: "absent".into(),
            ..good()
        },
    ] {
        let status = server
            .images(spec(vec![prompt]))
            .await
            .expect_err("unknown");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    // Adapters that do not fit: another encoder, another UNet, a file that is not one.
    let misfits = [
        (
            pb::ImagePrompt {
                image_encoder: "vision_h".into(),
                ..good()
            },
            "image encoder `vision_h`",
        ),
        (
            pb::ImagePrompt {
                adapter: "tiny3/ip_adapters/ip_basic".into(),
                ..good()
            },
            "cannot condition the base model",
        ),
        (
            pb::ImagePrompt {
                adapter: "not_an_adapter".into(),
                ..good()
            },
            "not an IP-Adapter",
        ),
    ];
    for (prompt, says) in misfits {
        let status = server.images(spec(vec![prompt])).await.expect_err(says);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
        assert!(
            !status
                .message()
                .contains(extra.path().to_str().expect("utf-8")),
            "the message shows a server path: {status:?}"
        );
    }
    // Listed with what they read and what they are; loadable; the server still serves.
    let adapters = server.list_models(pb::ModelKind::IpAdapter).await;
    let info = |name: &str| {
        let model = adapters.iter().find(|m| m.name == name).expect(name);
        model.ip_adapter.clone().expect("ip_adapter info")
    };
    let basic = info("tiny2/ip_adapters/ip_basic");
    assert_eq!(
        (
            basic.kind.as_str(),
            basic.tokens,
            basic.reads_width,
            basic.cross_attention_dim,
            basic.layers
        ),
        ("plain", 4, 24, 64, 12)
    );
    let plus = info("tiny3/ip_adapters/ip_plus");
    assert_eq!(
        (
            plus.kind.as_str(),
            plus.tokens,
            plus.reads_width,
            plus.cross_attention_dim
        ),
        ("plus", 5, 48, 96)
    );
    // The encoders' weights under the same root are not adapters.
    assert!(
        adapters.iter().all(|m| !m.name.starts_with("encoders/")),
        "{:?}",
        adapters.iter().map(|m| &m.name).collect::<Vec<_>>()
    );
    let foreign = info("not_an_adapter").error;
    assert!(foreign.contains("not an IP-Adapter"), "{foreign}");
    assert!(
        !foreign.contains(extra.path().to_str().expect("utf-8")),
        "{foreign}"
    );
    let encoders = server.list_models(pb::ModelKind::ImageEncoder).await;
    let vision_h = encoders
        .iter()
        .find(|m| m.name == "vision_h")
        .expect("vision_h");
    let encoder_info = vision_h.image_encoder.clone().expect("image_encoder info");
    assert_eq!(
        (
            encoder_info.image_size,
            encoder_info.hidden_size,
            encoder_info.projection_dim
        ),
        (64, 48, 40)
    );
    let mut models = server.models().await;
    for (name, kind) in [
        ("tiny2/ip_adapters/ip_plus", pb::ModelKind::IpAdapter),
        ("vision_h", pb::ModelKind::ImageEncoder),
    ] {
        let loaded = models
            .load_model(pb::LoadModelRequest {
                name: name.into(),
                kind: kind as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
            .into_inner();
        assert!(
            loaded.model.is_some_and(|m| m.resident),
            "{name} is resident after loading"
        );
    }
    server
        .images(spec(vec![good()]))
        .await
        .expect("a good image prompt after the bad ones");
}

/// The refiner (another UNet, which no adapter fits) runs without the image prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_prompts_leave_the_refiner_alone() {
    let extra = tempfile::tempdir().expect("tempdir");
    let server = server(extra.path()).await;
    let refined = pb::GenerationSpec {
        refiner: Some(pb::RefinerStage {
            model: "tiny2/refiner".into(),
            mode: pb::RefinerMode::EnsembleOfExperts as i32,
            high_noise_fraction: Some(0.5),
            ..Default::default()
        }),
        ..spec_of("tiny2", &cases("tiny2")[0])
    };
    let done = server.images(refined).await.expect("with a refiner");
    assert_eq!(done.images.len(), 1);
}

/// `sdxld generate --ip-adapter FILE,ENCODER,IMAGE,scale=S` runs the recorded first case;
/// a scale out of range is refused naming the flag.
#[test]
fn image_prompts_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny2")[0];
    assert_eq!(case["adapters"][0][0], "ip_basic");
    let root = ip_adapter_fixtures();
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("prompted.png");
    let run = |scale: &str| {
        let prompt = format!(
            "{},{},{},scale={scale}",
            root.join("tiny2/ip_adapters/ip_basic.safetensors")
                .display(),
            root.join("encoders/vision_g").display(),
            root.join("images/lighthouse.png").display(),
        );
        sdxld("generate")
            .flag("--model", fixtures().join("tiny2/pipeline"))
            .flag("--ip-adapter", prompt)
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args([
                "--negative-prompt",
                case["negative_prompt"].as_str().expect("negative"),
            ])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--steps",
                &case["steps"].to_string(),
            ])
            .flag("--output", &png)
    };
    run("0.8").succeeds();
    let reference = read_tensors(&root.join("tiny2/cases.safetensors"));
    let got = common::image_file(&png);
    assert_images_match("CLI image prompt", &got, &reference["ip_0.images"].get(0));
    let message = run("3").fails();
    assert!(
        message.contains("--ip-adapter") && message.contains("scale"),
        "{message}"
    );
}
