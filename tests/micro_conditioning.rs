//! SDXL's micro-conditioning against diffusers (`tests/fixtures/make_micro_fixtures.py`)
//! over gRPC: images within two levels and latents within 1e-3 on both tiny pipelines for
//! original size, crop and target size with one image, negative sizes and crops with two
//! and three images (each image as diffusers makes it alone with seed + i: plain, with
//! perturbed-attention guidance and with a ControlNet), and image to image and inpainting
//! with negative sizes (paired with the positive crop).

use crate::common;

use common::server::TestServer;
use common::{controlnet_fixtures, fixtures, micro_fixtures, read_tensors};
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn cases(config: &str) -> Vec<Value> {
    let path = micro_fixtures().join(config).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json")
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A diffusers (height, width) pair as a size.
fn size(value: &Value) -> Option<pb::Size> {
    let pair = value.as_array()?;
    Some(pb::Size {
        height: pair[0].as_u64()? as u32,
        width: pair[1].as_u64()? as u32,
    })
}

/// A diffusers (top, left) pair as a point.
fn point(value: &Value) -> Option<pb::Point> {
    let pair = value.as_array()?;
    Some(pb::Point {
        y: pair[0].as_u64()? as u32,
        x: pair[1].as_u64()? as u32,
    })
}

fn micro_of(case: &Value) -> pb::MicroConditioning {
    let m = &case["micro"];
    pb::MicroConditioning {
        original_size: size(&m["original_size"]),
        crop_top_left: point(&m["crops_coords_top_left"]),
        target_size: size(&m["target_size"]),
        negative_original_size: size(&m["negative_original_size"]),
        negative_crop_top_left: point(&m["negative_crops_coords_top_left"]),
        negative_target_size: size(&m["negative_target_size"]),
        ..Default::default()
    }
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let dir = fixtures().join(config);
    let kind = case["kind"].as_str().expect("kind");
    let number = |key: &str| case[key].as_u64().unwrap_or_else(|| panic!("{key}")) as u32;
    let init_image = matches!(kind, "img2img" | "inpaint").then(|| pb::InitImage {
        image: read(&dir.join("init.png")),
        mask: if kind == "inpaint" {
            read(&dir.join("mask.png"))
        } else {
            Vec::new()
        },
        strength: case["strength"].as_f64().map(|s| s as f32),
        ..Default::default()
    });
    let controlnets = (kind == "controlnet")
        .then(|| pb::ControlNetUnit {
            model: format!("{config}/from_unet"),
            image: read(&controlnet_fixtures().join(config).join("control_a.png")),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let pag = (kind == "pag").then(|| pb::PerturbedAttentionGuidance {
        scale: Some(3.0),
        layers: vec!["mid".into()],
        ..Default::default()
    });
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps: number("steps"),
        num_images: number("n"),
        width: number("width"),
        height: number("height"),
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        scheduler: pb::Scheduler::Euler as i32,
        micro_conditioning: Some(micro_of(case)),
        init_image,
        controlnets,
        pag,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_conditioning_matches_diffusers() {
    let controlnets = controlnet_fixtures();
    let server = TestServer::with_pipelines(&[(
        "SDXLD__MODELS__CONTROLNET_ROOTS",
        controlnets.to_str().expect("utf-8"),
    )])
    .await;
    let mut checked = 0;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&micro_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let key = case["name"].as_str().expect("name");
            let name = format!("{config} {key} {}", case["kind"]);
            server
                .assert_matches_case(&name, spec_of(config, &case), &reference, key)
                .await;
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}
