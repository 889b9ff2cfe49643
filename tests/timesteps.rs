//! Where the timesteps come from: the consistency schedulers (LCM, TCD) against diffusers'
//! LCMScheduler and TCDScheduler, and custom timesteps against diffusers' pipelines given
//! `timesteps` (`tests/fixtures/make_schedule_fixtures.py`). Their timesteps for every
//! recorded step count and distillation schedule; over gRPC, images within two levels and
//! latents within 1e-3 on both tiny pipelines (guidance off and on, batches of two drawing
//! step noise per image, one step, custom distillation schedules, v-prediction with
//! zero-SNR betas, TCD's gamma 0, between and 1, image to image, an ensemble with the
//! refiner; custom timesteps under Euler, Heun, DPM-Solver++ multistep and singlestep,
//! LCM and TCD, entered at a strength and handed over to the refiner; custom sigmas under
//! Euler (Align Your Steps' noise levels, a schedule ending above 0, one starting beyond
//! the training sigmas, image to image, an ensemble); a guidance-distilled
//! LCM UNet, its guidance scale embedded and no classifier-free guidance); the CLI's
//! `--scheduler lcm` and `--timesteps`; refusals naming the field before admission;
//! capabilities, PNG parameters and a replay from the PNG.

use crate::common;

use common::server::TestServer;
use common::{assert_images_match, fixtures, read_tensors, schedule_fixtures};
use sdxld::engine::schedulers::{SchedulerConfig, SchedulerKind};
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn cases(config: &str) -> Vec<Value> {
    let path = schedule_fixtures().join(config).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json")
}

fn wire_scheduler(case: &Value) -> i32 {
    common::wire_scheduler(case["scheduler"].as_str().expect("scheduler"))
}

/// The request options of a case's diffusers config options and call eta.
fn options_of(case: &Value) -> pb::SchedulerOptions {
    let options = &case["options"];
    let eta = case["eta"].as_f64().expect("eta");
    let v_prediction = options["prediction_type"] == "v_prediction";
    pb::SchedulerOptions {
        original_inference_steps: options["original_inference_steps"]
            .as_u64()
            .map(|s| s as u32),
        rescale_betas_zero_snr: options["rescale_betas_zero_snr"].as_bool(),
        prediction_type: if v_prediction {
            pb::PredictionType::VPrediction as i32
        } else {
            0
        },
        // diffusers' pipelines pass eta only to a scheduler whose step takes it (TCD).
        eta: (case["scheduler"] == "TCDScheduler" && eta > 0.0).then_some(eta as f32),
        ..Default::default()
    }
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let number = |key: &str| case[key].as_u64().unwrap_or_else(|| panic!("{key}")) as u32;
    let scheduler_options = Some(options_of(case));
    let pipeline = case["pipeline"].as_str().expect("pipeline");
    let mut spec = pb::GenerationSpec {
        model: format!("{config}/{pipeline}"),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps: number("steps"),
        num_images: number("n"),
        width: number("width"),
        height: number("height"),
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        scheduler: wire_scheduler(case),
        scheduler_options,
        timesteps: case["timesteps"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| t.as_u64().expect("timestep") as u32)
                    .collect()
            })
            .unwrap_or_default(),
        sigmas: case["sigmas"]
            .as_array()
            .map(|ss| {
                ss.iter()
                    .map(|s| s.as_f64().expect("sigma") as f32)
                    .collect()
            })
            .unwrap_or_default(),
        ..Default::default()
    };
    let init = || fixtures().join(config).join("init.png");
    match case["kind"].as_str().expect("kind") {
        "img2img" => {
            spec.init_image = Some(pb::InitImage {
                image: std::fs::read(init()).expect("init.png"),
                strength: case["strength"].as_f64().map(|s| s as f32),
                ..Default::default()
            });
        }
        "ensemble" => {
            spec.refiner = Some(pb::RefinerStage {
                model: format!("{config}/refiner"),
                mode: pb::RefinerMode::EnsembleOfExperts as i32,
                high_noise_fraction: case["fraction"].as_f64().map(|f| f as f32),
                scheduler: wire_scheduler(case),
                scheduler_options,
                ..Default::default()
            });
        }
        _ => {}
    }
    spec
}

#[test]
fn consistency_timesteps_match_diffusers() {
    let path = schedule_fixtures().join("timesteps.json");
    let recorded: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("timesteps.json"))
            .expect("json");
    assert!(recorded.len() >= 30, "{} schedules", recorded.len());
    for entry in recorded {
        let class = entry["scheduler"].as_str().expect("scheduler");
        let steps = entry["steps"].as_u64().expect("steps") as usize;
        let config = SchedulerConfig {
            class_name: Some(class.into()),
            original_inference_steps: entry["original_inference_steps"].as_i64(),
            ..SchedulerConfig::sdxl_base()
        };
        let scheduler = config.build(steps).expect("build");
        let expected: Vec<f64> = entry["timesteps"]
            .as_array()
            .expect("timesteps")
            .iter()
            .map(|t| t.as_f64().expect("timestep"))
            .collect();
        assert_eq!(scheduler.timesteps(), expected, "{entry}");
    }
}

/// The fixture pipelines and, as base models, the schedule fixtures' (a guidance-distilled
/// tiny2 as `tiny2/lcm_pipeline`).
async fn server() -> TestServer {
    let roots = format!("{},{}", fixtures().display(), schedule_fixtures().display());
    TestServer::with_pipelines(&[("SDXLD__MODELS__BASE_ROOTS", &roots)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_match_diffusers() {
    let server = server().await;
    let mut checked = 0;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&schedule_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let key = case["name"].as_str().expect("name");
            let name = format!("{config} {key} {}", case["scheduler"]);
            server
                .assert_matches_case(&name, spec_of(config, &case), &reference, key)
                .await;
            checked += 1;
        }
    }
    assert!(checked >= 34, "{checked} cases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_runs_are_named_and_listed() {
    let server = TestServer::with_pipelines(&[]).await;
    let case = &cases("tiny2")[5];
    let spec = spec_of("tiny2", case);
    let done = server.images(spec.clone()).await.expect("TCD");
    let parameters = common::png_parameters(&done.images[0].data);
    assert!(parameters.contains("Sampler: TCD"), "{parameters}");
    // gamma draws fresh noise: another gamma gives another image.
    let gamma = pb::GenerationSpec {
        scheduler_options: Some(pb::SchedulerOptions {
            eta: Some(0.8),
            ..options_of(case)
        }),
        ..spec.clone()
    };
    let other = server.images(gamma).await.expect("TCD gamma 0.8");
    let moved = common::image_difference(
        &common::decoded_image(&done.images[0].data),
        &common::decoded_image(&other.images[0].data),
    );
    assert!(moved > 10, "gamma moves the image by {moved} levels only");
    let capabilities = server.capabilities().await;
    for (scheduler, options) in [
        (
            pb::Scheduler::Lcm,
            &[
                "original_inference_steps",
                "rescale_betas_zero_snr",
                "prediction_type",
            ][..],
        ),
        (
            pb::Scheduler::Tcd,
            &[
                "original_inference_steps",
                "eta",
                "rescale_betas_zero_snr",
                "prediction_type",
            ],
        ),
    ] {
        let listed = capabilities
            .schedulers
            .iter()
            .find(|s| s.scheduler == scheduler as i32)
            .unwrap_or_else(|| panic!("{scheduler:?} listed"));
        assert!(listed.supported);
        assert_eq!(listed.options, options, "{scheduler:?}");
        assert!(listed.sigma_schedules.is_empty(), "{scheduler:?}");
    }
    assert_eq!(capabilities.schedulers.len(), SchedulerKind::ALL.len());
    assert!(capabilities
        .features
        .iter()
        .any(|f| f.field == "timesteps" && f.supported));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_requests_out_of_their_schedule_are_refused() {
    let server = TestServer::with_pipelines(&[]).await;
    let base = |scheduler: pb::Scheduler, options: pb::SchedulerOptions| pb::GenerationSpec {
        prompt: "a boat".into(),
        steps: 4,
        width: 64,
        height: 64,
        guidance_scale: Some(1.0),
        scheduler: scheduler as i32,
        scheduler_options: Some(options),
        ..Default::default()
    };
    let lcm = |options| base(pb::Scheduler::Lcm, options);
    let default = pb::SchedulerOptions::default;
    let opts = "spec.scheduler_options";
    let cases: Vec<(&str, pb::GenerationSpec, Vec<String>)> = vec![
        (
            "51 steps of 50",
            pb::GenerationSpec {
                steps: 51,
                ..lcm(default())
            },
            vec!["spec.steps".into()],
        ),
        (
            "9 steps of a schedule of 8",
            pb::GenerationSpec {
                steps: 9,
                ..base(
                    pb::Scheduler::Tcd,
                    pb::SchedulerOptions {
                        original_inference_steps: Some(8),
                        ..default()
                    },
                )
            },
            vec!["spec.steps".into()],
        ),
        (
            "a schedule of 0",
            lcm(pb::SchedulerOptions {
                original_inference_steps: Some(0),
                ..default()
            }),
            vec![format!("{opts}.original_inference_steps")],
        ),
        (
            "a schedule of 1001",
            lcm(pb::SchedulerOptions {
                original_inference_steps: Some(1001),
                ..default()
            }),
            vec![format!("{opts}.original_inference_steps")],
        ),
        (
            "options LCM does not have",
            lcm(pb::SchedulerOptions {
                timestep_spacing: pb::TimestepSpacing::Trailing as i32,
                sigma_schedule: pb::SigmaSchedule::Karras as i32,
                steps_offset: Some(1),
                eta: Some(0.3),
                ..default()
            }),
            ["timestep_spacing", "sigma_schedule", "steps_offset", "eta"]
                .iter()
                .map(|o| format!("{opts}.{o}"))
                .collect(),
        ),
        (
            "a gamma out of range",
            base(
                pb::Scheduler::Tcd,
                pb::SchedulerOptions {
                    eta: Some(f32::NAN),
                    ..default()
                },
            ),
            vec![format!("{opts}.eta")],
        ),
        (
            "a distillation schedule on Euler",
            base(
                pb::Scheduler::Euler,
                pb::SchedulerOptions {
                    original_inference_steps: Some(50),
                    ..default()
                },
            ),
            vec![format!("{opts}.original_inference_steps")],
        ),
        (
            "a hires pass of 60 LCM steps",
            pb::GenerationSpec {
                hires: Some(pb::HiresPass {
                    scale: Some(1.5),
                    steps: 60,
                    ..Default::default()
                }),
                ..lcm(default())
            },
            vec!["spec.hires.steps".into()],
        ),
        (
            "a refiner of 70 TCD steps",
            pb::GenerationSpec {
                refiner: Some(pb::RefinerStage {
                    model: "tiny2/refiner".into(),
                    mode: pb::RefinerMode::Img2img as i32,
                    steps: 70,
                    scheduler: pb::Scheduler::Tcd as i32,
                    ..Default::default()
                }),
                ..lcm(default())
            },
            vec!["spec.refiner.steps".into()],
        ),
    ];
    for (what, spec, fields) in cases {
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        server.assert_invalid(what, spec, &fields).await;
    }
    // The server serves on: 50 steps of 50 run.
    let done = server
        .images(pb::GenerationSpec {
            steps: 50,
            ..lcm(default())
        })
        .await
        .expect("50 LCM steps");
    assert_eq!(done.images.len(), 1);
}

/// `sdxld generate --scheduler lcm` runs the tiny3 LCM case; more steps than the
/// schedule has are refused naming the flag.
#[test]
fn lcm_over_the_cli_matches_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny3")[0];
    assert_eq!(case["scheduler"], "LCMScheduler");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("lcm.png");
    let run = |steps: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "lcm"])
            .args(["--guidance", "1", "--seed", &case["seed"].to_string()])
            .args(["--steps", steps])
            .flag("--output", &png)
    };
    run(&case["steps"].to_string()).succeeds();
    let reference = read_tensors(&schedule_fixtures().join("tiny3/cases.safetensors"));
    assert_images_match(
        "CLI LCM",
        &common::image_file(&png),
        &reference["consistency_0.images"].get(0),
    );
    let message = run("51").fails();
    assert!(message.contains("--steps"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_timesteps_out_of_their_rules_are_refused_and_replay() {
    let server = TestServer::with_pipelines(&[]).await;
    let spec = |scheduler: pb::Scheduler, timesteps: &[u32]| pb::GenerationSpec {
        prompt: "a boat".into(),
        width: 64,
        height: 64,
        scheduler: scheduler as i32,
        timesteps: timesteps.to_vec(),
        ..Default::default()
    };
    let euler = |timesteps: &[u32]| spec(pb::Scheduler::Euler, timesteps);
    let field = "spec.timesteps";
    let refused = [
        ("increasing", euler(&[500, 800]), vec![field]),
        ("repeated", euler(&[800, 800, 200]), vec![field]),
        ("beyond training", euler(&[1000, 500]), vec![field]),
        (
            "another count of steps",
            pb::GenerationSpec {
                steps: 5,
                ..euler(&[999, 500])
            },
            vec!["spec.steps"],
        ),
        (
            "Euler ancestral",
            spec(pb::Scheduler::EulerAncestral, &[999, 500]),
            vec![field],
        ),
        (
            "UniPC",
            spec(pb::Scheduler::Unipc, &[999, 500]),
            vec![field],
        ),
        (
            "Karras sigmas",
            pb::GenerationSpec {
                scheduler_options: Some(pb::SchedulerOptions {
                    sigma_schedule: pb::SigmaSchedule::Karras as i32,
                    ..Default::default()
                }),
                ..spec(pb::Scheduler::DpmSolverMultistep, &[999, 500])
            },
            vec![field],
        ),
        (
            "more than the steps limit",
            euler(&(0..151).rev().collect::<Vec<u32>>()),
            vec![field],
        ),
    ];
    for (what, spec, fields) in refused {
        server.assert_invalid(what, spec, &fields).await;
    }
    // 52 custom LCM timesteps are not bound by the distillation schedule's 50; the PNG's
    // JSON replays a custom schedule byte for byte.
    let many: Vec<u32> = (0..52).map(|i| 999 - 19 * i).collect();
    let done = server
        .images(pb::GenerationSpec {
            guidance_scale: Some(1.0),
            ..spec(pb::Scheduler::Lcm, &many)
        })
        .await
        .expect("52 custom LCM timesteps");
    assert_eq!(done.images.len(), 1);
    let first = server
        .images(pb::GenerationSpec {
            seed: Some(5),
            ..euler(&[999, 845, 500, 13])
        })
        .await
        .expect("custom Euler");
    let replayed = common::png_spec(&first.images[0].data);
    assert_eq!(replayed.timesteps, [999, 845, 500, 13]);
    let again = server.images(replayed).await.expect("replay");
    assert_eq!(again.images[0].data, first.images[0].data);
}

/// `sdxld generate --timesteps` runs a recorded custom schedule; timesteps that do not
/// decrease are refused naming the flag.
#[test]
fn custom_timesteps_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny3")
        .into_iter()
        .find(|c| c["name"] == "custom_1")
        .expect("custom_1");
    assert_eq!(case["scheduler"], "EulerDiscreteScheduler");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("custom.png");
    let run = |timesteps: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args(["--guidance", &case["guidance"].to_string()])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--timesteps",
                timesteps,
            ])
            .flag("--output", &png)
    };
    run("999,500").succeeds();
    let reference = read_tensors(&schedule_fixtures().join("tiny3/cases.safetensors"));
    assert_images_match(
        "CLI custom timesteps",
        &common::image_file(&png),
        &reference["custom_1.images"].get(0),
    );
    let message = run("500,999").fails();
    assert!(message.contains("--timesteps"), "{message}");
}
