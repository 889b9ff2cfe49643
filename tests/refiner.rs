//! The refiner stage equals diffusers' two-pipeline recipe (base with
//! `output_type="latent"`, then StableDiffusionXLImg2ImgPipeline on a tiny refiner with
//! only the second text encoder and aesthetic-score conditioning), in both modes, with
//! first-order, second-order, multistep and stochastic schedulers; a refiner-style model
//! run alone on a picture; the base's img2img entered at `denoising_start`; and the
//! refiner after inpainting (diffusers' inpainting pipelines for both stages, on the
//! 4-channel base and a 9-channel inpainting UNet). Over the engine, the CLI and gRPC.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use common::cli::sdxld;
use common::server::TestServer;
use common::{assert_images_match, cases, fixtures, read_tensors, Case, CONFIGS};
use sdxld::engine::pipeline::{
    GenerateOutput, GenerateParams, Placement, RefinerMode, RefinerParams, SdxlPipeline,
};
use sdxld::engine::refiner::generate_refined;
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generate_response::Event;
use tch::Tensor;
use tokio_stream::StreamExt;

fn refiner_params(case: &Case, base: &GenerateParams) -> RefinerParams {
    let mode = match case["kind"].as_str() {
        Some("ensemble" | "inpaint_ensemble") => RefinerMode::EnsembleOfExperts {
            high_noise_fraction: case["fraction"].as_f64().expect("fraction"),
        },
        _ => RefinerMode::Img2Img {
            strength: case["strength"].as_f64().expect("strength"),
        },
    };
    let mut r = RefinerParams::new(mode, base);
    r.steps = case["refiner_steps"]
        .as_u64()
        .map_or(base.steps, |s| s as usize);
    r.guidance_scale = case["refiner_guidance"].as_f64().unwrap_or(5.0);
    let key = if case["refiner_scheduler"].is_string() {
        "refiner_scheduler"
    } else {
        "scheduler"
    };
    r.scheduler_overrides = case.scheduler(key);
    r.aesthetic_score = base.aesthetic_score;
    r.negative_aesthetic_score = base.negative_aesthetic_score;
    r
}

/// The pipelines and pictures of one configuration's refiner cases.
struct Setup {
    base: SdxlPipeline,
    /// The 9-channel inpainting pipeline.
    inpainter: SdxlPipeline,
    refiner: SdxlPipeline,
    picture: Vec<u8>,
    mask: Vec<u8>,
}

impl Setup {
    fn load(config: &str) -> Self {
        let dir = fixtures().join(config);
        let load = |name: &str| {
            SdxlPipeline::load(&dir.join(name), Placement::cpu())
                .unwrap_or_else(|e| panic!("{config} {name}: {e}"))
        };
        let read = |name: &str| std::fs::read(dir.join(name)).expect("a fixture picture");
        Self {
            base: load("pipeline"),
            inpainter: load("inpaint_pipeline"),
            refiner: load("refiner"),
            picture: read("init.png"),
            mask: read("mask.png"),
        }
    }
}

fn run(setup: &Setup, case: &Case) -> GenerateOutput {
    let (base, refiner, picture) = (&setup.base, &setup.refiner, &setup.picture);
    let mut p = case.params();
    let name = case["name"].as_str().expect("name");
    let result = match case["kind"].as_str().expect("kind") {
        "ensemble" | "img2img" => {
            let r = refiner_params(case, &p);
            generate_refined(base, refiner, &p, &r)
        }
        "inpaint_ensemble" | "inpaint_img2img" => {
            let init = common::init_image(picture, case.float("inpaint_strength"))
                .and_then(|i| common::with_mask(i, &setup.mask))
                .expect("init image and mask");
            p.init_image = Some(init);
            let r = refiner_params(case, &p);
            let base = match case.text("base") {
                "inpaint_pipeline" => &setup.inpainter,
                _ => base,
            };
            generate_refined(base, refiner, &p, &r)
        }
        "refiner_on_image" => {
            let strength = case["strength"].as_f64().expect("strength");
            p.init_image = Some(common::init_image(picture, strength).expect("picture"));
            refiner.generate(&p)
        }
        "denoising_start" => {
            let mut init = common::init_image(picture, 0.3).expect("picture");
            init.denoising_start = case["fraction"].as_f64();
            p.init_image = Some(init);
            base.generate(&p)
        }
        other => panic!("unknown case kind {other}"),
    };
    result.unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn refiner_stage_matches_diffusers() {
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let setup = Setup::load(config);
        let refiner = &setup.refiner;
        assert!(refiner.requires_aesthetics_score() && refiner.text_encoder().is_none());
        let reference = read_tensors(&dir.join("refiner.safetensors"));
        let cases = cases(config, "refiner");
        assert!(cases.len() >= 13);
        for case in &cases {
            let name = case["name"].as_str().expect("name");
            let out = run(&setup, case);
            let what = format!("{config} {name} ({} {})", case["kind"], case["scheduler"]);
            common::assert_matches_case(&what, &out, &reference, name);
        }
    }
}

#[test]
fn a_refiner_does_not_run_from_noise_and_bad_fractions_are_refused() {
    use sdxld::engine::error::EngineError;

    let dir = fixtures().join("tiny2");
    let base = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("base");
    let refiner = SdxlPipeline::load(&dir.join("refiner"), Placement::cpu()).expect("refiner");
    let p = GenerateParams {
        prompt: "x".into(),
        steps: 4,
        width: 64,
        height: 64,
        ..GenerateParams::default()
    };
    let err = refiner.generate(&p).err().expect("refused");
    assert!(matches!(err, EngineError::Incompatible(_)), "{err}");

    for fraction in [0.0, 1.0, -0.5, f64::NAN] {
        let r = RefinerParams::new(
            RefinerMode::EnsembleOfExperts {
                high_noise_fraction: fraction,
            },
            &p,
        );
        let err = generate_refined(&base, &refiner, &p, &r)
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("high_noise_fraction"),
            "{fraction}: {err}"
        );
    }
    let r = RefinerParams::new(RefinerMode::Img2Img { strength: 0.1 }, &p);
    let err = generate_refined(&base, &refiner, &p, &r)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("strength"), "{err}");
}

#[test]
fn refiner_over_the_cli_matches_diffusers() {
    let dir = fixtures().join("tiny3");
    let case = &cases("tiny3", "refiner")[0];
    assert_eq!(case["kind"], "ensemble");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("refined.png");
    sdxld("generate")
        .args(["--width", "64", "--height", "64"])
        .flag("--model", dir.join("pipeline"))
        .flag("--refiner", dir.join("refiner"))
        .args([
            "--prompt",
            case.text("prompt"),
            "--prompt-2",
            case.text("prompt_2"),
        ])
        .args(["--seed", "41", "--steps", "10", "--scheduler", "euler"])
        .args(["--refiner-scheduler", "euler", "--refiner-mode", "ensemble"])
        .args(["--high-noise-fraction", "0.7"])
        .flag("--output", &png)
        .succeeds();
    let got = common::image_file(&png);
    let reference = read_tensors(&dir.join("refiner.safetensors"));
    assert_images_match(
        "CLI ensemble refiner",
        &got,
        &reference["refiner_0.images"].get(0),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refiner_and_denoising_start_over_grpc_match_diffusers() {
    let dir = fixtures().join("tiny2");
    let server = TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            dir.join("pipeline").to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__REFINER_ROOTS", dir.to_str().expect("utf-8")),
        ("SDXLD__MODELS__BASE_ROOTS", dir.to_str().expect("utf-8")),
    ])
    .await;
    let reference = read_tensors(&dir.join("refiner.safetensors"));
    let cases = cases("tiny2", "refiner");
    refined_images_stream_their_steps(&server, &reference, &cases[4]).await;
    for (i, what) in [(6, "gRPC denoising_start"), (5, "gRPC aesthetic scores")] {
        let spec = picture_spec(&cases[i], &dir.join("init.png"));
        let response = server.images(spec).await.expect(what);
        let got = common::decoded_image(&response.images[0].data);
        let expected = reference[&format!("refiner_{i}.images")].get(0);
        assert_images_match(what, &got, &expected);
    }
    refiners_are_chosen_by_kind(&server).await;
}

/// Case 4: img2img mode, Euler base 8 steps, DPM-Solver++ refiner 10 steps at strength
/// 0.3 and guidance 7.5, two images: the refiner's steps streamed, the images equal to
/// the recipe's, and the refiner recorded in the completed event and listed resident.
async fn refined_images_stream_their_steps(
    server: &TestServer,
    reference: &HashMap<String, Tensor>,
    case: &Case,
) {
    assert_eq!(case["kind"], "img2img");
    let spec = pb::GenerationSpec {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        prompt_2: case["prompt_2"].as_str().map(str::to_string),
        seed: Some(41),
        steps: 8,
        num_images: 2,
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        refiner: Some(pb::RefinerStage {
            model: "refiner".into(),
            mode: pb::RefinerMode::Img2img as i32,
            strength: Some(0.3),
            steps: 10,
            scheduler: pb::Scheduler::DpmSolverMultistep as i32,
            guidance_scale: Some(7.5),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = server
        .generation()
        .await
        .generate(pb::GenerateRequest { spec: Some(spec) })
        .await
        .expect("refined")
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.next().await {
        events.extend(message.expect("no error").event);
    }
    let refining: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.stage == pb::Stage::Refining as i32 && p.image_index == 0 => {
                Some((p.step, p.total_steps))
            }
            _ => None,
        })
        .collect();
    // int(10 x 0.3) = 3 refiner steps, step 0 marking the start.
    assert_eq!(refining, vec![(0, 3), (1, 3), (2, 3), (3, 3)]);
    let images: Vec<&pb::GeneratedImage> = events
        .iter()
        .filter_map(|e| match e {
            Event::Image(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(images.len(), 2);
    for (i, image) in images.iter().enumerate() {
        let got = common::decoded_image(&image.data);
        assert_images_match(
            &format!("gRPC refiner image {i}"),
            &got,
            &reference["refiner_4.images"].get(i as i64),
        );
    }
    let Some(Event::Completed(completed)) = events.last() else {
        panic!("no completed event");
    };
    let kinds: Vec<(String, i32)> = completed
        .models
        .iter()
        .map(|m| (m.name.clone(), m.kind))
        .collect();
    assert_eq!(
        kinds[1],
        ("refiner".to_string(), pb::ModelKind::Refiner as i32)
    );
    assert_eq!(completed.models[1].sha256.len(), 64);
    let listed = server.list_models(pb::ModelKind::Refiner).await;
    let refiner = listed
        .iter()
        .find(|m| m.name == "refiner")
        .expect("the refiner is listed");
    assert!(refiner.resident && refiner.kind == pb::ModelKind::Refiner as i32);
    assert_eq!(refiner.sha256, completed.models[1].sha256);
}

/// The request of a case that starts from the init image: case 6, the base's img2img
/// entered at denoising_start 0.5 (DPM-Solver++, 10 steps); case 5, the refiner alone on
/// the picture at strength 0.6 with aesthetic scores 7.5 and 1.5 (micro-conditioning).
fn picture_spec(case: &Case, init: &Path) -> pb::GenerationSpec {
    let spec = pb::GenerationSpec {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        prompt_2: case["prompt_2"].as_str().map(str::to_string),
        seed: Some(41),
        ..Default::default()
    };
    let image = std::fs::read(init).expect("init.png");
    match case["kind"].as_str() {
        Some("denoising_start") => pb::GenerationSpec {
            steps: 10,
            scheduler: pb::Scheduler::DpmSolverMultistep as i32,
            init_image: Some(pb::InitImage {
                image,
                denoising_start: Some(0.5),
                ..Default::default()
            }),
            ..spec
        },
        Some("refiner_on_image") => pb::GenerationSpec {
            model: "refiner".into(),
            steps: 8,
            scheduler: pb::Scheduler::Euler as i32,
            micro_conditioning: Some(pb::MicroConditioning {
                aesthetic_score: Some(7.5),
                negative_aesthetic_score: Some(1.5),
                ..Default::default()
            }),
            init_image: Some(pb::InitImage {
                image,
                strength: Some(0.6),
                ..Default::default()
            }),
            ..spec
        },
        other => panic!("no picture case: {other:?}"),
    }
}

/// Any SDXL pipeline may refine; a refiner cannot be the base of text to image; a
/// refiner name no refiner root holds is NOT_FOUND.
async fn refiners_are_chosen_by_kind(server: &TestServer) {
    let mut client = server.generation().await;
    let mut spec = pb::GenerationSpec {
        prompt: "x".into(),
        steps: 2,
        width: 64,
        height: 64,
        refiner: Some(pb::RefinerStage {
            model: "pipeline".into(),
            mode: pb::RefinerMode::EnsembleOfExperts as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect("a base pipeline as refiner");
    spec.refiner = None;
    spec.model = "refiner".into();
    let status = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect_err("a refiner as base");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    spec.model = String::new();
    spec.refiner = Some(pb::RefinerStage {
        model: "absent".into(),
        mode: pb::RefinerMode::EnsembleOfExperts as i32,
        ..Default::default()
    });
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("not found");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// The refiner after inpainting over gRPC equals diffusers' recipe (both stages
/// StableDiffusionXLInpaintPipeline) in every case of the fixtures: the 4-channel base
/// and a 9-channel inpainting base, handing over in ensemble mode (Euler, Heun, DPM++) or
/// to a refiner at a strength (after a stochastic scheduler; strength 1). The server runs every image as image 0 of its seed (so its metadata replays it); the
/// recipe's second image takes the init image's latent samples from the first image's
/// generator, so the first image is compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refiner_after_inpainting_over_grpc_matches_diffusers() {
    use tonic_types::StatusExt;

    let dir = fixtures().join("tiny2");
    let roots = dir.to_str().expect("utf-8");
    let server = TestServer::start(&[
        ("SDXLD__MODELS__BASE_ROOTS", roots),
        ("SDXLD__MODELS__REFINER_ROOTS", roots),
    ])
    .await;
    let reference = read_tensors(&dir.join("refiner.safetensors"));
    let cases = cases("tiny2", "refiner");
    let inpainting: Vec<usize> = (0..cases.len())
        .filter(|&i| cases[i].text("kind").starts_with("inpaint_"))
        .collect();
    assert_eq!(inpainting.len(), 5);
    let mut last = None;
    for index in inpainting {
        let case = &cases[index];
        let ensemble = case.text("kind") == "inpaint_ensemble";
        let refiner_scheduler = case["refiner_scheduler"]
            .as_str()
            .unwrap_or(case.text("scheduler"));
        let spec = pb::GenerationSpec {
            model: case.text("base").into(),
            prompt: case.text("prompt").into(),
            prompt_2: Some(case.text("prompt_2").into()),
            seed: Some(41),
            steps: case.float("steps") as u32,
            num_images: 1,
            scheduler: common::wire_scheduler(case.text("scheduler")),
            init_image: Some(pb::InitImage {
                image: std::fs::read(dir.join("init.png")).expect("init.png"),
                mask: std::fs::read(dir.join("mask.png")).expect("mask.png"),
                strength: Some(case.float("inpaint_strength") as f32),
                ..Default::default()
            }),
            refiner: Some(pb::RefinerStage {
                model: "refiner".into(),
                mode: if ensemble {
                    pb::RefinerMode::EnsembleOfExperts
                } else {
                    pb::RefinerMode::Img2img
                } as i32,
                high_noise_fraction: case["fraction"].as_f64().map(|f| f as f32),
                strength: case["strength"].as_f64().map(|s| s as f32),
                steps: case["refiner_steps"].as_u64().unwrap_or(0) as u32,
                scheduler: common::wire_scheduler(refiner_scheduler),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = case.name();
        let spec_of_case = spec.clone();
        let response = server
            .images(spec)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_images_match(
            &format!("gRPC {name}"),
            &common::decoded_image(&response.images[0].data),
            &reference[&format!("{name}.images")].get(0),
        );
        last = Some(spec_of_case);
    }

    // A refiner that is an inpainting model has no masked image to take from a hand-off
    // (diffusers' pipeline fails on it too): refused, naming both models.
    let mut spec = last.expect("a case ran");
    if let Some(refiner) = spec.refiner.as_mut() {
        refiner.model = "inpaint_pipeline".into();
    }
    let status = server
        .images(spec)
        .await
        .expect_err("an inpainting refiner");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "INCOMPATIBLE_MODELS");
    assert!(status.message().contains("inpainting model"), "{status:?}");
}

/// A high-noise fraction that leaves the base or the refiner no timestep is refused
/// before admission, naming `spec.refiner.high_noise_fraction`; every other one runs.
/// Both tiny2 schedules are Euler, leading, offset 1: 2 steps are timesteps 501 and 1,
/// so 0.001 (cutoff 999) leaves the base none and 0.999 (cutoff 1) the refiner none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractions_that_leave_a_stage_no_step_are_refused_before_admission() {
    let dir = fixtures().join("tiny2");
    let server = TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            dir.join("pipeline").to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__REFINER_ROOTS", dir.to_str().expect("utf-8")),
    ])
    .await;
    let spec = |steps, fraction, scheduler: pb::Scheduler, refiner_steps| pb::GenerationSpec {
        prompt: "x".into(),
        steps,
        width: 64,
        height: 64,
        seed: Some(5),
        refiner: Some(pb::RefinerStage {
            model: "refiner".into(),
            mode: pb::RefinerMode::EnsembleOfExperts as i32,
            high_noise_fraction: Some(fraction),
            scheduler: scheduler as i32,
            steps: refiner_steps,
            ..Default::default()
        }),
        ..Default::default()
    };
    let euler = pb::Scheduler::Euler;
    let field = "spec.refiner.high_noise_fraction";
    for (fraction, stage) in [(0.001, "the base model"), (0.999, "the refiner")] {
        let refused = server
            .refused_or_completed("fraction", spec(2, fraction, euler, 0))
            .await
            .expect_err("no step");
        let expected = format!("{fraction} leaves {stage} no step of 2 to run");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, field);
        assert!(refused[0].1.contains(&expected), "{refused:?}");
    }
    let ran = server
        .refused_or_completed("0.5", spec(2, 0.5, euler, 0))
        .await;
    assert_eq!(ran, Ok(()));
    // The base entered at 0.9 by an image cannot stop at 0.5.
    let mut late = spec(2, 0.5, euler, 0);
    late.init_image = Some(pb::InitImage {
        image: std::fs::read(dir.join("init.png")).expect("init.png"),
        denoising_start: Some(0.9),
        ..Default::default()
    });
    let refused = server.refused_or_completed("late", late).await;
    let fields: Vec<String> = refused
        .expect_err("late")
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(fields, vec![field]);

    // The rule over other step counts and a second-order refiner: refused before
    // admission or run to the end, never admitted and then failed.
    let mut cases = Vec::new();
    for scheduler in [euler, pb::Scheduler::Heun] {
        for (steps, refiner_steps) in [(1, 0), (3, 2)] {
            for fraction in [0.001, 0.3, 0.8, 0.99, 0.999] {
                let what = format!("{scheduler:?} {steps}/{refiner_steps} at {fraction}");
                cases.push((what, spec(steps, fraction, scheduler, refiner_steps)));
            }
        }
    }
    server.completed_or_refused_naming(field, cases).await;

    // A base entered by an image at a strength starts late (4 Euler steps are 751, 501,
    // 251 and 1; strength 0.25 runs the last alone), so a fraction may leave it nothing:
    // image to image and inpainting alike.
    let picture = std::fs::read(dir.join("init.png")).expect("init.png");
    let mask = std::fs::read(dir.join("mask.png")).expect("mask.png");
    let mut cases = Vec::new();
    for strength in [0.25, 0.5, 0.75, 1.0] {
        for fraction in [0.3, 0.6, 0.9] {
            for masked in [false, true] {
                let mut entered = spec(4, fraction, euler, 0);
                entered.init_image = Some(pb::InitImage {
                    image: picture.clone(),
                    mask: if masked { mask.clone() } else { Vec::new() },
                    strength: Some(strength),
                    ..Default::default()
                });
                let what = format!("strength {strength} at {fraction}, mask {masked}");
                cases.push((what, entered));
            }
        }
    }
    server.completed_or_refused_naming(field, cases).await;
}
