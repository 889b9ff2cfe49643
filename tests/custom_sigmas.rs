//! Custom sigmas (`spec.sigmas`, `--sigmas`) beyond the parity cases of
//! `tests/timesteps.rs`: refusals naming the field before admission (order, range, NaN,
//! count, schedulers that do not take them, a respaced schedule, beside custom timesteps,
//! another step count), a replay from the PNG, the capabilities, and the CLI against the
//! recorded Align Your Steps case.

use crate::common;

use common::server::TestServer;
use common::{assert_images_match, fixtures, read_tensors, schedule_fixtures};
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn spec(scheduler: pb::Scheduler, sigmas: &[f32]) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a boat".into(),
        width: 64,
        height: 64,
        scheduler: scheduler as i32,
        sigmas: sigmas.to_vec(),
        ..Default::default()
    }
}

fn euler(sigmas: &[f32]) -> pb::GenerationSpec {
    spec(pb::Scheduler::Euler, sigmas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_sigmas_out_of_their_rules_are_refused_and_replay() {
    let server = TestServer::with_pipelines(&[]).await;
    let field = "spec.sigmas";
    let karras = pb::SchedulerOptions {
        sigma_schedule: pb::SigmaSchedule::Karras as i32,
        ..Default::default()
    };
    let refused = [
        ("increasing", euler(&[1.0, 5.0, 0.0]), vec![field]),
        ("repeated", euler(&[5.0, 5.0, 0.0]), vec![field]),
        ("negative", euler(&[5.0, 1.0, -0.1]), vec![field]),
        ("NaN", euler(&[5.0, f32::NAN, 0.0]), vec![field]),
        ("infinite", euler(&[f32::INFINITY, 1.0, 0.0]), vec![field]),
        ("beyond 1000", euler(&[1500.0, 1.0, 0.0]), vec![field]),
        ("one sigma", euler(&[5.0]), vec![field]),
        (
            "another count of steps",
            pb::GenerationSpec {
                steps: 3,
                ..euler(&[5.0, 1.0, 0.0])
            },
            vec!["spec.steps"],
        ),
        (
            "Euler ancestral",
            spec(pb::Scheduler::EulerAncestral, &[5.0, 1.0, 0.0]),
            vec![field],
        ),
        (
            "DPM-Solver++",
            spec(pb::Scheduler::DpmSolverMultistep, &[5.0, 1.0, 0.0]),
            vec![field],
        ),
        (
            "Karras sigmas",
            pb::GenerationSpec {
                scheduler_options: Some(karras),
                ..euler(&[5.0, 1.0, 0.0])
            },
            vec![field],
        ),
        (
            "beside custom timesteps",
            pb::GenerationSpec {
                timesteps: vec![999, 500],
                ..euler(&[5.0, 1.0, 0.0])
            },
            vec![field],
        ),
        (
            "more than the steps limit",
            euler(&(0..152).rev().map(|s| s as f32 / 10.0).collect::<Vec<_>>()),
            vec![field],
        ),
    ];
    for (what, spec, fields) in refused {
        server.assert_invalid(what, spec, &fields).await;
    }
    // The limit itself: 150 steps, 151 sigmas.
    let most: Vec<f32> = (0..151).rev().map(|s| s as f32 / 10.0).collect();
    let done = server.images(euler(&most)).await.expect("151 sigmas");
    assert_eq!(done.images.len(), 1);
    let custom = pb::GenerationSpec {
        seed: Some(5),
        ..euler(&[9.5, 2.25, 0.5, 0.0])
    };
    let replayed = server.assert_replays("custom sigmas", custom).await;
    assert_eq!(replayed.sigmas, [9.5, 2.25, 0.5, 0.0]);
    assert_eq!(replayed.steps, 3);
    server.assert_feature("sigmas").await;
}

/// `sdxld generate --sigmas` runs the recorded Align Your Steps case; sigmas that do not
/// decrease are refused naming the flag.
#[test]
fn custom_sigmas_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let path = schedule_fixtures().join("tiny2/cases.json");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json");
    let case = cases
        .iter()
        .find(|c| c["kind"] == "txt2img" && c["sigmas"].as_array().is_some_and(|s| s.len() == 12))
        .expect("the Align Your Steps case");
    let sigmas: Vec<String> = case["sigmas"]
        .as_array()
        .expect("sigmas")
        .iter()
        .map(ToString::to_string)
        .collect();
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("sigmas.png");
    let run = |sigmas: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny2/pipeline"))
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args(["--guidance", &case["guidance"].to_string()])
            .args(["--seed", &case["seed"].to_string(), "--sigmas", sigmas])
            .flag("--output", &png)
    };
    run(&sigmas.join(",")).succeeds();
    let reference = read_tensors(&schedule_fixtures().join("tiny2/cases.safetensors"));
    let key = format!("{}.images", case["name"].as_str().expect("name"));
    assert_images_match(
        "CLI custom sigmas",
        &common::image_file(&png),
        &reference[&key].get(0),
    );
    let message = run("1,5,0").fails();
    assert!(message.contains("--sigmas"), "{message}");
}
