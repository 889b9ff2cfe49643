//! Inpainting equals diffusers' StableDiffusionXLInpaintPipeline, for the base 4-channel
//! UNet (latent blending) and a 9-channel inpainting UNet, on both tiny configurations,
//! and over gRPC; a mask blur equals Pillow's Gaussian blur, as diffusers'
//! `mask_processor.blur` applies it.

use crate::common;

use common::{assert_images_match, cases, fixtures, read_tensors, CONFIGS};
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};

#[test]
fn inpainting_matches_diffusers() {
    let mut failures = Vec::new();
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let base = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
        let nine = SdxlPipeline::load(&dir.join("inpaint_pipeline"), Placement::cpu())
            .expect("load 9-channel");
        let image = std::fs::read(dir.join("init.png")).expect("init.png");
        let mask = std::fs::read(dir.join("mask.png")).expect("mask.png");
        let reference = read_tensors(&dir.join("inpaint.safetensors"));
        let cases = cases(config, "inpaint");
        assert!(cases.len() >= 6);
        for case in cases {
            let name = case.name();
            let pipe = if case["pipeline"] == "inpaint_pipeline" {
                &nine
            } else {
                &base
            };
            let init = common::init_image(&image, case.float("strength"))
                .and_then(|i| common::with_mask(i, &mask))
                .expect("init image and mask");
            let params = GenerateParams {
                init_image: Some(init),
                ..case.params()
            };
            let out = pipe
                .generate(&params)
                .unwrap_or_else(|e| panic!("{config} {name}: {e}"));
            let what = format!(
                "{config} {name} ({} {}, strength {})",
                case["pipeline"], case["scheduler"], case["strength"]
            );
            let err = common::relative_error(&out.latents, &reference[&format!("{name}.latents")]);
            if err.is_nan() || err >= 1e-3 {
                failures.push(format!("{what}: latents relative error {err:e}"));
                continue;
            }
            assert_images_match(
                &format!("{what} images"),
                &out.images,
                &reference[&format!("{name}.images")],
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_inpainting_model_needs_a_mask() {
    let dir = fixtures().join("tiny2");
    let nine = SdxlPipeline::load(&dir.join("inpaint_pipeline"), Placement::cpu()).expect("load");
    let params = GenerateParams {
        prompt: "x".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..GenerateParams::default()
    };
    let err = nine.generate(&params).err().expect("refused");
    assert!(err.to_string().contains("mask"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inpainting_over_grpc_matches_diffusers() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;

    let dir = fixtures().join("tiny3");
    let pipeline = dir.join("inpaint_pipeline");
    let server = TestServer::start(&[(
        "SDXLD__ENGINE__DEFAULT_MODEL",
        pipeline.to_str().expect("utf-8"),
    )])
    .await;
    let reference = read_tensors(&dir.join("inpaint.safetensors"));
    // Case 5: the 9-channel UNet with DPM-Solver++ at strength 0.7, 10 steps, seed 31.
    let case = &cases("tiny3", "inpaint")[5];
    assert_eq!(case["pipeline"], "inpaint_pipeline");
    let spec = pb::GenerationSpec {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        seed: Some(31),
        steps: 10,
        scheduler: pb::Scheduler::DpmSolverMultistep as i32,
        init_image: Some(pb::InitImage {
            image: std::fs::read(dir.join("init.png")).expect("init.png"),
            mask: std::fs::read(dir.join("mask.png")).expect("mask.png"),
            strength: Some(0.7),
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = server.images(spec.clone()).await.expect("inpaint");
    let got = common::decoded_image(&response.images[0].data);
    assert_images_match(
        "gRPC inpainting",
        &got,
        &reference["inpaint_5.images"].get(0),
    );

    // A mask blur of 4 gives the image of the mask blurred first (Pillow's Gaussian blur,
    // equal to it byte for byte by `mask_blur_equals_pillows_gaussian_blur`), not the
    // sharp mask's.
    let mut blurred = spec.clone();
    if let Some(init) = blurred.init_image.as_mut() {
        init.mask_blur = 4;
    }
    let with_blur = server.images(blurred).await.expect("mask blur");
    let mask = image::load_from_memory(&std::fs::read(dir.join("mask.png")).expect("mask"))
        .expect("mask")
        .to_rgb8();
    let (w, h) = mask.dimensions();
    let mut pixels = mask.into_raw();
    sdxld::engine::blur::gaussian_blur(&mut pixels, w as usize, h as usize, 3, 4.0);
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(w, h, pixels)
        .expect("size")
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("png");
    let mut preblurred = spec.clone();
    if let Some(init) = preblurred.init_image.as_mut() {
        init.mask = png.into_inner();
    }
    let reference = server.images(preblurred).await.expect("a blurred mask");
    let pixels =
        |r: &sdxld::proto::v1::GenerateImagesResponse| common::decoded_image(&r.images[0].data);
    assert!(pixels(&with_blur).equal(&pixels(&reference)), "mask_blur");
    let parameters = common::png_parameters(&with_blur.images[0].data);
    assert!(
        parameters.contains(", Denoising strength: 0.7, Mask blur: 4"),
        "{parameters}"
    );
    assert!(!pixels(&with_blur).equal(&got), "the blur changed nothing");

    // Without a mask, or without an init image, the model has no input for its extra
    // channels: refused before admission, naming what is missing.
    let mut unmasked = spec.clone();
    if let Some(init) = unmasked.init_image.as_mut() {
        init.mask.clear();
    }
    let text_only = pb::GenerationSpec {
        init_image: None,
        ..spec.clone()
    };
    for (what, spec, field) in [
        ("no mask", unmasked, "spec.init_image.mask"),
        ("no init image", text_only, "spec.init_image"),
    ] {
        let refused = server.refused_or_completed(what, spec).await;
        let refused = refused.expect_err(what);
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert_eq!(refused[0].0, field, "{what}");
        assert!(refused[0].1.contains("inpainting model"), "{refused:?}");
    }
}

/// `mask_blur` blurs as Pillow's `GaussianBlur` (diffusers' `mask_processor.blur`) byte
/// for byte, on masks, colour images, noise and images smaller than the radius, and the
/// mask the pipeline reads is the blurred image's `convert("L")`.
#[test]
fn mask_blur_equals_pillows_gaussian_blur() {
    use sdxld::engine::blur::gaussian_blur;
    use sdxld::engine::request::InitImage;

    let root = common::preprocess_fixtures();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("blur.json")).expect("read"))
            .expect("json");
    assert_eq!(cases.len(), 56);
    let mut failures = Vec::new();
    for case in &cases {
        let open =
            |key: &str| image::open(root.join(case[key].as_str().expect("path"))).expect("png");
        let radius = case["radius"].as_f64().expect("radius") as f32;
        let input = open("image").to_rgb8();
        let (width, height) = input.dimensions();
        let mut blurred = input.clone().into_raw();
        gaussian_blur(&mut blurred, width as usize, height as usize, 3, radius);
        let expected = open("expected").to_rgb8().into_raw();
        let name = case["expected"].as_str().expect("name");
        let off = blurred
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        if off > 0 {
            failures.push(format!("{name}: {off} of {} bytes differ", expected.len()));
        }
        if radius.fract() == 0.0 {
            let init = InitImage::new(width, height, input.clone().into_raw(), 1.0);
            let mask = init
                .with_blurred_mask_rgb(input.as_raw(), radius as u32)
                .mask;
            let expected_l = open("expected_l").to_luma8().into_raw();
            if mask.as_deref() != Some(expected_l.as_slice()) {
                failures.push(format!("{name}: the mask's luminance differs"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
