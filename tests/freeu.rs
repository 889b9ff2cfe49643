//! FreeU against diffusers' `unet.enable_freeu` (`tests/fixtures/make_freeu_fixtures.py`)
//! over gRPC: images within two levels and latents within 1e-3 on both tiny pipelines
//! (the published SDXL factors on a batch of two, other factors at 64×96, where the up
//! blocks' maps are not powers of two), the PNG parameters, an image that differs from
//! the one without FreeU; factors out of (0, 10] refused naming the field.

use crate::common;

use common::server::TestServer;
use common::{assert_images_match, fixtures, freeu_fixtures, read_tensors};
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn cases(config: &str) -> Vec<Value> {
    let path = freeu_fixtures().join(config).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("json")
}

async fn server() -> TestServer {
    TestServer::with_pipelines(&[]).await
}

fn factor(case: &Value, name: &str) -> Option<f32> {
    case["freeu"][name].as_f64().map(|f| f as f32)
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        num_images: case["n"].as_u64().expect("n") as u32,
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        scheduler: pb::Scheduler::Euler as i32,
        freeu: Some(pb::FreeU {
            b1: factor(case, "b1"),
            b2: factor(case, "b2"),
            s1: factor(case, "s1"),
            s2: factor(case, "s2"),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeu_matches_diffusers() {
    let server = server().await;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&freeu_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let key = case["name"].as_str().expect("name");
            let name = format!("{config} {key}");
            let spec = spec_of(config, &case);
            server
                .assert_matches_case(&name, spec, &reference, key)
                .await;
        }
    }
    // The published factors (unset ones) in the PNG parameters; without FreeU another image.
    let spec = pb::GenerationSpec {
        freeu: Some(pb::FreeU::default()),
        ..spec_of("tiny2", &cases("tiny2")[0])
    };
    let without = pb::GenerationSpec {
        freeu: None,
        ..spec.clone()
    };
    let entry = "FreeU: \"b1 1.3, b2 1.4, s1 0.9, s2 0.2\"";
    server
        .assert_entry_and_effect("FreeU", spec, without, entry)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeu_factors_out_of_range_are_refused_and_the_refiner_runs_without() {
    let server = server().await;
    let spec = |freeu: pb::FreeU| pb::GenerationSpec {
        prompt: "a boat".into(),
        steps: 1,
        width: 64,
        height: 64,
        freeu: Some(freeu),
        ..Default::default()
    };
    for (freeu, field) in [
        (
            pb::FreeU {
                b1: Some(0.0),
                ..Default::default()
            },
            "spec.freeu.b1",
        ),
        (
            pb::FreeU {
                b2: Some(10.5),
                ..Default::default()
            },
            "spec.freeu.b2",
        ),
        (
            pb::FreeU {
                s1: Some(f32::NAN),
                ..Default::default()
            },
            "spec.freeu.s1",
        ),
        (
            pb::FreeU {
                s2: Some(-0.2),
                ..Default::default()
            },
            "spec.freeu.s2",
        ),
    ] {
        server.assert_invalid(field, spec(freeu), &[field]).await;
    }
    let refined = pb::GenerationSpec {
        steps: 4,
        refiner: Some(pb::RefinerStage {
            model: "tiny2/refiner".into(),
            mode: pb::RefinerMode::EnsembleOfExperts as i32,
            high_noise_fraction: Some(0.5),
            ..Default::default()
        }),
        ..spec(pb::FreeU::default())
    };
    let done = server.images(refined).await.expect("with a refiner");
    assert_eq!(done.images.len(), 1);
}

/// `sdxld generate --freeu B1,B2,S1,S2` runs the tiny3 case; a factor of 0 is refused
/// naming the flag.
#[test]
fn freeu_over_the_cli_matches_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny3")[0];
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("freeu.png");
    let run = |factors: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .flag("--freeu", factors)
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--steps",
                &case["steps"].to_string(),
            ])
            .flag("--output", &png)
    };
    let f = &case["freeu"];
    run(&format!("{},{},{},{}", f["b1"], f["b2"], f["s1"], f["s2"])).succeeds();
    let reference = read_tensors(&freeu_fixtures().join("tiny3/cases.safetensors"));
    assert_images_match(
        "CLI FreeU",
        &common::image_file(&png),
        &reference["freeu_0.images"].get(0),
    );
    let message = run("0,1,1,1").fails();
    assert!(message.contains("--freeu"), "{message}");
}
