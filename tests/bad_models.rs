//! Broken model folders give errors that name the file and the tensor; nothing panics.

use crate::common;

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

#[test]
fn every_impossible_config_value_is_refused_naming_its_file_and_key() {
    use serde_json::json;
    let cases = [
        ("text_encoder/config.json", "num_attention_heads", json!(0)),
        ("text_encoder/config.json", "hidden_size", json!(30)),
        ("text_encoder_2/config.json", "num_hidden_layers", json!(0)),
        ("text_encoder_2/config.json", "layer_norm_eps", json!(-1.0)),
        (
            "text_encoder_2/config.json",
            "eos_token_id",
            json!(1_000_000),
        ),
        ("unet/config.json", "norm_num_groups", json!(0)),
        ("unet/config.json", "norm_num_groups", json!(7)),
        ("unet/config.json", "block_out_channels", json!([32, 0])),
        ("unet/config.json", "layers_per_block", json!(0)),
        ("unet/config.json", "cross_attention_dim", json!(0)),
        ("unet/config.json", "attention_head_dim", json!([2, 3])),
        (
            "unet/config.json",
            "transformer_layers_per_block",
            json!([1, 0]),
        ),
        (
            "unet/config.json",
            "down_block_types",
            json!(["DownBlock2D"]),
        ),
        (
            "unet/config.json",
            "up_block_types",
            json!(["Up", "UpBlock2D"]),
        ),
        ("unet/config.json", "norm_eps", json!(0.0)),
        ("unet/config.json", "sample_size", json!(0)),
        ("unet/config.json", "act_fn", json!("gelu")),
        ("unet/config.json", "attention_type", json!("gated")),
        ("unet/config.json", "conv_in_kernel", json!(5)),
        ("unet/config.json", "time_embedding_type", json!("fourier")),
        ("unet/config.json", "addition_time_embed_dim", json!(null)),
        ("vae/config.json", "latent_channels", json!(0)),
        ("vae/config.json", "block_out_channels", json!([])),
        ("vae/config.json", "block_out_channels", json!(vec![8; 70])),
        ("vae/config.json", "scaling_factor", json!(0)),
        (
            "vae/config.json",
            "latents_std",
            json!([1.0, 0.0, 1.0, 1.0]),
        ),
        ("vae/config.json", "latents_mean", json!([0.0])),
        ("vae/config.json", "act_fn", json!("relu")),
        (
            "vae/config.json",
            "up_block_types",
            json!(["AttnUpDecoderBlock2D"]),
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(0),
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(1_000_000_000),
        ),
        ("scheduler/scheduler_config.json", "beta_end", json!(1.5)),
        (
            "scheduler/scheduler_config.json",
            "trained_betas",
            json!([0.1]),
        ),
        ("scheduler/scheduler_config.json", "solver_order", json!(7)),
        (
            "scheduler/scheduler_config.json",
            "timestep_type",
            json!("continuous"),
        ),
        (
            "scheduler/scheduler_config.json",
            "_class_name",
            json!("FooScheduler"),
        ),
    ];
    for (file, key, value) in cases {
        let (_tmp, dir) = copy_pipeline();
        common::set_config(&dir.join(file), key, value.clone());
        let err = load_err(&dir);
        let text = err.to_string();
        assert!(
            matches!(err, EngineError::Config { .. }),
            "{file} {key}={value}: {err:?}"
        );
        assert!(
            text.contains(file) && text.contains(&format!("`{key}`")),
            "{file} {key}={value}: {text}"
        );
    }
}

#[test]
fn single_file_configs_are_checked_as_folders_are() {
    use sdxld::engine::loading::single_file::{Configs, CONFIGS_KEY};
    let mut configs = serde_json::json!({
        "unet": serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(common::fixtures().join("tiny2/pipeline/unet/config.json")).expect("read")
        ).expect("json"),
    });
    for (part, folder) in [
        ("vae", "vae/config.json"),
        ("text_encoder", "text_encoder/config.json"),
        ("text_encoder_2", "text_encoder_2/config.json"),
        ("scheduler", "scheduler/scheduler_config.json"),
    ] {
        let path = common::fixtures().join("tiny2/pipeline").join(folder);
        configs[part] =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    }
    let file = Path::new("model.safetensors");
    let metadata = |configs: &serde_json::Value| {
        std::collections::HashMap::from([(CONFIGS_KEY.to_string(), configs.to_string())])
    };
    Configs::from_metadata(file, &metadata(&configs)).expect("the fixture's configs");
    configs["text_encoder_2"]["num_attention_heads"] = 0.into();
    let err = Configs::from_metadata(file, &metadata(&configs)).expect_err("zero heads");
    let text = err.to_string();
    assert!(
        text.contains("model.safetensors#text_encoder_2") && text.contains("`num_attention_heads`"),
        "{text}"
    );
}

#[test]
fn a_text_encoder_shorter_than_its_tokenizer_is_refused() {
    // Consistent weights and config, but fewer positions (or token ids) than the
    // tokenizer gives: every prompt would index past the table.
    for (key, tensor, rows) in [
        ("max_position_embeddings", "position_embedding", 10),
        ("vocab_size", "token_embedding", 100),
    ] {
        let (_tmp, dir) = copy_pipeline();
        let config = dir.join("text_encoder_2/config.json");
        common::set_config(&config, key, rows.into());
        // The legacy pooling rule, which needs no end-of-text id in the table.
        common::set_config(&config, "eos_token_id", 2.into());
        rewrite(&dir.join("text_encoder_2/model.safetensors"), |tensors| {
            for (name, t) in tensors.iter_mut() {
                if name.ends_with(&format!("{tensor}.weight")) {
                    *t = t.narrow(0, 0, rows);
                }
            }
        });
        let err = load_err(&dir);
        let text = err.to_string();
        assert!(matches!(err, EngineError::Config { .. }), "{key}: {err:?}");
        assert!(
            text.contains("text_encoder_2/config.json") && text.contains(&format!("`{key}`")),
            "{text}"
        );
    }
}

#[test]
fn scheduler_names_the_schedulers_take_are_accepted_at_load() {
    // UniPC reads diffusers' other solver names as bh2; DPM-Solver++ its SDE variant.
    for (class, key, value) in [
        ("UniPCMultistepScheduler", "solver_type", "logrho"),
        ("UniPCMultistepScheduler", "solver_type", "bh1"),
        (
            "DPMSolverMultistepScheduler",
            "algorithm_type",
            "sde-dpmsolver++",
        ),
    ] {
        let (_tmp, dir) = copy_pipeline();
        let config = dir.join("scheduler/scheduler_config.json");
        common::set_config(&config, "_class_name", class.into());
        common::set_config(&config, key, value.into());
        if let Err(e) = SdxlPipeline::load(&dir, Placement::cpu()) {
            panic!("{class} {key}={value}: {e}");
        }
    }
}
