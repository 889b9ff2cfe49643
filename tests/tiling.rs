//! Seamless tiling (`spec.tiling`) against diffusers with every Conv2d of its UNets and
//! VAE padding circularly (`tests/fixtures/make_tiling_fixtures.py`) over gRPC: images
//! within two levels and latents within 1e-3 for both axes, x only and y only, text to
//! image (batches, sizes that are not square), image to image (the VAE's encoder wraps
//! too), an ensemble of experts with the refiner, a ControlNet unit (which keeps zero
//! padding); the PNG parameters, a replay from the PNG, an image that differs from the one
//! without tiling; an unknown axis value refused naming the field; the CLI.

use crate::common;

use common::server::TestServer;
use common::{assert_images_match, fixtures, read_tensors, tiling_fixtures, Case};
use sdxld::proto::v1 as pb;

fn cases() -> Vec<Case> {
    common::cases_at(&tiling_fixtures().join("cases.json"))
}

async fn server() -> TestServer {
    TestServer::with_pipelines_and_controlnets().await
}

fn tiling_of(case: &Case) -> pb::Tiling {
    match case["axes"].as_str() {
        Some("both") => pb::Tiling::Both,
        Some("x") => pb::Tiling::X,
        Some("y") => pb::Tiling::Y,
        other => panic!("axes {other:?}"),
    }
}

/// The request of a recorded case.
fn spec_of(case: &Case) -> pb::GenerationSpec {
    let config = case["config"].as_str().expect("config");
    let steps = case["steps"].as_u64().expect("steps") as u32;
    let kind = case["kind"].as_str().expect("kind");
    let strength = case["strength"].as_f64().map(|s| s as f32);
    let init_image = (kind == "img2img").then(|| common::fixture_init_image(config, strength));
    let refiner = (kind == "refiner").then(|| pb::RefinerStage {
        model: format!("{config}/refiner"),
        mode: pb::RefinerMode::EnsembleOfExperts as i32,
        high_noise_fraction: case["fraction"].as_f64().map(|f| f as f32),
        steps,
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    });
    let controlnets = match kind {
        "controlnet" => vec![common::fixture_control_unit(config)],
        _ => Vec::new(),
    };
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64(),
        steps,
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        num_images: case["n"].as_u64().expect("n") as u32,
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        scheduler: pb::Scheduler::Euler as i32,
        tiling: tiling_of(case) as i32,
        init_image,
        refiner,
        controlnets,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiling_matches_diffusers_circular_padding() {
    let server = server().await;
    let reference = read_tensors(&tiling_fixtures().join("cases.safetensors"));
    for case in cases() {
        let key = case["name"].as_str().expect("name");
        let name = format!(
            "{key} ({} {} {})",
            case["config"], case["kind"], case["axes"]
        );
        server
            .assert_matches_case(&name, spec_of(&case), &reference, key)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiling_is_written_replayed_and_checked() {
    let server = server().await;
    let all = cases();
    // A1111's entry for both axes; without tiling another image.
    let spec = spec_of(&all[0]);
    let without = pb::GenerationSpec {
        tiling: pb::Tiling::Unspecified as i32,
        ..spec.clone()
    };
    server
        .assert_entry_and_effect("tiling", spec, without, "Tiling: True")
        .await;
    // One axis: named in the parameters, replayed from the PNG's spec.
    let one_axis = pb::GenerationSpec {
        num_images: 1,
        ..spec_of(&all[1])
    };
    let replayed = server.assert_replays("x tiling", one_axis.clone()).await;
    assert_eq!(replayed.tiling, pb::Tiling::X as i32);
    let first = server.images(one_axis).await.expect("x tiling");
    assert!(common::png_parameters(&first.images[0].data).contains("Tiling: X"));
    // An axis value the contract does not have.
    let unknown = pb::GenerationSpec {
        tiling: 7,
        ..spec_of(&all[0])
    };
    server
        .assert_invalid("tiling 7", unknown, &["spec.tiling"])
        .await;
    server.assert_feature("tiling").await;
}

/// `sdxld generate --tiling x` runs the recorded tiny3 case; an unknown axis is refused
/// naming the flag.
#[test]
fn tiling_over_the_cli_matches_diffusers() {
    use common::cli::sdxld;

    let case = cases()
        .into_iter()
        .find(|c| c["config"] == "tiny3" && c["kind"] == "text")
        .expect("tiny3 text case");
    assert_eq!(case["axes"], "x");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("tiling.png");
    let run = |axes: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .flag("--tiling", axes)
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
    run("x").succeeds();
    let reference = read_tensors(&tiling_fixtures().join("cases.safetensors"));
    let key = format!("{}.images", case["name"].as_str().expect("name"));
    assert_images_match(
        "CLI tiling",
        &common::image_file(&png),
        &reference[&key].get(0),
    );
    let message = run("z").fails();
    assert!(message.contains("--tiling"), "{message}");
}
