//! Guiders (`spec.guider`) against diffusers' `ClassifierFreeGuidance` and
//! `AdaptiveProjectedGuidance` in its modular SDXL pipeline
//! (`tests/fixtures/make_guider_fixtures.py`) over gRPC: images within two levels and
//! latents within 1e-3 for classifier-free guidance in an interval on a batch of two, APG
//! with momentum on a batch of two at guidance 9, APG with a small norm cap, eta 0.3, an
//! interval and guidance rescale at 64×96, APG image to image, APG under Heun (the
//! interval counting steps, not model calls), APG beside a ControlNet unit and CFG in an
//! interval beside a ControlNet in guess mode (outside the interval the prompt's batch
//! alone, ControlNets included, as the modular pipeline runs it), APG in both passes of
//! a latent hires pass on two images; the PNG
//! parameters, a replay from the PNG; a guider that guides no step gives the unguided
//! image beside every kind of input; refusals naming each field (and a guider on a
//! guidance-distilled UNet, refused once its config is read); the CLI.

use crate::common;

use common::server::{violated_fields, TestServer};
use common::{
    assert_images_match, fixtures, guider_fixtures, read_tensors, schedule_fixtures, Case,
};
use sdxld::proto::v1 as pb;
use tonic_types::StatusExt;

fn cases() -> Vec<Case> {
    common::cases_at(&guider_fixtures().join("cases.json"))
}

async fn server() -> TestServer {
    TestServer::with_pipelines_and_controlnets().await
}

fn float(case: &Case, key: &str) -> Option<f32> {
    case[key].as_f64().map(|v| v as f32)
}

fn guider_of(case: &Case) -> pb::Guider {
    let apg = case["guider"] == "apg";
    let kind = match case["guider"].as_str() {
        Some("apg") => pb::GuiderKind::Apg,
        Some("tcfg") => pb::GuiderKind::Tcfg,
        _ => pb::GuiderKind::Cfg,
    };
    pb::Guider {
        kind: kind as i32,
        start: float(case, "start"),
        stop: float(case, "stop"),
        momentum: float(case, "momentum"),
        norm_threshold: apg.then(|| float(case, "norm_threshold")).flatten(),
        eta: apg.then(|| float(case, "eta")).flatten(),
    }
}

/// The request of a recorded case.
fn spec_of(case: &Case) -> pb::GenerationSpec {
    let config = case["config"].as_str().expect("config");
    let kind = case["kind"].as_str().expect("kind");
    let strength = float(case, "strength");
    let init_image = (kind == "img2img").then(|| common::fixture_init_image(config, strength));
    let controlnets = match kind {
        "controlnet" => vec![pb::ControlNetUnit {
            control_mode: if case["guess_mode"] == true {
                pb::ControlMode::Guess
            } else {
                pb::ControlMode::Balanced
            } as i32,
            ..common::fixture_control_unit(config)
        }],
        _ => Vec::new(),
    };
    let hires = (kind == "hires").then(|| pb::HiresPass {
        scale: float(case, "hires_scale"),
        latent_upscale: pb::LatentUpscale::Bilinear as i32,
        steps: case["hires_steps"].as_u64().expect("hires_steps") as u32,
        strength: float(case, "hires_strength"),
        ..Default::default()
    });
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        guidance_scale: float(case, "guidance"),
        guidance_rescale: float(case, "guidance_rescale").unwrap_or(0.0),
        num_images: case["n"].as_u64().expect("n") as u32,
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        scheduler: common::wire_scheduler(case["scheduler"].as_str().expect("scheduler")),
        guider: Some(guider_of(case)),
        init_image,
        controlnets,
        hires,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guiders_match_diffusers() {
    let server = server().await;
    let reference = read_tensors(&guider_fixtures().join("cases.safetensors"));
    let all = cases();
    assert!(all.len() >= 10, "{} cases", all.len());
    for case in all {
        let key = case["name"].as_str().expect("name");
        let name = format!(
            "{key} ({} {} {})",
            case["config"], case["kind"], case["guider"]
        );
        server
            .assert_matches_case(&name, spec_of(&case), &reference, key)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guiders_are_written_replayed_and_checked() {
    let server = server().await;
    let all = cases();
    let apg = |c: &Case| c["guider"] == "apg" && c["kind"] == "text" && c["momentum"].is_f64();
    let tcfg = |c: &Case| c["guider"] == "tcfg" && c["kind"] == "text";
    for (what, case, written) in [
        (
            "APG",
            all.iter()
                .find(|c| apg(c))
                .expect("an APG case with momentum"),
            "Guider: \"APG, momentum -0.5, norm threshold 15, eta 1, interval 0 to 1\"",
        ),
        (
            "TCFG",
            all.iter().find(|c| tcfg(c)).expect("a TCFG case"),
            "Guider: \"TCFG, interval 0.2 to 1\"",
        ),
    ] {
        let spec = pb::GenerationSpec {
            num_images: 1,
            ..spec_of(case)
        };
        let without = pb::GenerationSpec {
            guider: None,
            ..spec.clone()
        };
        server
            .assert_entry_and_effect(what, spec.clone(), without, written)
            .await;
        let replayed = server.assert_replays(what, spec).await;
        assert_eq!(replayed.guider, Some(guider_of(case)));
    }
    server.assert_feature("guider").await;
    for (what, spec, fields) in refused_guiders() {
        server.assert_invalid(what, spec, &fields).await;
    }
    // A refiner after a guided base runs plain guidance.
    let refined = pb::GenerationSpec {
        refiner: Some(pb::RefinerStage {
            model: "tiny2/refiner".into(),
            mode: pb::RefinerMode::EnsembleOfExperts as i32,
            high_noise_fraction: Some(0.5),
            ..Default::default()
        }),
        steps: 4,
        ..guided(apg_guider(pb::Guider::default()))
    };
    assert_eq!(
        server.images(refined).await.expect("refined").images.len(),
        1
    );
}

/// A 64² two-step request with `guider`.
fn guided(guider: pb::Guider) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a boat".into(),
        steps: 2,
        width: 64,
        height: 64,
        guider: Some(guider),
        ..Default::default()
    }
}

/// `g` as an APG guider.
fn apg_guider(g: pb::Guider) -> pb::Guider {
    pb::Guider {
        kind: pb::GuiderKind::Apg as i32,
        ..g
    }
}

/// Guiders refused before admission, each with the fields it names.
fn refused_guiders() -> Vec<(&'static str, pb::GenerationSpec, Vec<&'static str>)> {
    let with = guided;
    let apg = apg_guider;
    let default = pb::Guider::default;
    vec![
        (
            "start at 1",
            with(pb::Guider {
                start: Some(1.0),
                ..default()
            }),
            vec!["spec.guider.start"],
        ),
        (
            "stop at 0",
            with(pb::Guider {
                stop: Some(0.0),
                ..default()
            }),
            vec!["spec.guider.stop"],
        ),
        (
            "stop before start",
            with(pb::Guider {
                start: Some(0.6),
                stop: Some(0.4),
                ..default()
            }),
            vec!["spec.guider.stop"],
        ),
        (
            "APG options on CFG",
            with(pb::Guider {
                momentum: Some(0.1),
                eta: Some(0.5),
                ..default()
            }),
            vec!["spec.guider.momentum", "spec.guider.eta"],
        ),
        (
            "APG options on TCFG",
            with(pb::Guider {
                kind: pb::GuiderKind::Tcfg as i32,
                norm_threshold: Some(2.0),
                ..default()
            }),
            vec!["spec.guider.norm_threshold"],
        ),
        (
            "APG out of range",
            with(apg(pb::Guider {
                momentum: Some(1.0),
                norm_threshold: Some(-1.0),
                eta: Some(f32::NAN),
                ..default()
            })),
            vec![
                "spec.guider.momentum",
                "spec.guider.norm_threshold",
                "spec.guider.eta",
            ],
        ),
        (
            "an unknown kind",
            with(pb::Guider {
                kind: 9,
                ..default()
            }),
            vec!["spec.guider.kind"],
        ),
        (
            "guidance off",
            pb::GenerationSpec {
                guidance_scale: Some(1.0),
                ..with(apg(default()))
            },
            vec!["spec.guider"],
        ),
        (
            "beside PAG",
            pb::GenerationSpec {
                pag: Some(pb::PerturbedAttentionGuidance::default()),
                ..with(apg(default()))
            },
            vec!["spec.guider"],
        ),
    ]
}

/// A guidance-distilled UNet runs no classifier-free guidance: a guider on it is refused
/// naming `spec.guider` before admission (its config says so), not ignored, and the
/// server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guider_on_a_guidance_distilled_unet_is_refused() {
    let roots = format!("{},{}", fixtures().display(), schedule_fixtures().display());
    let server = TestServer::with_pipelines(&[("SDXLD__MODELS__BASE_ROOTS", &roots)]).await;
    let spec = pb::GenerationSpec {
        model: "tiny2/lcm_pipeline".into(),
        prompt: "a boat".into(),
        steps: 2,
        width: 64,
        height: 64,
        guider: Some(pb::Guider {
            kind: pb::GuiderKind::Apg as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = server.images(spec.clone()).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["spec.guider"], "{status:?}");
    let details = format!("{:?}", status.get_details_bad_request());
    assert!(details.contains("guidance-distilled"), "{details}");
    // Refused before admission: no job started.
    assert_eq!(server.metric("sdxld_jobs_started_total"), 0.0);
    let plain = pb::GenerationSpec {
        guider: None,
        ..spec
    };
    assert_eq!(server.images(plain).await.expect("plain").images.len(), 1);
}

/// Outside a guider's interval only the prompt's batch runs: a guider that guides no step
/// gives the unguided images pixel for pixel, with every input of the request taken for
/// that batch (two images beside a ControlNet, guess mode and a union model, the
/// 9-channel inpainting UNet, image to image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_interval_the_prompt_runs_alone() {
    let server = server().await;
    let base = pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: "a harbour at night".into(),
        seed: Some(5),
        steps: 4,
        guidance_scale: Some(6.0),
        width: 64,
        height: 64,
        ..Default::default()
    };
    let unit = common::fixture_control_unit("tiny2");
    let guess = pb::ControlNetUnit {
        control_mode: pb::ControlMode::Guess as i32,
        ..unit.clone()
    };
    let union = pb::ControlNetUnit {
        model: "tiny2/union".into(),
        control_type: pb::ControlType::CannyLineart as i32,
        ..unit.clone()
    };
    let dir = fixtures().join("tiny2");
    let inpaint = pb::InitImage {
        mask: std::fs::read(dir.join("mask.png")).expect("mask.png"),
        ..common::fixture_init_image("tiny2", Some(0.8))
    };
    let cases = [
        (
            "two images beside a ControlNet",
            pb::GenerationSpec {
                num_images: 2,
                controlnets: vec![unit.clone()],
                ..base.clone()
            },
        ),
        (
            "guess mode and a union model",
            pb::GenerationSpec {
                controlnets: vec![guess, union],
                ..base.clone()
            },
        ),
        (
            "the 9-channel inpainting UNet",
            pb::GenerationSpec {
                model: "tiny2/inpaint_pipeline".into(),
                init_image: Some(inpaint),
                steps: 6,
                ..base.clone()
            },
        ),
        (
            "image to image",
            pb::GenerationSpec {
                init_image: Some(common::fixture_init_image("tiny2", Some(0.6))),
                controlnets: vec![unit],
                ..base.clone()
            },
        ),
    ];
    for (what, spec) in cases {
        server
            .assert_unguided_outside_the_interval(what, spec)
            .await;
    }
}

/// `sdxld generate --guider apg,...` runs the recorded Heun case; an unknown option is
/// refused naming the flag.
#[test]
fn guider_over_the_cli_matches_diffusers() {
    use common::cli::sdxld;

    let case = cases()
        .into_iter()
        .find(|c| c["scheduler"] == "HeunDiscreteScheduler")
        .expect("the Heun case");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("guider.png");
    let run = |guider: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .flag("--guider", guider)
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "heun"])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--steps",
                &case["steps"].to_string(),
            ])
            .flag("--output", &png)
    };
    let guider = format!(
        "apg,momentum={},norm_threshold={},eta={},stop={}",
        case["momentum"], case["norm_threshold"], case["eta"], case["stop"]
    );
    run(&guider).succeeds();
    let reference = read_tensors(&guider_fixtures().join("cases.safetensors"));
    let key = format!("{}.images", case["name"].as_str().expect("name"));
    assert_images_match(
        "CLI guider",
        &common::image_file(&png),
        &reference[&key].get(0),
    );
    let message = run("apg,gamma=2").fails();
    assert!(message.contains("--guider"), "{message}");
    let message = run("apg,eta=3").fails();
    assert!(message.contains("--guider"), "{message}");
}
