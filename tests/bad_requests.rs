//! A table of bad requests: each is INVALID_ARGUMENT with a BadRequest naming exactly the
//! bad fields by their proto paths, and the server serves the next request.

use crate::common;

use common::server::{quick_spec, TestServer};
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::new(width, height);
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

fn cases() -> Vec<(&'static str, pb::GenerationSpec, Vec<&'static str>)> {
    let base = quick_spec(1);
    let with = |f: &dyn Fn(&mut pb::GenerationSpec)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let opts = |f: &dyn Fn(&mut pb::SchedulerOptions)| {
        let mut o = pb::SchedulerOptions::default();
        f(&mut o);
        Some(o)
    };
    let lora = |name: &str, weight: f32| pb::LoraAdapter {
        name: name.into(),
        weight: Some(weight),
    };
    let unit = || pb::ControlNetUnit {
        model: "canny".into(),
        image: png(64, 64),
        ..Default::default()
    };
    vec![
        (
            "width not a multiple of 8",
            with(&|s| s.width = 65),
            vec!["spec.width"],
        ),
        (
            "width too small",
            with(&|s| s.width = 32),
            vec!["spec.width"],
        ),
        (
            "height too large",
            with(&|s| s.height = 4096),
            vec!["spec.height"],
        ),
        (
            "too many steps",
            with(&|s| s.steps = 1000),
            vec!["spec.steps"],
        ),
        (
            "too many images",
            with(&|s| s.num_images = 100),
            vec!["spec.num_images"],
        ),
        (
            "guidance too high",
            with(&|s| s.guidance_scale = Some(31.0)),
            vec!["spec.guidance_scale"],
        ),
        (
            "guidance negative",
            with(&|s| s.guidance_scale = Some(-1.0)),
            vec!["spec.guidance_scale"],
        ),
        (
            "guidance NaN",
            with(&|s| s.guidance_scale = Some(f32::NAN)),
            vec!["spec.guidance_scale"],
        ),
        (
            "guidance rescale above 1",
            with(&|s| s.guidance_rescale = 1.5),
            vec!["spec.guidance_rescale"],
        ),
        (
            "clip skip too deep",
            with(&|s| s.clip_skip = 11),
            vec!["spec.clip_skip"],
        ),
        (
            "seed beyond 2^53",
            with(&|s| s.seed = Some(1 << 60)),
            vec!["spec.seed"],
        ),
        (
            "prompt too long",
            with(&|s| s.prompt = "x".repeat(5000)),
            vec!["spec.prompt"],
        ),
        (
            "negative prompt too long",
            with(&|s| s.negative_prompt = Some("y".repeat(5000))),
            vec!["spec.negative_prompt"],
        ),
        (
            "unknown scheduler",
            with(&|s| s.scheduler = 99),
            vec!["spec.scheduler"],
        ),
        (
            "eta on Euler",
            with(&|s| s.scheduler_options = opts(&|o| o.eta = Some(0.5))),
            vec!["spec.scheduler_options.eta"],
        ),
        (
            "solver order on Euler, and out of range",
            with(&|s| s.scheduler_options = opts(&|o| o.solver_order = Some(7))),
            vec![
                "spec.scheduler_options.solver_order",
                "spec.scheduler_options.solver_order",
            ],
        ),
        (
            "algorithm type on Euler",
            with(&|s| {
                s.scheduler_options =
                    opts(&|o| o.algorithm_type = pb::AlgorithmType::SdeDpmsolverPlusPlus as i32)
            }),
            vec!["spec.scheduler_options.algorithm_type"],
        ),
        (
            "unknown timestep spacing",
            with(&|s| s.scheduler_options = opts(&|o| o.timestep_spacing = 42)),
            vec!["spec.scheduler_options.timestep_spacing"],
        ),
        (
            "steps offset too large",
            with(&|s| s.scheduler_options = opts(&|o| o.steps_offset = Some(11))),
            vec!["spec.scheduler_options.steps_offset"],
        ),
        (
            "model name with ..",
            with(&|s| s.model = "../etc".into()),
            vec!["spec.model"],
        ),
        (
            "absolute model name",
            with(&|s| s.model = "/etc/passwd".into()),
            vec!["spec.model"],
        ),
        (
            "model name with NUL",
            with(&|s| s.model = "a\0b".into()),
            vec!["spec.model"],
        ),
        (
            "vae name escaping",
            with(&|s| s.vae = "../../vae".into()),
            vec!["spec.vae"],
        ),
        (
            "lora weight above 2",
            with(&|s| s.loras = vec![lora("style", 2.5)]),
            vec!["spec.loras[0].weight"],
        ),
        (
            "second lora: no name and weight below -2",
            with(&|s| s.loras = vec![lora("ok", 1.0), lora("", -3.0)]),
            vec!["spec.loras[1].name", "spec.loras[1].weight"],
        ),
        (
            "controlnet image that does not decode",
            with(&|s| {
                s.controlnets = vec![pb::ControlNetUnit {
                    image: b"not an image".to_vec(),
                    ..unit()
                }]
            }),
            vec!["spec.controlnets[0].image"],
        ),
        (
            "controlnet scale and range",
            with(&|s| {
                s.controlnets = vec![pb::ControlNetUnit {
                    conditioning_scale: Some(3.0),
                    guidance_start: 0.8,
                    guidance_end: Some(0.5),
                    ..unit()
                }]
            }),
            vec![
                "spec.controlnets[0].conditioning_scale",
                "spec.controlnets[0].guidance_end",
            ],
        ),
        (
            "canny threshold above 255",
            with(&|s| {
                s.controlnets = vec![pb::ControlNetUnit {
                    preprocessor: pb::Preprocessor::Canny as i32,
                    preprocessor_params: Some(pb::PreprocessorParams {
                        high_threshold: Some(300),
                        ..Default::default()
                    }),
                    ..unit()
                }]
            }),
            vec!["spec.controlnets[0].preprocessor_params.high_threshold"],
        ),
        (
            "canny and m-lsd thresholds on the image as it is",
            with(&|s| {
                s.controlnets = vec![pb::ControlNetUnit {
                    preprocessor_params: Some(pb::PreprocessorParams {
                        low_threshold: Some(10),
                        high_threshold: Some(20),
                        mlsd_score_threshold: Some(0.5),
                        ..Default::default()
                    }),
                    ..unit()
                }]
            }),
            vec![
                "spec.controlnets[0].preprocessor_params.low_threshold",
                "spec.controlnets[0].preprocessor_params.high_threshold",
                "spec.controlnets[0].preprocessor_params.mlsd_score_threshold",
            ],
        ),
        (
            "strength 0",
            with(&|s| {
                s.init_image = Some(pb::InitImage {
                    image: png(64, 64),
                    strength: Some(0.0),
                    ..Default::default()
                })
            }),
            vec!["spec.init_image.strength"],
        ),
        (
            "strength above 1",
            with(&|s| {
                s.init_image = Some(pb::InitImage {
                    image: png(64, 64),
                    strength: Some(1.5),
                    ..Default::default()
                })
            }),
            vec!["spec.init_image.strength"],
        ),
        (
            "mask of another size",
            with(&|s| {
                s.init_image = Some(pb::InitImage {
                    image: png(64, 64),
                    mask: png(32, 32),
                    ..Default::default()
                })
            }),
            vec!["spec.init_image.mask"],
        ),
        (
            "init image missing",
            with(&|s| s.init_image = Some(pb::InitImage::default())),
            vec!["spec.init_image.image"],
        ),
        (
            "upscale factor 9",
            with(&|s| {
                s.post_processing = vec![pb::PostProcessStep {
                    step: Some(pb::post_process_step::Step::Upscale(pb::UpscaleStep {
                        model: "x4".into(),
                        factor: 9,
                        tile_size: 0,
                        tile_overlap: None,
                    })),
                }]
            }),
            vec!["spec.post_processing[0].upscale.factor"],
        ),
        (
            "empty post-processing step",
            with(&|s| s.post_processing = vec![pb::PostProcessStep { step: None }]),
            vec!["spec.post_processing[0]"],
        ),
        (
            "denoising_start at 1, aesthetic scores outside [0, 10]",
            with(&|s| {
                s.init_image = Some(pb::InitImage {
                    image: png(64, 64),
                    denoising_start: Some(1.0),
                    ..Default::default()
                });
                s.micro_conditioning = Some(pb::MicroConditioning {
                    aesthetic_score: Some(11.0),
                    negative_aesthetic_score: Some(-1.0),
                    ..Default::default()
                });
            }),
            vec![
                "spec.init_image.denoising_start",
                "spec.micro_conditioning.aesthetic_score",
                "spec.micro_conditioning.negative_aesthetic_score",
            ],
        ),
        (
            "mask blur without a mask",
            with(&|s| {
                s.init_image = Some(pb::InitImage {
                    image: png(64, 64),
                    mask_blur: 4,
                    ..Default::default()
                })
            }),
            vec!["spec.init_image.mask_blur"],
        ),
        (
            "denoising_start with a mask",
            with(&|s| {
                s.init_image = Some(pb::InitImage {
                    image: png(64, 64),
                    mask: png(64, 64),
                    denoising_start: Some(0.5),
                    ..Default::default()
                })
            }),
            vec!["spec.init_image.denoising_start"],
        ),
        (
            "refiner without a mode, bad fraction",
            with(&|s| {
                s.refiner = Some(pb::RefinerStage {
                    model: "refiner".into(),
                    high_noise_fraction: Some(1.0),
                    ..Default::default()
                })
            }),
            vec!["spec.refiner.high_noise_fraction", "spec.refiner.mode"],
        ),
        (
            "output quality and format",
            with(&|s| {
                s.output = Some(pb::OutputOptions {
                    format: 17,
                    quality: 101,
                    ..Default::default()
                })
            }),
            vec!["spec.output.quality", "spec.output.format"],
        ),
        (
            "client job id too long",
            with(&|s| s.client_job_id = "j".repeat(200)),
            vec!["spec.client_job_id"],
        ),
        (
            "micro-conditioning size 0 and a lone negative size",
            with(&|s| {
                s.micro_conditioning = Some(pb::MicroConditioning {
                    original_size: Some(pb::Size {
                        width: 0,
                        height: 1024,
                    }),
                    negative_original_size: Some(pb::Size {
                        width: 512,
                        height: 512,
                    }),
                    ..Default::default()
                })
            }),
            vec![
                "spec.micro_conditioning.original_size.width",
                "spec.micro_conditioning.negative_target_size",
            ],
        ),
        (
            "a sigma schedule DDIM does not offer",
            with(&|s| {
                s.scheduler = pb::Scheduler::Ddim as i32;
                s.scheduler_options =
                    opts(&|o| o.sigma_schedule = pb::SigmaSchedule::Karras as i32);
            }),
            vec!["spec.scheduler_options.sigma_schedule"],
        ),
        (
            "a sigma schedule the refiner's Euler ancestral does not offer",
            with(&|s| {
                s.refiner = Some(pb::RefinerStage {
                    scheduler: pb::Scheduler::EulerAncestral as i32,
                    scheduler_options: opts(&|o| o.sigma_schedule = pb::SigmaSchedule::Beta as i32),
                    ..Default::default()
                })
            }),
            vec!["spec.refiner.scheduler_options.sigma_schedule"],
        ),
        (
            "a solver type of UniPC on DPM-Solver",
            with(&|s| {
                s.scheduler = pb::Scheduler::DpmSolverMultistep as i32;
                s.scheduler_options = opts(&|o| o.solver_type = pb::SolverType::Bh2 as i32);
            }),
            vec!["spec.scheduler_options.solver_type"],
        ),
        (
            "the last image's seed beyond 2^53",
            with(&|s| {
                s.seed = Some((1 << 53) - 1);
                s.num_images = 2;
            }),
            vec!["spec.seed"],
        ),
        (
            "clip skip deeper than the model's text encoders (4 layers)",
            with(&|s| s.clip_skip = 4),
            vec!["spec.clip_skip"],
        ),
        (
            "several fields at once",
            with(&|s| {
                s.width = 63;
                s.height = 10000;
                s.steps = 500;
                s.guidance_rescale = -0.5;
            }),
            vec![
                "spec.width",
                "spec.height",
                "spec.steps",
                "spec.guidance_rescale",
            ],
        ),
    ]
}

#[tokio::test]
async fn every_bad_field_is_named_and_the_server_keeps_serving() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (name, spec, expected) in cases {
        let status = client
            .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        let bad_request = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{name}: no BadRequest"));
        let mut fields: Vec<String> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        fields.sort();
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(
            fields, expected,
            "{name}: {:?}",
            bad_request.field_violations
        );
        for violation in &bad_request.field_violations {
            assert!(
                violation
                    .description
                    .contains(&format!("`{}`", violation.field)),
                "{name}: {}",
                violation.description
            );
        }
    }
    // A missing spec, on the streaming RPC.
    let status = client
        .generate(pb::GenerateRequest { spec: None })
        .await
        .expect_err("no spec");
    assert_eq!(status.code(), Code::InvalidArgument);
    let response = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(5)),
        })
        .await
        .expect("the server still serves");
    assert_eq!(response.into_inner().images.len(), 1);
}

/// Every float field of the contract, set to `value` in an otherwise valid request.
fn float_fields(value: f32) -> Vec<(&'static str, pb::GenerationSpec)> {
    let base = quick_spec(1);
    let with = |f: &dyn Fn(&mut pb::GenerationSpec)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let refiner = |f: &dyn Fn(&mut pb::RefinerStage)| {
        let mut r = pb::RefinerStage::default();
        f(&mut r);
        Some(r)
    };
    let unit = |f: &dyn Fn(&mut pb::ControlNetUnit)| {
        let mut u = pb::ControlNetUnit {
            model: "canny".into(),
            image: png(64, 64),
            ..Default::default()
        };
        f(&mut u);
        vec![u]
    };
    let init = |f: &dyn Fn(&mut pb::InitImage)| {
        let mut i = pb::InitImage {
            image: png(64, 64),
            ..Default::default()
        };
        f(&mut i);
        Some(i)
    };
    let guider = |f: &dyn Fn(&mut pb::Guider)| {
        let mut g = pb::Guider {
            kind: pb::GuiderKind::Apg as i32,
            ..Default::default()
        };
        f(&mut g);
        Some(g)
    };
    vec![
        (
            "spec.guidance_scale",
            with(&|s| s.guidance_scale = Some(value)),
        ),
        (
            "spec.sigmas",
            with(&|s| {
                s.scheduler = pb::Scheduler::Euler as i32;
                s.steps = 2;
                s.sigmas = vec![5.0, value, 0.0];
            }),
        ),
        (
            "spec.guider.start",
            with(&|s| s.guider = guider(&|g| g.start = Some(value))),
        ),
        (
            "spec.guider.stop",
            with(&|s| s.guider = guider(&|g| g.stop = Some(value))),
        ),
        (
            "spec.guider.momentum",
            with(&|s| s.guider = guider(&|g| g.momentum = Some(value))),
        ),
        (
            "spec.guider.norm_threshold",
            with(&|s| s.guider = guider(&|g| g.norm_threshold = Some(value))),
        ),
        (
            "spec.guider.eta",
            with(&|s| s.guider = guider(&|g| g.eta = Some(value))),
        ),
        (
            "spec.guidance_rescale",
            with(&|s| s.guidance_rescale = value),
        ),
        (
            "spec.micro_conditioning.aesthetic_score",
            with(&|s| {
                s.micro_conditioning = Some(pb::MicroConditioning {
                    aesthetic_score: Some(value),
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.micro_conditioning.negative_aesthetic_score",
            with(&|s| {
                s.micro_conditioning = Some(pb::MicroConditioning {
                    negative_aesthetic_score: Some(value),
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.scheduler_options.eta",
            with(&|s| {
                s.scheduler = pb::Scheduler::Ddim as i32;
                s.scheduler_options = Some(pb::SchedulerOptions {
                    eta: Some(value),
                    ..Default::default()
                });
            }),
        ),
        (
            "spec.refiner.high_noise_fraction",
            with(&|s| s.refiner = refiner(&|r| r.high_noise_fraction = Some(value))),
        ),
        (
            "spec.refiner.strength",
            with(&|s| s.refiner = refiner(&|r| r.strength = Some(value))),
        ),
        (
            "spec.refiner.guidance_scale",
            with(&|s| s.refiner = refiner(&|r| r.guidance_scale = Some(value))),
        ),
        (
            "spec.refiner.aesthetic_score",
            with(&|s| s.refiner = refiner(&|r| r.aesthetic_score = Some(value))),
        ),
        (
            "spec.refiner.negative_aesthetic_score",
            with(&|s| s.refiner = refiner(&|r| r.negative_aesthetic_score = Some(value))),
        ),
        (
            "spec.refiner.scheduler_options.eta",
            with(&|s| {
                s.refiner = refiner(&|r| {
                    r.scheduler = pb::Scheduler::Ddim as i32;
                    r.scheduler_options = Some(pb::SchedulerOptions {
                        eta: Some(value),
                        ..Default::default()
                    });
                })
            }),
        ),
        (
            "spec.loras[0].weight",
            with(&|s| {
                s.loras = vec![pb::LoraAdapter {
                    name: "style".into(),
                    weight: Some(value),
                }]
            }),
        ),
        (
            "spec.controlnets[0].conditioning_scale",
            with(&|s| s.controlnets = unit(&|u| u.conditioning_scale = Some(value))),
        ),
        (
            "spec.controlnets[0].guidance_start",
            with(&|s| s.controlnets = unit(&|u| u.guidance_start = value)),
        ),
        (
            "spec.controlnets[0].guidance_end",
            with(&|s| s.controlnets = unit(&|u| u.guidance_end = Some(value))),
        ),
        (
            "spec.init_image.strength",
            with(&|s| s.init_image = init(&|i| i.strength = Some(value))),
        ),
        (
            "spec.init_image.denoising_start",
            with(&|s| s.init_image = init(&|i| i.denoising_start = Some(value))),
        ),
    ]
}

#[tokio::test]
async fn nan_and_infinities_are_refused_in_every_float_field() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    // At one step too, where a default standing in for a bad strength would leave no step:
    // the field is named for the value sent, not for the default.
    for (value, steps) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .into_iter()
        .flat_map(|value| [(value, 2), (value, 1)])
    {
        let fields = float_fields(value);
        assert_eq!(fields.len(), 23, "every float field of the contract");
        for (field, mut spec) in fields {
            spec.steps = steps;
            let status = client
                .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
                .await
                .expect_err(field);
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{field} = {value}: {status:?}"
            );
            let violations = status
                .get_details_bad_request()
                .unwrap_or_else(|| panic!("{field}: no BadRequest"))
                .field_violations;
            assert!(
                violations.iter().any(|v| v.field == field),
                "{field} = {value}: {violations:?}"
            );
            let sent = format!("got {value}");
            assert!(
                violations
                    .iter()
                    .filter(|v| v.field == field)
                    .all(|v| v.description.contains(&sent)),
                "{field} = {value}, {steps} steps: {violations:?}"
            );
        }
    }
    client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(5)),
        })
        .await
        .expect("the server still serves");
}

#[tokio::test]
async fn clip_skip_is_checked_against_the_model_before_the_stream_starts() {
    use tokio_stream::StreamExt;
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    // The demo model's text encoders have 4 layers: clip_skip 3 reads their embeddings.
    let mut deepest = quick_spec(2);
    deepest.clip_skip = 3;
    let images = server
        .images(deepest.clone())
        .await
        .expect("clip_skip 3 runs")
        .images;
    assert_eq!(images.len(), 1);
    deepest.clip_skip = 4;
    let status = match client
        .generate(pb::GenerateRequest {
            spec: Some(deepest),
        })
        .await
    {
        Err(status) => status,
        Ok(stream) => {
            let first = stream.into_inner().next().await;
            panic!("a stream started: {first:?}");
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "spec.clip_skip");
    assert!(
        violations[0].description.contains("at most 3"),
        "{violations:?}"
    );
}

#[tokio::test]
async fn the_last_seed_of_a_batch_stays_below_2_pow_53_and_replays() {
    let server = TestServer::start(&[]).await;
    let mut spec = quick_spec((1 << 53) - 2);
    spec.num_images = 2;
    let response = server
        .images(spec)
        .await
        .expect("the last seed is 2^53 - 1");
    let last = &response.images[1];
    assert_eq!(last.seed, (1 << 53) - 1);
    // Its metadata replays it.
    let replay = common::png_spec(&last.data);
    let again = server.images(replay).await.expect("the replay is valid");
    assert_eq!(again.images[0].data, last.data);
}

/// A `denoising_start` that leaves no timestep below it is refused before admission,
/// naming the field; every other one runs. The demo model's Euler schedule is leading
/// with offset 1: 2 steps are timesteps 501 and 1, so 0.998 (cutoff 2) keeps one and
/// 0.999 (cutoff 1) none; Heun, second order, always keeps one (diffusers' rule).
#[tokio::test]
async fn a_denoising_start_that_leaves_no_step_is_refused_before_admission() {
    let server = TestServer::start(&[]).await;
    let spec = |scheduler: pb::Scheduler, options, steps, start| pb::GenerationSpec {
        steps,
        scheduler: scheduler as i32,
        scheduler_options: options,
        init_image: Some(pb::InitImage {
            image: png(64, 64),
            denoising_start: Some(start),
            ..Default::default()
        }),
        ..quick_spec(3)
    };
    let plain = || None;
    let euler = |steps, start| spec(pb::Scheduler::Euler, plain(), steps, start);
    assert_eq!(
        server.refused_or_completed("0.998", euler(2, 0.998)).await,
        Ok(())
    );
    let refused = server
        .refused_or_completed("0.999", euler(2, 0.999))
        .await
        .expect_err("0.999 of 2 Euler steps leaves none");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "spec.init_image.denoising_start");
    assert!(
        refused[0].1.contains("0.999 leaves no step of 2 to run"),
        "{refused:?}"
    );
    let heun = spec(pb::Scheduler::Heun, plain(), 2, 0.999);
    assert_eq!(server.refused_or_completed("Heun", heun).await, Ok(()));

    // The rule over schedules of other spacings and sigma placements: refused before
    // admission or run to the end, never admitted and then failed.
    let trailing = Some(pb::SchedulerOptions {
        timestep_spacing: pb::TimestepSpacing::Trailing as i32,
        ..Default::default()
    });
    let karras = Some(pb::SchedulerOptions {
        sigma_schedule: pb::SigmaSchedule::Karras as i32,
        ..Default::default()
    });
    let schedules = [
        (pb::Scheduler::Euler, plain()),
        (pb::Scheduler::Euler, trailing),
        (pb::Scheduler::DpmSolverMultistep, karras),
        (pb::Scheduler::Ddim, trailing),
        (pb::Scheduler::Heun, plain()),
    ];
    let mut cases = Vec::new();
    for (scheduler, options) in schedules {
        for steps in [1, 3] {
            for start in [0.3, 0.9, 0.99, 0.999, 0.9999] {
                let what = format!("{scheduler:?} {options:?} {steps} steps from {start}");
                cases.push((what, spec(scheduler, options, steps, start)));
            }
        }
    }
    server
        .completed_or_refused_naming("spec.init_image.denoising_start", cases)
        .await;
}

/// Zero terminal SNR leaves the last training timestep no signal; DDIM, LCM and TCD
/// divide an epsilon prediction by it there, so a run that starts at it (trailing or
/// linspace spacing, LCM's and TCD's own schedules, a strength of 1) is refused before
/// admission naming the option, where it used to be admitted and fail with NaN latents.
/// Every other combination runs to its end.
#[tokio::test]
async fn a_run_starting_where_zero_terminal_snr_leaves_no_signal_is_refused() {
    let server = TestServer::start(&[]).await;
    let options = |spacing: pb::TimestepSpacing, prediction: pb::PredictionType| {
        Some(pb::SchedulerOptions {
            rescale_betas_zero_snr: Some(true),
            timestep_spacing: spacing as i32,
            prediction_type: prediction as i32,
            ..Default::default()
        })
    };
    let spec = |scheduler: pb::Scheduler, options, steps| pb::GenerationSpec {
        steps,
        scheduler: scheduler as i32,
        scheduler_options: options,
        ..quick_spec(5)
    };
    use pb::{PredictionType as P, TimestepSpacing as S};
    let trailing = options(S::Trailing, P::Unspecified);
    let refused = server
        .refused_or_completed("DDIM trailing", spec(pb::Scheduler::Ddim, trailing, 2))
        .await
        .expect_err("DDIM trailing starts at 999");
    assert_eq!(
        refused,
        [(
            "spec.scheduler_options.rescale_betas_zero_snr".to_string(),
            refused[0].1.clone()
        )]
    );
    assert!(refused[0].1.contains("timestep 999"), "{refused:?}");
    let v = options(S::Trailing, P::VPrediction);
    let v_prediction = spec(pb::Scheduler::Ddim, v, 2);
    assert_eq!(server.refused_or_completed("v", v_prediction).await, Ok(()));

    // An image entered at strength 1 starts at 999 too; below 1 it does not.
    let img2img = |strength| pb::GenerationSpec {
        init_image: Some(pb::InitImage {
            image: png(64, 64),
            strength: Some(strength),
            ..Default::default()
        }),
        ..spec(pb::Scheduler::Ddim, trailing, 4)
    };
    let at_one = server
        .refused_or_completed("strength 1", img2img(1.0))
        .await;
    assert!(at_one.is_err(), "strength 1 runs from 999");
    assert_eq!(
        server.refused_or_completed("0.9", img2img(0.9)).await,
        Ok(())
    );

    // A hires pass's own scheduler is named under spec.hires; one inheriting the first
    // pass's options is named where they were set.
    let hires = |scheduler: pb::Scheduler, options, strength| pb::GenerationSpec {
        hires: Some(pb::HiresPass {
            scale: Some(1.5),
            steps: 2,
            strength: Some(strength),
            scheduler: scheduler as i32,
            scheduler_options: options,
            ..Default::default()
        }),
        ..quick_spec(6)
    };
    let own = hires(pb::Scheduler::Ddim, trailing, 1.0);
    let refused = server.refused_or_completed("hires", own).await;
    let field = refused.expect_err("hires at 1").remove(0).0;
    assert_eq!(field, "spec.hires.scheduler_options.rescale_betas_zero_snr");
    // (The first pass enters at 0.5, below 999; the hires pass at 1 does not.)
    let inherited = pb::GenerationSpec {
        scheduler: pb::Scheduler::Ddim as i32,
        scheduler_options: trailing,
        init_image: img2img(0.5).init_image,
        ..hires(pb::Scheduler::Unspecified, None, 1.0)
    };
    let refused = server.refused_or_completed("inherited", inherited).await;
    let field = refused.expect_err("inherited at 1").remove(0).0;
    assert_eq!(field, "spec.scheduler_options.rescale_betas_zero_snr");

    // The rule over schedulers, spacings, predictions and step counts.
    let mut cases = Vec::new();
    let spaced = [
        pb::Scheduler::Ddim,
        pb::Scheduler::Euler,
        pb::Scheduler::Unipc,
    ];
    let all_spacings = [S::Unspecified, S::Leading, S::Trailing, S::Linspace];
    let schedulers = spaced
        .iter()
        .flat_map(|&s| all_spacings.iter().map(move |&spacing| (s, spacing)))
        .chain([pb::Scheduler::Lcm, pb::Scheduler::Tcd].map(|s| (s, S::Unspecified)))
        .chain([(pb::Scheduler::DpmSolverMultistep, S::Trailing)])
        .chain([(pb::Scheduler::EulerAncestral, S::Trailing)]);
    for (scheduler, spacing) in schedulers {
        for prediction in [P::Unspecified, P::Epsilon, P::VPrediction] {
            for steps in [1, 2, 4] {
                let what = format!("{scheduler:?} {spacing:?} {prediction:?} {steps} steps");
                let options = options(spacing, prediction);
                cases.push((what, spec(scheduler, options, steps)));
            }
        }
    }
    server
        .completed_or_refused_naming("spec.scheduler_options.rescale_betas_zero_snr", cases)
        .await;
}

/// Multistep solvers whose step coefficients divide by zero (UniPC's last step at full
/// order onto sigma 0, a third-order step between two equal last sigmas), which makes
/// NaN latents from any model in diffusers too, are refused before admission naming the
/// option without which they run; over solvers, orders, final sigmas, sigma schedules
/// and step counts every request is either refused so or runs to its end.
#[tokio::test]
async fn solver_schedules_that_divide_by_zero_are_refused_before_admission() {
    let server = TestServer::start(&[]).await;
    let spec =
        |scheduler: pb::Scheduler, options: pb::SchedulerOptions, steps| pb::GenerationSpec {
            steps,
            scheduler: scheduler as i32,
            scheduler_options: Some(options),
            ..quick_spec(8)
        };
    let full_order = pb::SchedulerOptions {
        lower_order_final: Some(false),
        ..Default::default()
    };
    let third_order = pb::SchedulerOptions {
        lower_order_final: Some(false),
        solver_order: Some(3),
        sigma_schedule: pb::SigmaSchedule::Karras as i32,
        final_sigmas_type: pb::FinalSigmasType::SigmaMin as i32,
        ..Default::default()
    };
    for (what, request) in [
        ("UniPC", spec(pb::Scheduler::Unipc, full_order, 8)),
        (
            "DPM++ 3",
            spec(pb::Scheduler::DpmSolverMultistep, third_order, 8),
        ),
    ] {
        let refused = server.refused_or_completed(what, request).await;
        let refused = refused.expect_err(what);
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert_eq!(
            refused[0].0, "spec.scheduler_options.lower_order_final",
            "{what}"
        );
        assert!(refused[0].1.contains("NaN latents"), "{what}: {refused:?}");
    }
    // One step is first order; the same options run.
    let one = spec(pb::Scheduler::Unipc, full_order, 1);
    assert_eq!(server.refused_or_completed("one", one).await, Ok(()));

    let (mut ran, mut refused) = (0, 0);
    let solvers = [pb::Scheduler::Unipc, pb::Scheduler::DpmSolverMultistep];
    for (scheduler, lower, order, karras, finals) in solver_combinations(solvers) {
        for steps in [2, 3] {
            let options = pb::SchedulerOptions {
                lower_order_final: lower,
                solver_order: order,
                sigma_schedule: karras as i32,
                final_sigmas_type: finals as i32,
                ..Default::default()
            };
            let what = format!("{scheduler:?} {options:?} {steps} steps");
            match server
                .refused_or_completed(&what, spec(scheduler, options, steps))
                .await
            {
                Ok(()) => ran += 1,
                Err(fields) => {
                    assert_eq!(fields.len(), 1, "{what}: {fields:?}");
                    assert!(fields[0].0.starts_with("spec.scheduler_options."), "{what}");
                    refused += 1;
                }
            }
        }
    }
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

/// A solver, `lower_order_final`, `solver_order`, sigma schedule and final sigmas.
type SolverCase = (
    pb::Scheduler,
    Option<bool>,
    Option<u32>,
    pb::SigmaSchedule,
    pb::FinalSigmasType,
);

/// Every combination of the solver options the sweep above tries.
fn solver_combinations(solvers: [pb::Scheduler; 2]) -> Vec<SolverCase> {
    let mut all = Vec::new();
    for scheduler in solvers {
        for lower in [None, Some(false)] {
            for order in [None, Some(3)] {
                for karras in [pb::SigmaSchedule::Unspecified, pb::SigmaSchedule::Karras] {
                    for finals in [pb::FinalSigmasType::Zero, pb::FinalSigmasType::SigmaMin] {
                        all.push((scheduler, lower, order, karras, finals));
                    }
                }
            }
        }
    }
    all
}
