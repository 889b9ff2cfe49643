//! Regional image prompts (`ImagePrompt.masks`) against diffusers' `ip_adapter_masks`
//! (`tests/fixtures/make_ip_mask_fixtures.py`): masks of other sizes, aspect ratios and
//! colours prepared as `IPAdapterMaskProcessor.preprocess` prepares them (exactly) and
//! downsampled to layers' query counts as its `downsample` does; over gRPC images within
//! two levels and latents within 1e-3 on both tiny pipelines (one image in half the
//! picture, two subjects of one adapter in two halves at 64x96 with two images per
//! prompt, a masked adapter beside an unmasked one, no guidance, a hires pass with the
//! masks prepared at its size, inpainting only the masked area with the prompt's mask cut
//! as the image is, InstantStyle's style layer);
//! the masks matter and the PNG parameters say so; refusals name their fields; the CLI's
//! `mask=`.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use common::server::TestServer;
use common::{fixtures, ip_adapter_fixtures, ip_mask_fixtures, read_tensors};
use sdxld::engine::ip_adapter::mask::output_mask;
use sdxld::engine::models::region::downsample;
use sdxld::proto::v1 as pb;
use serde_json::Value;
use tch::Tensor;

fn cases(config: &str) -> Vec<Value> {
    let path = ip_mask_fixtures().join(config).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The encoder each adapter of the IP-Adapter fixtures reads.
fn encoder_of(adapter: &str) -> &'static str {
    match adapter {
        "ip_basic" => "vision_g",
        _ => "vision_h",
    }
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let number = |k: &str| case[k].as_u64().expect("a number") as u32;
    let images = ip_adapter_fixtures().join("images");
    let masks = ip_mask_fixtures().join("masks");
    let files = |a: &Value, key: &str, dir: &Path| -> Vec<Vec<u8>> {
        let names = a[key].as_array().map(Vec::as_slice).unwrap_or_default();
        let name = |n: &Value| format!("{}.png", n.as_str().expect("a name"));
        names.iter().map(|n| read(&dir.join(name(n)))).collect()
    };
    let ip_adapters = case["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| {
            let name = a["name"].as_str().expect("name");
            pb::ImagePrompt {
                adapter: format!("{config}/ip_adapters/{name}"),
                image_encoder: encoder_of(name).into(),
                images: files(a, "images", &images),
                masks: files(a, "masks", &masks),
                scale: a["scale"].as_f64().map(|s| s as f32),
                layers: if a["style"].as_bool() == Some(true) {
                    pb::ImagePromptLayers::Style as i32
                } else {
                    0
                },
            }
        })
        .collect();
    let init = |name: &str| read(&fixtures().join(config).join(name));
    let init_image = case["padding_mask_crop"].as_u64().map(|pad| pb::InitImage {
        image: init("init.png"),
        mask: init("mask.png"),
        strength: case["strength"].as_f64().map(|s| s as f32),
        padding_mask_crop: Some(pad as u32),
        ..Default::default()
    });
    let hires = case["hires_scale"].as_f64().map(|scale| pb::HiresPass {
        scale: Some(scale as f32),
        steps: number("hires_steps"),
        strength: case["hires_strength"].as_f64().map(|s| s as f32),
        ..Default::default()
    });
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        init_image,
        hires,
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps: number("steps"),
        num_images: number("n"),
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        width: number("width"),
        height: number("height"),
        scheduler: pb::Scheduler::Euler as i32,
        ip_adapters,
        ..Default::default()
    }
}

async fn server() -> TestServer {
    let root = ip_adapter_fixtures();
    let encoders = root.join("encoders");
    TestServer::with_pipelines(&[
        (
            "SDXLD__MODELS__IP_ADAPTER_ROOTS",
            root.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__IMAGE_ENCODER_ROOTS",
            encoders.to_str().expect("utf-8"),
        ),
    ])
    .await
}

fn masks_reference() -> HashMap<String, Tensor> {
    read_tensors(&ip_mask_fixtures().join("masks.safetensors"))
}

#[test]
fn masks_are_prepared_and_downsampled_as_diffusers_does() {
    let reference = masks_reference();
    let mut compared = (0, 0);
    for (key, expected) in &reference {
        let parts: Vec<&str> = key.split('.').collect();
        let size = |s: &str| -> (u32, u32) {
            let (w, h) = s.split_once('x').expect("WxH");
            (w.parse().expect("w"), h.parse().expect("h"))
        };
        let mask_at = |name: &str, (w, h): (u32, u32)| {
            let file = ip_mask_fixtures().join(format!("masks/{name}.png"));
            let rgb = image::open(&file).expect("a mask").to_rgb8();
            output_mask(&rgb, w, h)
        };
        match parts.as_slice() {
            ["down", at, queries] => {
                let prepared = mask_at("ellipse", size(at));
                let got = downsample(&prepared, queries.parse().expect("queries"));
                let diff = (got.reshape([-1]) - expected).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{key}: off by {diff}");
                compared.1 += 1;
            }
            [name, at] => {
                let got = mask_at(name, size(at)).squeeze_dim(0);
                assert!(got.equal(expected), "{key}: the prepared mask differs");
                compared.0 += 1;
            }
            _ => panic!("unexpected key {key}"),
        }
    }
    assert_eq!(compared.0, 8 * 4, "prepared masks");
    assert!(compared.1 >= 28, "downsamples: {}", compared.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regional_image_prompts_match_diffusers() {
    let server = server().await;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&ip_mask_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let key = case["name"].as_str().expect("name");
            let spec = spec_of(config, &case);
            server
                .assert_matches_case(&format!("{config} {key}"), spec, &reference, key)
                .await;
        }
    }
    // The masks matter, and the parameters say the prompt was regional.
    let with = spec_of("tiny2", &cases("tiny2")[0]);
    let mut without = with.clone();
    without.ip_adapters[0].masks.clear();
    server
        .assert_entry_and_effect("image prompt masks", with, without, ", Masks: 1\"")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_prompt_mask_refusals_name_their_fields() {
    let server = server().await;
    let spec = spec_of("tiny2", &cases("tiny2")[1]);
    let mut one_short = spec.clone();
    one_short.ip_adapters[0].masks.pop();
    let field = "spec.ip_adapters[0].masks";
    server
        .assert_invalid("a mask short", one_short, &[field])
        .await;
    let mut broken = spec.clone();
    broken.ip_adapters[0].masks[1] = b"not an image".to_vec();
    let field = "spec.ip_adapters[0].masks[1]";
    server
        .assert_invalid("an undecodable mask", broken, &[field])
        .await;
    let mut empty = spec.clone();
    empty.ip_adapters[0].masks[0].clear();
    let field = "spec.ip_adapters[0].masks[0]";
    server
        .assert_invalid("an empty mask", empty, &[field])
        .await;
    // The server serves on.
    let done = server.images(spec).await.expect("after the refusals");
    assert_eq!(done.images.len(), 2);
}

/// `sdxld generate --ip-adapter FILE,ENCODER,IMAGE,mask=MASK,scale=S` runs the recorded
/// first case; a mask without its image is refused naming the flag.
#[test]
fn regional_image_prompts_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny2")[0];
    let root = ip_adapter_fixtures();
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("regional.png");
    let run = |mask: &str| {
        let prompt = format!(
            "{},{},{},{mask}scale=1.0",
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
            .args(["--seed", &case["seed"].to_string()])
            .args(["--steps", &case["steps"].to_string()])
            .flag("--output", &png)
    };
    let mask = ip_mask_fixtures().join("masks/left.png");
    run(&format!("mask={},", mask.display())).succeeds();
    let reference = read_tensors(&ip_mask_fixtures().join("tiny2/cases.safetensors"));
    common::assert_images_match(
        "CLI regional image prompt",
        &common::image_file(&png),
        &reference["regional_0.images"].get(0),
    );
    let twice = format!("mask={},mask={},", mask.display(), mask.display());
    let message = run(&twice).fails();
    assert!(
        message.contains("--ip-adapter") && message.contains("mask"),
        "{message}"
    );
}
