//! The `sdxld` binary: generation equal to diffusers, batch file naming, the demo model.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_close, assert_images_match, fixtures, read_tensors};
use tch::{Kind, Tensor};

fn sdxld() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdxld"))
}

fn read_png(path: &Path) -> Tensor {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let (w, h) = image.dimensions();
    Tensor::from_slice(image.as_raw()).reshape([h as i64, w as i64, 3])
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run sdxld");
    assert!(
        out.status.success(),
        "sdxld failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn generate_writes_the_image_and_latents_diffusers_makes() {
    // tiny3 case 1: non-square, prompt_2, a negative prompt and guidance rescale.
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("castle.png");
    let latents = dir.path().join("latents.safetensors");
    run_ok(
        sdxld()
            .arg("generate")
            .arg("--model")
            .arg(fixtures().join("tiny3/pipeline"))
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
            .args(["--device", "cpu"])
            .arg("--output")
            .arg(&png)
            .arg("--latents-out")
            .arg(&latents),
    );
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
    let stdout = run_ok(
        sdxld()
            .arg("generate")
            .arg("--model")
            .arg(fixtures().join("tiny2/pipeline"))
            .args(["--prompt", "a cat", "--negative-prompt", ""])
            .args(["--seed", "1234", "--steps", "2", "--guidance", "4"])
            .args(["--width", "64", "--height", "64", "--num-images", "3"])
            .args(["--device", "cpu"])
            .arg("--output")
            .arg(&png)
            .arg("--latents-out")
            .arg(&latents),
    );
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
    run_ok(sdxld().arg("demo-model").arg("--output").arg(&a));
    run_ok(sdxld().arg("demo-model").arg("--output").arg(&b));
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
    run_ok(
        sdxld()
            .arg("generate")
            .arg("--model")
            .arg(&a)
            .args(["--prompt", "a red apple", "--steps", "2", "--seed", "3"])
            .args(["--width", "64", "--height", "48", "--device", "cpu"])
            .arg("--output")
            .arg(&png),
    );
    let image = read_png(&png);
    assert_eq!(image.size(), vec![48, 64, 3]);
    // Random weights still give a picture, not a constant.
    let std = image.to_kind(Kind::Float).std(true).double_value(&[]);
    assert!(std > 1.0, "flat image (std {std})");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = sdxld()
        .arg("generate")
        .arg("--model")
        .arg(fixtures().join("tiny2/pipeline"))
        .args([
            "--width", "65", "--height", "64", "--steps", "1", "--device", "cpu",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`width` must be a positive multiple of 8, got 65"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_sends_a_spec_to_a_server() {
    let server = common::server::TestServer::start(&[]).await;
    let out = tempfile::tempdir().expect("tempdir");
    let run = |spec: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_sdxld"))
            .args(["request", "--server", &server.addr, "--spec", spec])
            .arg("--output-dir")
            .arg(out.path())
            .output()
            .expect("sdxld request runs");
        assert!(output.status.success(), "{output:?}");
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("a JSON line");
        report
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
