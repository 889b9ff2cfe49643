//! The hires pass (A1111's "Hires. fix") equals diffusers' two-pipeline recipe on the
//! tiny pipelines: latents interpolated (nearest, nearest-exact, bilinear, bicubic) or
//! the image through an upscaler model (one pass, or a larger one and Pillow's Lanczos
//! down), then image to image at the final size with the generator continuing (a
//! stochastic second pass shows it), another scheduler, guidance on or off, scales that
//! round to whole latents; a refiner stage after the hires pass; the hires pass's own
//! prompts, which the refiner after it reads too. Over the engine and over gRPC, with
//! progress, sizes and metadata (refused passes: `hires_refusals.rs`; the hires prompt
//! over gRPC: `hires_prompts.rs`).

use crate::common;

use common::server::{drain, TestServer};
use common::{
    assert_close, assert_images_match, hires_fixtures, read_tensors, wire_scheduler, Case, CONFIGS,
};
use sdxld::engine::hires::{
    generate_hires, Enlarge, HiresParams, LatentInterpolation, PassPrompts,
};
use sdxld::engine::pipeline::{Placement, SdxlPipeline};
use sdxld::engine::upscale::tiles::TilePlan;
use sdxld::engine::upscale::Upscaler;
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generate_response::Event;
use tch::{Device, Kind};

pub(crate) fn cases(config: &str) -> Vec<Case> {
    let cases = common::cases_at(&hires_fixtures().join(config).join("cases.json"));
    assert!(!cases.is_empty(), "{config} has hires cases");
    cases
}

fn hires_params(case: &Case) -> HiresParams {
    let enlarge = match case["hires_latent"].as_str() {
        Some(mode) => Enlarge::Latent(match mode {
            "nearest" => LatentInterpolation::Nearest,
            "nearest-exact" => LatentInterpolation::NearestExact,
            "bilinear" => LatentInterpolation::Bilinear,
            "bicubic" => LatentInterpolation::Bicubic,
            other => panic!("unknown interpolation {other}"),
        }),
        None => Enlarge::Model(TilePlan {
            side: None,
            pad: 10,
            overlap: None,
        }),
    };
    let key = if case["hires_scheduler"].is_string() {
        "hires_scheduler"
    } else {
        "scheduler"
    };
    HiresParams {
        width: case.int("final_width") as i64,
        height: case.int("final_height") as i64,
        steps: case.int("hires_steps") as usize,
        strength: case.float("hires_strength"),
        guidance_scale: case["hires_guidance"].as_f64().unwrap_or(5.0),
        scheduler_overrides: case.scheduler(key),
        enlarge,
        prompts: pass_prompts(case),
    }
}

/// A case's hires prompts (each falling back to the first pass's), when it has any.
pub(crate) fn pass_prompts(case: &Case) -> Option<PassPrompts> {
    let own = ["hires_prompt", "hires_prompt_2", "hires_negative_prompt"];
    if own.iter().all(|key| case[*key].is_null()) {
        return None;
    }
    let text = |key: &str, first: &str| {
        case[key]
            .as_str()
            .or(case[first].as_str())
            .map(str::to_string)
    };
    Some(PassPrompts {
        prompt: text("hires_prompt", "prompt").expect("a prompt"),
        prompt_2: text("hires_prompt_2", "prompt_2"),
        negative_prompt: text("hires_negative_prompt", "negative_prompt"),
        negative_prompt_2: None,
    })
}

/// A case's texts as a request gives them: the first pass's in `spec`, the hires
/// pass's own in `hires`.
pub(crate) fn with_texts(case: &Case, mut spec: pb::GenerationSpec) -> pb::GenerationSpec {
    let text = |key: &str| case[key].as_str().map(str::to_string);
    spec.prompt_2 = text("prompt_2");
    spec.negative_prompt = text("negative_prompt");
    if let Some(hires) = spec.hires.as_mut() {
        hires.prompt = text("hires_prompt");
        hires.prompt_2 = text("hires_prompt_2");
        hires.negative_prompt = text("hires_negative_prompt");
    }
    spec
}

fn upscaler(case: &Case) -> Option<Upscaler> {
    let name = case["hires_upscaler"].as_str()?;
    let path = hires_fixtures()
        .join("upscalers")
        .join(format!("{name}.safetensors"));
    Some(Upscaler::load(&path, Device::Cpu, Kind::Float).expect("upscaler"))
}

#[test]
fn hires_pass_matches_diffusers_two_pipeline_recipe() {
    let pipelines = common::fixtures();
    for config in CONFIGS {
        let base = SdxlPipeline::load(&pipelines.join(config).join("pipeline"), Placement::cpu())
            .expect("base");
        let own = SdxlPipeline::load(&hires_model_dir(config), Placement::cpu()).expect("own");
        let reference = read_tensors(&hires_fixtures().join(config).join("cases.safetensors"));
        // Cases with a refiner or LoRAs are composed by the stage runner: see the gRPC
        // tests.
        for case in cases(config)
            .into_iter()
            .filter(|c| !c["refiner_mode"].is_string() && !c["loras"].is_array())
        {
            let what = format!("{config} {}", case.name());
            let h = hires_params(&case);
            let mut p = case.params();
            if let Some(strength) = case["init_strength"].as_f64() {
                p.init_image = Some(init_image(config, strength));
            }
            let on_own_model = case["hires_model"].as_bool() == Some(true);
            let second = if on_own_model { &own } else { &base };
            let out = generate_hires(&base, second, upscaler(&case).as_ref(), &p, &h)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            if on_own_model {
                // The other model's weights show: the pass on the base is far off.
                let on_base = generate_hires(&base, &base, upscaler(&case).as_ref(), &p, &h)
                    .unwrap_or_else(|e| panic!("{what} on the base: {e}"));
                let images = &reference[&format!("{}.images", case.name())];
                let off = (on_base.images.to_kind(Kind::Float) - images.to_kind(Kind::Float))
                    .abs()
                    .mean(Kind::Float)
                    .double_value(&[]);
                assert!(off > 5.0, "{what}: the base's pass is {off} levels off");
            }
            let name = case.name();
            let latents = &reference[&format!("{name}.latents")];
            if case["hires_upscaler"] == "hires_aura_sr_x4" {
                // AuraSR's attention rounds a little differently from the reference's
                // (4.5e-7 at most), which flips a few 8-bit pixels of the enlarged image
                // that lie on a rounding boundary (3 of 196,608 in a check); the second
                // pass carries that to about 1e-3 of its latents. Another seed moves
                // them by a tenth.
                let err = common::relative_error(&out.latents, latents);
                assert!(err < 2e-3, "{what} latents: relative error {err:e}");
            } else {
                assert_close(&format!("{what} latents"), &out.latents, latents);
            }
            assert_images_match(
                &format!("{what} images"),
                &out.images,
                &reference[&format!("{name}.images")],
            );
        }
    }
}

/// `config`'s hires model (the hires fixtures' other base model).
pub(crate) fn hires_model_dir(config: &str) -> std::path::PathBuf {
    hires_fixtures()
        .join("models")
        .join(format!("{config}_hires"))
}

/// The pipeline fixtures' init image, entering at `strength`.
fn init_image(config: &str, strength: f64) -> sdxld::engine::request::InitImage {
    let path = common::fixtures().join(config).join("init.png");
    let image = image::open(path).expect("init.png").to_rgb8();
    let (width, height) = image.dimensions();
    sdxld::engine::request::InitImage::new(width, height, image.into_raw(), strength)
}

/// The name the server lists the hires fixtures' upscaler `stem` under.
pub(crate) async fn listed_upscaler(server: &TestServer, stem: &str) -> String {
    server
        .list_models(pb::ModelKind::Upscaler)
        .await
        .into_iter()
        .find(|m| m.name.starts_with(stem))
        .expect("the upscaler is listed")
        .name
}

/// A server on the tiny2 pipeline whose upscaler root holds the hires fixtures' models.
pub(crate) async fn server() -> TestServer {
    let pipeline = common::fixtures().join("tiny2").join("pipeline");
    let upscalers = hires_fixtures().join("upscalers");
    TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipeline.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__UPSCALER_ROOTS",
            upscalers.to_str().expect("utf-8"),
        ),
    ])
    .await
}

/// The request of a tiny2 case over gRPC (Euler first pass at 64x64, guidance 5).
pub(crate) fn spec_of(case: &Case, hires: pb::HiresPass) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: case.text("prompt").into(),
        seed: Some(case.int("seed")),
        steps: case.int("steps") as u32,
        num_images: case.int("n") as u32,
        width: 64,
        height: 64,
        hires: Some(hires),
        ..Default::default()
    }
}

/// The images of a finished stream, checked against a case's reference.
pub(crate) fn check_images(
    what: &str,
    events: &[Event],
    reference: &tch::Tensor,
    size: (u32, u32),
) {
    let images: Vec<&pb::GeneratedImage> = events
        .iter()
        .filter_map(|e| match e {
            Event::Image(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(images.len() as i64, reference.size()[0], "{what}: images");
    for (i, image) in images.iter().enumerate() {
        assert_eq!((image.width, image.height), size, "{what}: size");
        let got = common::decoded_image(&image.data);
        assert_images_match(&format!("{what} image {i}"), &got, &reference.get(i as i64));
    }
}

/// (step, total) of the progress events of `stage` for image 0.
fn progress(events: &[Event], stage: pb::Stage) -> Vec<(u32, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.stage == stage as i32 && p.image_index == 0 => {
                Some((p.step, p.total_steps))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hires_over_grpc_matches_the_recipe_and_reports_its_stages() {
    let server = server().await;
    let mut client = server.generation().await;
    let reference = read_tensors(&hires_fixtures().join("tiny2").join("cases.safetensors"));
    let cases = cases("tiny2");
    let upscaler = listed_upscaler(&server, "hires_rrdb_x2").await;

    // Case 0: bilinear latents at scale 1.5, DPM-Solver++ at strength 0.6 of 5 steps and
    // guidance 7, two images.
    let case = &cases[0];
    let hires = pb::HiresPass {
        scale: Some(1.5),
        latent_upscale: pb::LatentUpscale::Bilinear as i32,
        steps: 5,
        strength: Some(0.6),
        scheduler: pb::Scheduler::DpmSolverMultistep as i32,
        guidance_scale: Some(7.0),
        ..Default::default()
    };
    let request = pb::GenerateRequest {
        spec: Some(spec_of(case, hires)),
    };
    let (messages, end) = drain(client.generate(request).await).await;
    end.expect("the latent hires job completes");
    let events: Vec<Event> = messages.into_iter().filter_map(|m| m.event).collect();
    check_images(
        "latent hires",
        &events,
        &reference["hires_0.images"],
        (96, 96),
    );
    assert_eq!(progress(&events, pb::Stage::HiresUpscaling), vec![(0, 0)]);

    // Case 2: the RRDB x2 upscaler at scale 2, then Euler ancestral at strength 0.7 of 4
    // steps, two images.
    let case = &cases[2];
    let hires = pb::HiresPass {
        scale: Some(2.0),
        upscaler: upscaler.clone(),
        tile_size: 64,
        tile_overlap: Some(0),
        steps: 4,
        strength: Some(0.7),
        scheduler: pb::Scheduler::EulerAncestral as i32,
        ..Default::default()
    };
    let request = pb::GenerateRequest {
        spec: Some(spec_of(case, hires)),
    };
    let (messages, end) = drain(client.generate(request).await).await;
    end.expect("the hires job completes");
    let events: Vec<Event> = messages.into_iter().filter_map(|m| m.event).collect();
    check_images(
        "upscaler hires",
        &events,
        &reference["hires_2.images"],
        (128, 128),
    );
    // A 64-pixel image in 64-pixel tiles is one tile; int(4 x 0.7) = 2 steps.
    assert_eq!(
        progress(&events, pb::Stage::HiresUpscaling),
        vec![(0, 1), (1, 1)]
    );
    assert_eq!(
        progress(&events, pb::Stage::HiresDenoising),
        vec![(0, 2), (1, 2), (2, 2)]
    );
    let Some(Event::Completed(completed)) = events.last() else {
        panic!("no completed event");
    };
    let used = completed
        .models
        .iter()
        .find(|m| m.name == upscaler)
        .expect("the upscaler is among the models used");
    assert_eq!(used.kind, pb::ModelKind::Upscaler as i32);
    assert_eq!(used.sha256.len(), 64);
    let timed: Vec<i32> = completed.stage_timings.iter().map(|t| t.stage).collect();
    for stage in [pb::Stage::HiresUpscaling, pb::Stage::HiresDenoising] {
        assert!(timed.contains(&(stage as i32)), "{stage:?} is timed");
    }
    let Some(Event::Image(first)) = events.iter().find(|e| matches!(e, Event::Image(_))) else {
        panic!("no image");
    };
    let text = common::png_parameters(&first.data);
    for entry in [
        "Size: 64x64".to_string(),
        "Denoising strength: 0.7".to_string(),
        "Hires upscale: 2".to_string(),
        "Hires steps: 4".to_string(),
        format!("Hires upscaler: {upscaler}"),
        "Hires sampler: Euler a".to_string(),
    ] {
        assert!(text.contains(&entry), "the PNG parameters hold `{entry}`");
    }

    // Case 4: after image to image (Euler ancestral at strength 0.6 of 6 steps on the
    // init image), bilinear latents at scale 2, Euler at strength 0.5 of 4 steps.
    let case = &cases[4];
    assert_eq!(case["init_strength"], 0.6);
    let hires = pb::HiresPass {
        scale: Some(2.0),
        latent_upscale: pb::LatentUpscale::Bilinear as i32,
        steps: 4,
        strength: Some(0.5),
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    };
    let mut spec = spec_of(case, hires);
    spec.scheduler = pb::Scheduler::EulerAncestral as i32;
    let init = common::fixtures().join("tiny2").join("init.png");
    spec.init_image = Some(pb::InitImage {
        image: std::fs::read(init).expect("init.png"),
        strength: Some(0.6),
        ..Default::default()
    });
    let request = pb::GenerateRequest { spec: Some(spec) };
    let (messages, end) = drain(client.generate(request).await).await;
    end.expect("hires after image to image completes");
    let events: Vec<Event> = messages.into_iter().filter_map(|m| m.event).collect();
    check_images(
        "hires after image to image",
        &events,
        &reference["hires_4.images"],
        (128, 128),
    );
}

/// `sdxld generate` with the --hires-* flags equals the recipe: the RRDB upscaler case
/// (two images, each its own file), the hires pass handing over to a refiner, and the
/// pass on another model (`--hires-model`); a bad flag is named in the error.
#[test]
fn hires_over_the_cli_matches_the_recipe() {
    use common::cli::sdxld;

    let pipelines = common::fixtures().join("tiny2");
    let reference = read_tensors(&hires_fixtures().join("tiny2").join("cases.safetensors"));
    let cases = cases("tiny2");
    let out = tempfile::tempdir().expect("tempdir");
    let upscaler = hires_fixtures().join("upscalers/hires_rrdb_x2.safetensors");
    let first_pass = |case: &Case, png: &std::path::Path| {
        sdxld("generate")
            .flag("--model", pipelines.join("pipeline"))
            .args([
                "--prompt",
                case.text("prompt"),
                "--width",
                "64",
                "--height",
                "64",
            ])
            .args(["--seed", &case.int("seed").to_string()])
            .args(["--steps", &case.int("steps").to_string()])
            .args(["--num-images", &case.int("n").to_string()])
            .flag("--output", png)
    };

    // Case 2: Euler 5 steps, the RRDB x2 upscaler at scale 2, Euler ancestral at 0.7 of 4.
    let case = &cases[2];
    let png = out.path().join("upscaled.png");
    first_pass(case, &png)
        .args(["--scheduler", "euler", "--hires-scale", "2"])
        .flag("--hires-upscaler", &upscaler)
        .args(["--hires-steps", "4", "--hires-strength", "0.7"])
        .args(["--hires-scheduler", "euler-ancestral"])
        .succeeds();
    let images = &reference["hires_2.images"];
    for (i, file) in ["upscaled.png", "upscaled-1.png"].iter().enumerate() {
        let got = common::image_file(&out.path().join(file));
        assert_images_match(&format!("CLI hires image {i}"), &got, &images.get(i as i64));
    }
    let text = common::png_parameters(&std::fs::read(&png).expect("png"));
    assert!(text.contains("Hires upscaler: hires_rrdb_x2"), "{text}");

    // Case 5: bilinear latents at 1.5, Euler at 0.6 of 6 stopping at 0.8, an Euler
    // refiner of 6 steps from there.
    let case = &cases[5];
    assert_eq!(case["refiner_mode"], "ensemble");
    let png = out.path().join("refined.png");
    first_pass(case, &png)
        .args(["--scheduler", "euler", "--hires-scale", "1.5"])
        .args(["--hires-latent", "bilinear", "--hires-steps", "6"])
        .args(["--hires-strength", "0.6"])
        .flag("--refiner", pipelines.join("refiner"))
        .args(["--high-noise-fraction", "0.8", "--refiner-steps", "6"])
        .args(["--refiner-scheduler", "euler"])
        .succeeds();
    let got = common::image_file(&png);
    assert_images_match(
        "CLI hires then refiner",
        &got,
        &reference["hires_5.images"].get(0),
    );

    // Case 9: Euler 5 steps, bilinear latents at 1.5, DPM++ at 0.6 of 5 on the hires
    // model, two images.
    let case = &cases[9];
    assert_eq!(case["hires_model"], true);
    let png = out.path().join("own-model.png");
    first_pass(case, &png)
        .args(["--scheduler", "euler", "--hires-scale", "1.5"])
        .args(["--hires-latent", "bilinear", "--hires-steps", "5"])
        .args(["--hires-strength", "0.6"])
        .args(["--hires-scheduler", "dpm-solver-multistep"])
        .flag("--hires-model", hires_model_dir("tiny2"))
        .succeeds();
    let images = &reference["hires_9.images"];
    for (i, file) in ["own-model.png", "own-model-1.png"].iter().enumerate() {
        let got = common::image_file(&out.path().join(file));
        let what = format!("CLI hires model image {i}");
        assert_images_match(&what, &got, &images.get(i as i64));
    }
    let text = common::png_parameters(&std::fs::read(&png).expect("png"));
    assert!(text.contains("Hires checkpoint: tiny2_hires ["), "{text}");

    let message = first_pass(case, &png)
        .args(["--hires-size", "100x128"])
        .fails();
    assert!(message.contains("--hires-size"), "{message}");
}

/// The request of a hires case on `config`'s pipeline (and refiner, where the case has a
/// refiner stage) under a server whose base and refiner roots are the pipeline fixtures;
/// its texts are the first pass's prompt only (see [`with_texts`]).
pub(crate) fn spec_of_case(config: &str, case: &Case, upscaler: &str) -> pb::GenerationSpec {
    let scheduler = case.text("scheduler");
    let hires_scheduler = case["hires_scheduler"].as_str().unwrap_or(scheduler);
    let latent = |mode: &str| match mode {
        "nearest" => pb::LatentUpscale::Nearest,
        "nearest-exact" => pb::LatentUpscale::NearestExact,
        "bilinear" => pb::LatentUpscale::Bilinear,
        "bicubic" => pb::LatentUpscale::Bicubic,
        other => panic!("no interpolation {other}"),
    } as i32;
    let refiner = case["refiner_mode"].as_str().map(|mode| pb::RefinerStage {
        model: format!("{config}/refiner"),
        mode: if mode == "ensemble" {
            pb::RefinerMode::EnsembleOfExperts
        } else {
            pb::RefinerMode::Img2img
        } as i32,
        high_noise_fraction: case["refiner_fraction"].as_f64().map(|f| f as f32),
        strength: case["refiner_strength"].as_f64().map(|s| s as f32),
        steps: case.int("refiner_steps") as u32,
        scheduler: wire_scheduler(
            case["refiner_scheduler"]
                .as_str()
                .unwrap_or(hires_scheduler),
        ),
        ..Default::default()
    });
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case.text("prompt").into(),
        seed: Some(case.int("seed")),
        steps: case.int("steps") as u32,
        num_images: case.int("n") as u32,
        width: case["width"].as_u64().unwrap_or(64) as u32,
        height: case["height"].as_u64().unwrap_or(64) as u32,
        scheduler: wire_scheduler(scheduler),
        hires: Some(pb::HiresPass {
            width: case.int("final_width") as u32,
            height: case.int("final_height") as u32,
            latent_upscale: case["hires_latent"].as_str().map_or(0, latent),
            upscaler: case["hires_upscaler"]
                .as_str()
                .map_or(String::new(), |_| upscaler.to_string()),
            steps: case.int("hires_steps") as u32,
            strength: Some(case.float("hires_strength") as f32),
            scheduler: wire_scheduler(hires_scheduler),
            ..Default::default()
        }),
        refiner,
        ..Default::default()
    }
}

/// With a refiner stage the hires pass hands over to it, as A1111 runs its refiner in
/// the second pass by default: diffusers' recipe with the hires pass's img2img pipeline
/// stopping at the high-noise fraction (or running fully before a refiner at a
/// strength) and the refiner continuing its latents at the final size, on both tiny
/// pipelines (latents and an upscaler enlarging; a second-order refiner; two images; a
/// hires pass with its own prompts, which the refiner reads: a prompt and `prompt_2`,
/// or only an empty negative beside the first pass's `prompt_2`). Progress runs
/// denoising, hires upscaling, hires denoising, then refining; the PNG parameters name
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refiner_follows_the_hires_pass_as_the_recipe_runs() {
    let roots = common::fixtures();
    let roots = roots.to_str().expect("utf-8");
    let upscalers = hires_fixtures().join("upscalers");
    let server = TestServer::start(&[
        ("SDXLD__MODELS__BASE_ROOTS", roots),
        ("SDXLD__MODELS__REFINER_ROOTS", roots),
        (
            "SDXLD__MODELS__UPSCALER_ROOTS",
            upscalers.to_str().expect("utf-8"),
        ),
    ])
    .await;
    let upscaler = listed_upscaler(&server, "hires_rrdb_x2").await;
    let mut client = server.generation().await;
    let mut ran = 0;
    for config in CONFIGS {
        let reference = read_tensors(&hires_fixtures().join(config).join("cases.safetensors"));
        // The refiner after a hires model: `hires_model.rs`.
        for case in cases(config)
            .iter()
            .filter(|c| c["refiner_mode"].is_string() && c["hires_model"].is_null())
        {
            let what = format!("{config} {}", case.name());
            let request = pb::GenerateRequest {
                spec: Some(with_texts(case, spec_of_case(config, case, &upscaler))),
            };
            let (messages, end) = drain(client.generate(request).await).await;
            end.unwrap_or_else(|e| panic!("{what}: {e:?}"));
            let events: Vec<Event> = messages.into_iter().filter_map(|m| m.event).collect();
            let size = (
                case.int("final_width") as u32,
                case.int("final_height") as u32,
            );
            let images = &reference[&format!("{}.images", case.name())];
            check_images(&what, &events, images, size);
            let stages: Vec<i32> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Progress(p) if p.image_index == 0 && p.step == 0 => Some(p.stage),
                    _ => None,
                })
                .collect();
            let expected = [
                pb::Stage::Denoising,
                pb::Stage::HiresUpscaling,
                pb::Stage::HiresDenoising,
                pb::Stage::Refining,
            ];
            let position = |stage: pb::Stage| stages.iter().position(|&s| s == stage as i32);
            let order: Vec<Option<usize>> = expected.iter().map(|&s| position(s)).collect();
            assert!(
                order.iter().all(Option::is_some) && order.windows(2).all(|w| w[0] < w[1]),
                "{what}: stages {stages:?}"
            );
            let Some(Event::Image(first)) = events.iter().find(|e| matches!(e, Event::Image(_)))
            else {
                panic!("{what}: no image");
            };
            let text = common::png_parameters(&first.data);
            for entry in ["Hires steps: ", "Refiner: "] {
                assert!(text.contains(entry), "{what}: `{entry}` in {text}");
            }
            ran += 1;
        }
    }
    assert_eq!(ran, 5);

    // A high-noise fraction below the hires pass's entry leaves it nothing to run: 6
    // Euler steps at strength 0.5 enter at 499, so 0.3 (cutoff 700) is refused.
    let case = &cases("tiny2")[5];
    let mut spec = spec_of_case("tiny2", case, &upscaler);
    if let (Some(hires), Some(refiner)) = (spec.hires.as_mut(), spec.refiner.as_mut()) {
        hires.strength = Some(0.5);
        refiner.high_noise_fraction = Some(0.3);
    }
    let refused = server.refused_or_completed("late hand-off", spec).await;
    let refused = refused.expect_err("no step before the hand-off");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "spec.refiner.high_noise_fraction");
    assert!(refused[0].1.contains("hires pass"), "{refused:?}");
}

/// AuraSR as the hires upscaler over gRPC: each image's noise from its own seed, between
/// ancestral passes whose draws from the images' generators go on around it, as the
/// recipe runs it (case 13: Euler ancestral in both passes, two images).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aura_sr_hires_pass_draws_from_each_images_seed() {
    let server = server().await;
    let mut client = server.generation().await;
    let reference = read_tensors(&hires_fixtures().join("tiny2").join("cases.safetensors"));
    let case = &cases("tiny2")[13];
    assert_eq!(case["hires_upscaler"], "hires_aura_sr_x4");
    let hires = pb::HiresPass {
        scale: Some(1.5),
        upscaler: listed_upscaler(&server, "hires_aura_sr_x4").await,
        steps: 4,
        strength: Some(0.6),
        ..Default::default()
    };
    let spec = pb::GenerationSpec {
        scheduler: pb::Scheduler::EulerAncestral as i32,
        ..spec_of(case, hires)
    };
    let request = pb::GenerateRequest { spec: Some(spec) };
    let (messages, end) = drain(client.generate(request).await).await;
    end.expect("the hires job completes");
    let events: Vec<Event> = messages.into_iter().filter_map(|m| m.event).collect();
    check_images(
        "AuraSR hires",
        &events,
        &reference["hires_13.images"],
        (96, 96),
    );
}
