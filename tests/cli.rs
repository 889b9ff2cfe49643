//! The `sdxld` binary: generation equal to diffusers, batch file naming, the demo model.

use crate::common;

use std::path::Path;

use common::cli::sdxld;
use common::{assert_close, assert_images_match, fixtures, read_tensors};
use tch::{Kind, Tensor};

fn read_png(path: &Path) -> Tensor {
    common::image_file(path)
}

#[test]
fn generate_writes_the_image_and_latents_diffusers_makes() {
    generates_case_1(&[]);
}

#[test]
fn the_speed_options_leave_the_image_as_diffusers_makes_it() {
    // Weight layouts change how the weights sit, not what they compute; CUDA graphs and
    // cuDNN's autotuning apply on CUDA only.
    generates_case_1(&[
        "--channels-last",
        "--fused-projections",
        "--cuda-graphs",
        "--cudnn-benchmark",
    ]);
}

/// `sdxld generate` with `extra` flags on tiny3 case 1 (non-square, prompt_2, a negative
/// prompt and guidance rescale) writes diffusers' image and latents.
fn generates_case_1(extra: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("castle.png");
    let latents = dir.path().join("latents.safetensors");
    sdxld("generate")
        .flag("--model", fixtures().join("tiny3/pipeline"))
        .args(["--prompt", "a castle on a hill, oil painting"])
        .args(["--prompt-2", "highly detailed, golden hour"])
        .args(["--negative-prompt", "blurry, low quality"])
        .args(["--seed", "7", "--steps", "3", "--guidance", "7.5"])
        .args([
            "--guidance-rescale",
            "0.7",
            "--width",
            "96",
            "--height",
            "64",
        ])
        .flag("--output", &png)
        .flag("--latents-out", &latents)
        .args(extra)
        .succeeds();
    let reference = read_tensors(&fixtures().join("tiny3/case_1.safetensors"));
    let written = read_tensors(&latents);
    assert_eq!(written.len(), 1, "one tensor named `latents`");
    assert_eq!(written["latents"].kind(), Kind::Float);
    assert_close("CLI latents", &written["latents"], &reference["latents"]);
    assert_images_match("CLI image", &read_png(&png), &reference["images"].get(0));
}

#[test]
fn a_batch_writes_numbered_files_with_seed_plus_i() {
    // tiny2 case 2: three images, explicit empty negative prompt.
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("cat.png");
    let latents = dir.path().join("l.safetensors");
    let stdout = sdxld("generate")
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .args(["--prompt", "a cat", "--negative-prompt", ""])
        .args(["--seed", "1234", "--steps", "2", "--guidance", "4"])
        .args(["--width", "64", "--height", "64", "--num-images", "3"])
        .flag("--output", &png)
        .flag("--latents-out", &latents)
        .succeeds();
    let reference = read_tensors(&fixtures().join("tiny2/case_2.safetensors"));
    let written = read_tensors(&latents);
    assert_eq!(written["latents"].size(), vec![3, 4, 8, 8]);
    assert_close("batch latents", &written["latents"], &reference["latents"]);
    for (i, name) in ["cat.png", "cat-1.png", "cat-2.png"].iter().enumerate() {
        let image = read_png(&dir.path().join(name));
        assert_images_match(name, &image, &reference["images"].get(i as i64));
        assert!(stdout.contains(&format!("seed {}", 1234 + i)), "{stdout}");
    }
}

#[test]
fn the_demo_model_is_deterministic_and_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    sdxld("demo-model").flag("--output", &a).succeeds();
    sdxld("demo-model").flag("--output", &b).succeeds();
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/vocab.json",
    ] {
        let (x, y) = (
            std::fs::read(a.join(file)).expect(file),
            std::fs::read(b.join(file)).expect(file),
        );
        assert!(x == y, "{file} differs between two writes");
    }
    let png = dir.path().join("demo.png");
    sdxld("generate")
        .flag("--model", &a)
        .args(["--prompt", "a red apple", "--steps", "2", "--seed", "3"])
        .args(["--width", "80", "--height", "64"])
        .flag("--output", &png)
        .succeeds();
    let image = read_png(&png);
    assert_eq!(image.size(), vec![64, 80, 3]);
    // Random weights still give a picture, not a constant.
    let std = image.to_kind(Kind::Float).std(true).double_value(&[]);
    assert!(std > 1.0, "flat image (std {std})");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let stderr = sdxld("generate")
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .args(["--width", "65", "--height", "64", "--steps", "1"])
        .fails();
    // The flag, the field of the request it sets, the rule and the value.
    assert!(
        stderr.contains("--width: `spec.width` must be a multiple of 8")
            && stderr.contains("got 65"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_sends_a_spec_to_a_server() {
    let server = common::server::TestServer::start(&[]).await;
    let out = tempfile::tempdir().expect("tempdir");
    let run = |spec: &str| {
        let stdout = sdxld("request")
            .args(["--server", &server.addr, "--spec", spec])
            .flag("--output-dir", out.path())
            .succeeds();
        serde_json::from_str::<serde_json::Value>(&stdout).expect("a JSON line")
    };
    let ok = run(
        r#"{"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64, "seed": 3, "numImages": 2}"#,
    );
    assert_eq!(ok["code"], "OK", "{ok}");
    assert_eq!(ok["images"], 2);
    assert!(out.path().join("image-1.png").is_file());
    let bad = run(r#"{"prompt": "x", "width": 65}"#);
    assert_eq!(bad["code"], "InvalidArgument", "{bad}");
    assert!(bad["message"]
        .as_str()
        .is_some_and(|m| m.contains("spec.width")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_server_write_the_same_png_for_the_same_spec() {
    use sdxld::proto::v1 as pb;

    let model = fixtures().join("tiny2/pipeline");
    let server = common::server::TestServer::start(&[(
        "SDXLD__ENGINE__DEFAULT_MODEL",
        model.to_str().expect("utf-8"),
    )])
    .await;
    // Two images, a stochastic scheduler, a negative prompt, guidance rescale.
    let spec = pb::GenerationSpec {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("blurry".into()),
        guidance_scale: Some(6.5),
        guidance_rescale: 0.5,
        steps: 3,
        seed: Some(11),
        width: 72,
        height: 64,
        num_images: 2,
        scheduler: pb::Scheduler::EulerAncestral as i32,
        ..Default::default()
    };
    let served = server
        .images(spec)
        .await
        .expect("the server generates")
        .images;
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("lighthouse.png");
    sdxld("generate")
        .flag("--model", &model)
        .args([
            "--prompt",
            "a lighthouse at dusk",
            "--negative-prompt",
            "blurry",
        ])
        .args(["--guidance", "6.5", "--guidance-rescale", "0.5"])
        .args([
            "--steps", "3", "--seed", "11", "--width", "72", "--height", "64",
        ])
        .args(["--num-images", "2", "--scheduler", "euler-ancestral"])
        .flag("--output", &png)
        .succeeds();
    for (i, name) in ["lighthouse.png", "lighthouse-1.png"].iter().enumerate() {
        let written = std::fs::read(dir.path().join(name)).expect(name);
        assert!(
            written == served[i].data,
            "{name}: the CLI's PNG differs from the server's image {i}"
        );
    }
}

#[test]
fn bench_profiles_every_stage_once_per_run_of_it() {
    // tiny2: a CrossAttnDownBlock2D of 2 attentions × 2 layers, a mid block of 2
    // layers, a CrossAttnUpBlock2D of 3 attentions × 2 layers; guidance batches both
    // halves into one UNet call per step.
    let dir = tempfile::tempdir().expect("tempdir");
    let folded = dir.path().join("profile.folded");
    let steps = 3;
    let out = sdxld("bench")
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .args([
            "--prompt",
            "a lighthouse",
            "--steps",
            "3",
            "--guidance",
            "5",
        ])
        .args(["--width", "64", "--height", "64", "--runs", "1"])
        .flag("--profile", &folded)
        .succeeds();
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert!(report["median_s"].as_f64().is_some_and(|s| s > 0.0));
    let profile = report["profile"].as_object().expect("a profile");
    let count = |path: &str| {
        profile
            .get(path)
            .and_then(|s| s["count"].as_u64())
            .unwrap_or_else(|| panic!("no stage {path} in {:?}", profile.keys()))
    };
    for (path, expected) in [
        ("text_encoders", 1),
        ("denoise_step", steps),
        ("denoise_step;unet", steps),
        ("denoise_step;scheduler", steps),
        ("denoise_step;unet;down0;resnet", 2 * steps),
        ("denoise_step;unet;down1;transformer", 2 * steps),
        (
            "denoise_step;unet;down1;transformer;self_attention",
            4 * steps,
        ),
        (
            "denoise_step;unet;mid;transformer;cross_attention",
            2 * steps,
        ),
        ("denoise_step;unet;up0;transformer;feed_forward", 6 * steps),
        ("denoise_step;unet;up0;upsample", steps),
        ("vae_decode", 1),
        ("image_encode", 1),
    ] {
        assert_eq!(count(path), expected, "{path}");
    }
    assert!(
        !profile.contains_key("denoise_step;controlnet"),
        "a ControlNet stage without units"
    );
    // On the CPU the host does the work itself: its time is the stage's time.
    let unet = &profile["denoise_step;unet"];
    let (host, total) = (unet["host_ms"].as_f64(), unet["total_ms"].as_f64());
    assert!(
        matches!((host, total), (Some(h), Some(t)) if t > 0.0 && (h - t).abs() <= 0.1 * t),
        "host {host:?} ms against {total:?} ms"
    );
    // A stage holds the stages inside it: their times add up to no more than its own.
    for (path, stage) in profile {
        let total = stage["total_ms"].as_f64().expect("total");
        let inner: f64 = profile
            .iter()
            .filter(|(p, _)| {
                p.strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with(';') && !rest[1..].contains(';'))
            })
            .map(|(_, s)| s["total_ms"].as_f64().expect("total"))
            .sum();
        assert!(
            inner <= total * 1.0001 + 1e-3,
            "{path}: {inner} ms inside {total} ms"
        );
        assert!(stage["self_ms"].as_f64().is_some_and(|s| s >= 0.0));
    }
    // The folded stacks name the same stages, with their own time in microseconds.
    let written = std::fs::read_to_string(&folded).expect("the folded stacks");
    let mut paths = Vec::new();
    for line in written.lines() {
        let (path, micros) = line.rsplit_once(' ').expect("`path micros`");
        micros.parse::<u64>().expect("whole microseconds");
        paths.push(path.to_string());
    }
    assert_eq!(paths, profile.keys().cloned().collect::<Vec<_>>());
}
