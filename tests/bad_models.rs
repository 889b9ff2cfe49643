//! Broken model folders give errors that name the file and the tensor; nothing panics.

mod common;

use std::path::{Path, PathBuf};

use sdxld::engine::error::EngineError;
use sdxld::engine::pipeline::{Placement, SdxlPipeline};
use tch::Tensor;

/// A private copy of the tiny2 pipeline to break.
fn copy_pipeline() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("pipeline");
    copy_dir(&common::fixtures().join("tiny2/pipeline"), &dest);
    (dir, dest)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn load_err(dir: &Path) -> EngineError {
    match SdxlPipeline::load(dir, Placement::cpu()) {
        Ok(_) => panic!("a broken pipeline loaded"),
        Err(e) => e,
    }
}

/// Rewrites a safetensors file after `edit` changes its tensors.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = Tensor::read_safetensors(path).expect("read");
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, path).expect("write");
}

#[test]
fn a_missing_config_names_the_file() {
    let (_tmp, dir) = copy_pipeline();
    std::fs::remove_file(dir.join("unet/config.json")).expect("rm");
    let err = load_err(&dir);
    assert!(matches!(err, EngineError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("unet/config.json"), "{err}");
}

#[test]
fn a_truncated_file_names_the_file() {
    let (_tmp, dir) = copy_pipeline();
    let path = dir.join("text_encoder_2/model.safetensors");
    let len = std::fs::metadata(&path).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(len / 2).expect("truncate");
    let err = load_err(&dir);
    assert!(matches!(err, EngineError::WeightFile { .. }), "{err:?}");
    assert!(
        err.to_string().contains("text_encoder_2/model.safetensors"),
        "{err}"
    );
}

#[test]
fn a_garbage_header_is_refused() {
    let (_tmp, dir) = copy_pipeline();
    let path = dir.join("vae/diffusion_pytorch_model.safetensors");
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").expect("write");
    let err = load_err(&dir);
    assert!(matches!(err, EngineError::WeightFile { .. }), "{err:?}");
}

#[test]
fn a_wrong_shape_names_the_file_and_the_tensor() {
    let (_tmp, dir) = copy_pipeline();
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    rewrite(&path, |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == "conv_in.weight" {
                *t = t.narrow(0, 0, 16);
            }
        }
    });
    let err = load_err(&dir);
    let text = err.to_string();
    assert!(matches!(err, EngineError::ShapeMismatch { .. }), "{err:?}");
    assert!(
        text.contains("`conv_in.weight`")
            && text.contains("unet/diffusion_pytorch_model.safetensors"),
        "{text}"
    );
    assert!(
        text.contains("[16, 4, 3, 3]") && text.contains("[32, 4, 3, 3]"),
        "{text}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let (_tmp, dir) = copy_pipeline();
    let path = dir.join("vae/diffusion_pytorch_model.safetensors");
    rewrite(&path, |tensors| {
        tensors.retain(|(name, _)| name != "decoder.conv_out.bias")
    });
    let err = load_err(&dir);
    assert!(matches!(err, EngineError::MissingTensor { .. }), "{err:?}");
    assert!(err.to_string().contains("`decoder.conv_out.bias`"), "{err}");
}

#[test]
fn an_unknown_tensor_is_named() {
    let (_tmp, dir) = copy_pipeline();
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    rewrite(&path, |tensors| {
        tensors.push((
            "down_blocks.9.extra.weight".into(),
            Tensor::zeros([2], tch::kind::FLOAT_CPU),
        ))
    });
    let err = load_err(&dir);
    assert!(matches!(err, EngineError::UnknownTensor { .. }), "{err:?}");
    assert!(
        err.to_string().contains("`down_blocks.9.extra.weight`"),
        "{err}"
    );
}

#[test]
fn the_command_line_reports_the_broken_file() {
    let (_tmp, dir) = copy_pipeline();
    let path = dir.join("text_encoder/model.safetensors");
    std::fs::write(&path, b"").expect("empty");
    let stderr = common::cli::sdxld("generate")
        .flag("--model", &dir)
        .args(["--steps", "1"])
        .fails();
    assert!(
        stderr.contains("text_encoder/model.safetensors"),
        "{stderr}"
    );
}
