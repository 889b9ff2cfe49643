//! Shared helpers of the integration tests: the diffusers fixtures and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub mod server;

use tch::{Kind, Tensor};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture folder written by `tests/fixtures/make_fixtures.py` (built when missing).
pub fn fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("SDXLD_FIXTURES") {
            return PathBuf::from(dir);
        }
        let python = repo().join(".venv/bin/python");
        let output = Command::new(&python)
            .arg(repo().join("tests/fixtures/make_fixtures.py"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (run scripts/test)", python.display()));
        assert!(
            output.status.success(),
            "fixture script failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
    })
    .clone()
}

/// The tiny configurations the fixtures hold.
pub const CONFIGS: [&str; 2] = ["tiny2", "tiny3"];

/// All tensors of a safetensors file.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Relative error as architecture.md defines it: max |a - b| / max |b|.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let a = actual.to_kind(Kind::Double);
    let b = expected.to_kind(Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    diff / scale.max(1e-12)
}

/// Asserts latents-level parity (relative error below 1e-3).
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let err = relative_error(actual, expected);
    assert!(err < 1e-3, "{what}: relative error {err:e} exceeds 1e-3");
}

/// Asserts 8-bit image parity (no channel off by more than 2).
pub fn assert_images_match(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(
        actual.size(),
        expected.size(),
        "{what}: image shapes differ"
    );
    let diff = (actual.to_kind(Kind::Int) - expected.to_kind(Kind::Int))
        .abs()
        .max()
        .int64_value(&[]);
    assert!(diff <= 2, "{what}: a channel differs by {diff} (> 2)");
}

/// An encoded image (PNG, JPEG, WebP) as a [H, W, 3] uint8 tensor.
pub fn decoded_image(bytes: &[u8]) -> Tensor {
    let rgb = image::load_from_memory(bytes).expect("an image").to_rgb8();
    let (w, h) = rgb.dimensions();
    Tensor::from_slice(rgb.as_raw()).reshape([i64::from(h), i64::from(w), 3])
}

/// An image file as a [H, W, 3] uint8 tensor.
pub fn image_file(path: &Path) -> Tensor {
    decoded_image(&std::fs::read(path).expect("the image file"))
}

/// Bytes of the float32 tensors of every safetensors file under `dir` (or of the file).
#[allow(dead_code)]
pub fn weights_bytes(dir: &Path) -> u64 {
    if dir.is_file() {
        return sdxld::engine::loading::weights::loaded_bytes(dir, None, tch::Kind::Float)
            .expect("header");
    }
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") {
            total += weights_bytes(&path);
        }
    }
    total
}

/// Asserts that `output` equals the reference case `name`: its latents (`<name>.latents`)
/// within the latent tolerance and its images (`<name>.images`) within 2 per channel.
#[allow(dead_code)]
pub fn assert_matches_case(
    what: &str,
    output: &sdxld::engine::pipeline::GenerateOutput,
    reference: &HashMap<String, Tensor>,
    name: &str,
) {
    assert_close(
        &format!("{what} latents"),
        &output.latents,
        &reference[&format!("{name}.latents")],
    );
    assert_images_match(
        &format!("{what} images"),
        &output.images,
        &reference[&format!("{name}.images")],
    );
}
