//! Every implemented scheduler and option set equals diffusers: latents at 1, 7 and 25
//! steps on tiny2 and at 7 on tiny3 (its other latent shapes), stochastic schedulers
//! included (their per-step noise comes from each image's own generator, as in
//! diffusers).

use crate::common;

use common::{fixtures, read_tensors, relative_error, CONFIGS};
use sdxld::engine::pipeline::{GenerateParams, Placement, SchedulerOverrides, SdxlPipeline};
use sdxld::engine::schedulers::SchedulerKind;

#[test]
fn schedulers_match_diffusers() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let pipe = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
        let reference = read_tensors(&dir.join("schedulers.safetensors"));
        for case in common::cases(config, "schedulers") {
            let name = case.name().to_string();
            let params = case.params();
            assert!(
                params.scheduler_overrides.class.is_some(),
                "{name}: an implemented class"
            );
            let latents = pipe.denoise_all(&params, &mut |_| {}).expect("denoise");
            let err = relative_error(&latents, &reference[&name]);
            checked += 1;
            if err.is_nan() || err >= 1e-3 {
                failures.push(format!("{config} {name}: relative error {err:e}"));
            }
        }
    }
    assert!(checked >= 100, "only {checked} cases");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn progress_counts_scheduler_steps_for_second_order_schedulers() {
    let dir = fixtures().join("tiny2");
    let pipe = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
    for kind in [
        SchedulerKind::Heun,
        SchedulerKind::Kdpm2,
        SchedulerKind::Euler,
    ] {
        let params = GenerateParams {
            prompt: "x".into(),
            steps: 5,
            width: 64,
            height: 64,
            scheduler_overrides: SchedulerOverrides {
                class: Some(kind),
                ..SchedulerOverrides::default()
            },
            ..GenerateParams::default()
        };
        let mut steps = Vec::new();
        let _latents = pipe
            .denoise_all(&params, &mut |s| steps.push((s.step, s.total)))
            .expect("denoise");
        assert_eq!(
            steps,
            (0..=5).map(|s| (s, 5)).collect::<Vec<_>>(),
            "{kind:?}"
        );
    }
}

/// The same cases over gRPC: scheduler enum and typed options, latents output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedulers_over_grpc_match_diffusers() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;

    let dir = fixtures().join("tiny2");
    let pipeline = dir.join("pipeline");
    let server = TestServer::start(&[(
        "SDXLD__ENGINE__DEFAULT_MODEL",
        pipeline.to_str().expect("utf-8 path"),
    )])
    .await;
    let mut client = server.generation().await;
    let reference = read_tensors(&dir.join("schedulers.safetensors"));
    let cases = [
        (
            "DPMSolverMultistepScheduler.karras.7",
            pb::Scheduler::DpmSolverMultistep,
            pb::SchedulerOptions {
                sigma_schedule: pb::SigmaSchedule::Karras as i32,
                ..Default::default()
            },
        ),
        (
            "DPMSolverMultistepScheduler.sde.7",
            pb::Scheduler::DpmSolverMultistep,
            pb::SchedulerOptions {
                algorithm_type: pb::AlgorithmType::SdeDpmsolverPlusPlus as i32,
                ..Default::default()
            },
        ),
        (
            "EulerAncestralDiscreteScheduler.default.7",
            pb::Scheduler::EulerAncestral,
            pb::SchedulerOptions::default(),
        ),
        (
            "HeunDiscreteScheduler.trailing.7",
            pb::Scheduler::Heun,
            pb::SchedulerOptions {
                timestep_spacing: pb::TimestepSpacing::Trailing as i32,
                ..Default::default()
            },
        ),
        (
            "DDIMScheduler.eta.7",
            pb::Scheduler::Ddim,
            pb::SchedulerOptions {
                eta: Some(0.7),
                ..Default::default()
            },
        ),
    ];
    for (name, scheduler, options) in cases {
        let expected = &reference[name];
        let count = expected.size()[0];
        let spec = pb::GenerationSpec {
            prompt: "a scheduler test".into(),
            seed: Some(11),
            steps: 7,
            width: 64,
            height: 64,
            num_images: count as u32,
            scheduler: scheduler as i32,
            scheduler_options: Some(options),
            output: Some(pb::OutputOptions {
                format: pb::ImageFormat::LatentsSafetensors as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let response = client
            .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_inner();
        assert_eq!(response.images.len() as i64, count);
        for (i, image) in response.images.iter().enumerate() {
            let path = std::env::temp_dir().join(format!(
                "sdxld-sched-{}-{i}.safetensors",
                std::process::id()
            ));
            std::fs::write(&path, &image.data).expect("write");
            let latents = &read_tensors(&path)["latents"];
            let _ = std::fs::remove_file(&path);
            let err = relative_error(latents, &expected.get(i as i64).unsqueeze(0));
            assert!(err < 1e-3, "{name} image {i}: relative error {err:e}");
        }
    }
}
