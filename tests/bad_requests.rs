//! A table of bad requests: each is INVALID_ARGUMENT with a BadRequest naming exactly the
//! bad fields by their proto paths, and the server serves the next request.

use crate::common;

use common::server::{quick_spec, TestServer};
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

/// A black PNG of the size.
pub(crate) fn png(width: u32, height: u32) -> Vec<u8> {
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
        text_encoder_weight: None,
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
