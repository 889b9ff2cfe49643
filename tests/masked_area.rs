//! Inpainting only the masked area against diffusers' `padding_mask_crop`
//! (`tests/fixtures/make_masked_area_fixtures.py`): the crop regions
//! `get_crop_region` finds for seven masks, paddings and generation sizes; the
//! paste-back (`apply_overlay`) byte for byte with soft and hard masks; over gRPC the
//! 100×76 results (images within two levels, latents of the cropped area within 1e-3) on
//! the 4-channel tiny2 UNet (blurred mask, padding 6; 64×80, no blur, strength 1)
//! and tiny3's 9-channel inpainting UNet, with ControlNet units too (one or two units, a
//! window; their maps cut and fitted equal to diffusers' byte for byte), and with the
//! refiner (ensemble of experts after the 9-channel base, img2img after the 4-channel
//! one); the PNG parameters; refusals naming their fields; the CLI flag.

use crate::common;

use std::path::Path;

use common::server::TestServer;
use common::{controlnet_fixtures, decoded_image, fixtures, masked_area_fixtures, read_tensors};
use image::RgbImage;
use sdxld::engine::inpaint_area::{crop_region, paste_back, CropRegion, PasteBack};
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn json(path: &Path) -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json")).expect("json")
}

fn rgb(path: &Path) -> RgbImage {
    image::open(path).expect("an image").to_rgb8()
}

fn luminance(path: &Path) -> (Vec<u8>, (u32, u32)) {
    let grey = image::open(path).expect("a mask").to_luma8();
    let dims = grey.dimensions();
    (grey.into_raw(), dims)
}

fn region_of(v: &Value) -> CropRegion {
    let side = |i: usize| v[i].as_u64().expect("a side") as u32;
    CropRegion {
        x1: side(0),
        y1: side(1),
        x2: side(2),
        y2: side(3),
    }
}

#[test]
fn crop_regions_match_diffusers() {
    let root = masked_area_fixtures();
    for record in json(&root.join("regions.json")) {
        let (mask, dims) = luminance(&root.join(record["mask"].as_str().expect("mask")));
        let size = |k: &str| record[k].as_u64().expect("size") as u32;
        let pad = size("padding");
        let region = crop_region(&mask, dims, (size("width"), size("height")), pad);
        assert_eq!(region, Some(region_of(&record["region"])), "{record}");
    }
}

#[test]
fn paste_back_matches_diffusers_apply_overlay_bit_for_bit() {
    let dir = masked_area_fixtures().join("overlay");
    for record in json(&masked_area_fixtures().join("overlays.json")) {
        let k = record["case"].as_u64().expect("case");
        let file = |name: &str| dir.join(format!("{k}_{name}.png"));
        let back = PasteBack {
            original: rgb(&file("original")),
            mask: luminance(&file("mask")).0,
            region: region_of(&record["region"]),
            padding: 0,
        };
        let got = paste_back(&back, &rgb(&file("generated")));
        let expected = rgb(&file("result"));
        assert_eq!(got.dimensions(), expected.dimensions(), "case {k}");
        let worst = got
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert_eq!(worst, Some(0), "case {k}: a channel differs");
    }
}

async fn server() -> TestServer {
    let controlnets = controlnet_fixtures();
    TestServer::with_pipelines(&[(
        "SDXLD__MODELS__CONTROLNET_ROOTS",
        controlnets.to_str().expect("utf-8"),
    )])
    .await
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let root = masked_area_fixtures();
    let number = |k: &str| case[k].as_u64().expect("a number") as u32;
    pb::GenerationSpec {
        model: format!("{config}/{}", case["pipeline"].as_str().expect("pipeline")),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        seed: case["seed"].as_u64(),
        steps: number("steps"),
        width: number("width"),
        height: number("height"),
        scheduler: pb::Scheduler::Euler as i32,
        init_image: Some(pb::InitImage {
            image: read(&root.join("original.png")),
            mask: read(&root.join("mask.png")),
            mask_blur: number("blur"),
            strength: case["strength"].as_f64().map(|s| s as f32),
            padding_mask_crop: Some(number("padding")),
            ..Default::default()
        }),
        controlnets: units_of(config, case),
        refiner: refiner_of(config, case),
        ..Default::default()
    }
}

/// A recorded case's refiner stage (none for most cases).
fn refiner_of(config: &str, case: &Value) -> Option<pb::RefinerStage> {
    let refiner = case.get("refiner")?;
    let number = |k: &str| refiner[k].as_f64().map(|v| v as f32);
    let ensemble = refiner["mode"] == "ensemble";
    Some(pb::RefinerStage {
        model: format!("{config}/refiner"),
        mode: if ensemble {
            pb::RefinerMode::EnsembleOfExperts as i32
        } else {
            pb::RefinerMode::Img2img as i32
        },
        high_noise_fraction: number("fraction"),
        strength: number("strength"),
        steps: refiner["steps"].as_u64().expect("steps") as u32,
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    })
}

/// A recorded case's ControlNet units (none for most cases).
fn units_of(config: &str, case: &Value) -> Vec<pb::ControlNetUnit> {
    let units = case["units"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    units
        .iter()
        .map(|unit| {
            let number = |k: &str, default: f64| unit[k].as_f64().unwrap_or(default) as f32;
            pb::ControlNetUnit {
                model: format!("{config}/{}", unit["model"].as_str().expect("model")),
                image: read(&masked_area_fixtures().join(unit["image"].as_str().expect("image"))),
                conditioning_scale: Some(number("scale", 1.0)),
                guidance_start: number("start", 0.0),
                guidance_end: Some(number("end", 1.0)),
                ..Default::default()
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_area_inpainting_matches_diffusers() {
    let server = server().await;
    for config in ["tiny2", "tiny3"] {
        let dir = masked_area_fixtures().join(config);
        let reference = read_tensors(&dir.join("cases.safetensors"));
        for case in json(&dir.join("cases.json")) {
            let key = case["name"].as_str().expect("name");
            let name = format!("{config} {key}");
            server
                .assert_matches_case(&name, spec_of(config, &case), &reference, key)
                .await;
        }
    }
    let spec = spec_of(
        "tiny2",
        &json(&masked_area_fixtures().join("tiny2/cases.json"))[0],
    );
    let done = server.images(spec).await.expect("masked area");
    let image = &done.images[0];
    assert_eq!((image.width, image.height), (100, 76));
    let parameters = common::png_parameters(&image.data);
    assert!(
        parameters.contains("Inpaint area: Only masked, Masked area padding: 6"),
        "{parameters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_area_refusals_name_their_fields() {
    let server = server().await;
    let root = masked_area_fixtures();
    let case = &json(&root.join("tiny2/cases.json"))[0];
    let with_init = |init: pb::InitImage| pb::GenerationSpec {
        init_image: Some(pb::InitImage {
            image: read(&root.join("original.png")),
            ..init
        }),
        ..spec_of("tiny2", case)
    };
    let black = {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(100, 76)
            .write_to(&mut png, image::ImageFormat::Png)
            .expect("png");
        png.into_inner()
    };
    for (init, field) in [
        (
            pb::InitImage {
                padding_mask_crop: Some(4),
                ..Default::default()
            },
            "spec.init_image.padding_mask_crop",
        ),
        (
            pb::InitImage {
                mask: read(&root.join("mask.png")),
                padding_mask_crop: Some(5000),
                ..Default::default()
            },
            "spec.init_image.padding_mask_crop",
        ),
        (
            pb::InitImage {
                mask: black,
                padding_mask_crop: Some(4),
                ..Default::default()
            },
            "spec.init_image.mask",
        ),
    ] {
        server
            .assert_invalid(field, with_init(init), &[field])
            .await;
    }
    let mut resized = spec_of("tiny2", &json(&root.join("tiny2/cases.json"))[2]);
    resized.controlnets[0].resize_mode = pb::ResizeMode::CropAndResize as i32;
    let field = "spec.controlnets[0].resize_mode";
    server.assert_invalid(field, resized, &[field]).await;
    // The server serves on.
    let done = server.images(spec_of("tiny2", case)).await.expect("after");
    assert_eq!(done.images.len(), 1);
}

/// The ControlNet cases' maps come back cut at the masked area and fitted as diffusers'
/// control image processor makes them, byte for byte; the PNG parameters say how.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_area_control_maps_match_diffusers() {
    let server = server().await;
    let mut checked = 0;
    for config in ["tiny2", "tiny3"] {
        let dir = masked_area_fixtures().join(config);
        let reference = read_tensors(&dir.join("cases.safetensors"));
        for case in json(&dir.join("cases.json")) {
            let key = case["name"].as_str().expect("name");
            let Some(expected) = reference.get(&format!("{key}.control_maps")) else {
                continue;
            };
            let mut spec = spec_of(config, &case);
            spec.output = Some(pb::OutputOptions {
                return_control_maps: true,
                ..Default::default()
            });
            let done = server.images(spec).await.expect("control maps");
            assert_eq!(done.control_maps.len() as i64, expected.size()[0], "{key}");
            for (j, map) in done.control_maps.iter().enumerate() {
                assert_eq!(map.unit_index, j as u32);
                let got = decoded_image(&map.data);
                assert!(
                    got.equal(&expected.get(j as i64)),
                    "{config} {key}: control map {j} differs from diffusers'"
                );
            }
            let parameters = common::png_parameters(&done.images[0].data);
            assert!(
                parameters.contains("Resize Mode: Resize and Fill"),
                "{parameters}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "the ControlNet cases");
}

/// `sdxld generate --padding-mask-crop` runs tiny2's first case; the flag without a mask
/// is refused naming it.
#[test]
fn masked_area_over_the_cli_matches_diffusers() {
    use common::cli::sdxld;

    let root = masked_area_fixtures();
    let case = &json(&root.join("tiny2/cases.json"))[0];
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("masked.png");
    let run = |with_mask: bool| {
        let command = sdxld("generate")
            .flag("--model", fixtures().join("tiny2/pipeline"))
            .flag("--init-image", root.join("original.png"))
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args(["--seed", &case["seed"].to_string()])
            .args(["--steps", &case["steps"].to_string()])
            .args(["--strength", &case["strength"].to_string()])
            .args(["--padding-mask-crop", &case["padding"].to_string()])
            .flag("--output", &png);
        if with_mask {
            command
                .flag("--mask", root.join("mask.png"))
                .args(["--mask-blur", &case["blur"].to_string()])
        } else {
            command
        }
    };
    run(true).succeeds();
    let reference = read_tensors(&root.join("tiny2/cases.safetensors"));
    common::assert_images_match(
        "CLI masked area",
        &common::image_file(&png),
        &reference["masked_0.images"].get(0),
    );
    let message = run(false).fails();
    assert!(message.contains("--padding-mask-crop"), "{message}");
}
