//! The built-in demo model: a small random-weight SDXL pipeline in the diffusers layout,
//! written by sdxld itself so that the whole path works with no download. Its images are
//! noise-like (the weights are random); its architecture is SDXL's at a small width.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::models::clip::{ClipTextConfig, ClipTextModel};
use crate::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::engine::models::vae::{AutoencoderKL, VaeConfig};
use crate::engine::weights::Weights;

/// Byte-level symbols only (no merges), plus CLIP's two special tokens.
const VOCAB_SIZE: i64 = 514;
const BOS_ID: i64 = 512;
const EOS_ID: i64 = 513;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, value: &Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes tensors as one float32 safetensors file.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        let values: Vec<f32> = Vec::try_from(tensor.flatten(0, -1))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::WeightFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    safetensors::tensor::serialize_to_file(views, None, path).map_err(|e| EngineError::WeightFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn text_encoder_config(
    hidden: i64,
    layers: i64,
    heads: i64,
    act: &str,
    projection: Option<i64>,
) -> Value {
    let mut config = json!({
        "architectures": [if projection.is_some() { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "model_type": "clip_text_model",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "dtype": "float32"
    });
    if let (Some(dim), Some(map)) = (projection, config.as_object_mut()) {
        map.insert("projection_dim".into(), json!(dim));
    }
    config
}

fn write_tokenizer(dir: &Path, pad: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let symbols: Vec<String> = crate::engine::models::tokenizer::byte_symbols()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, s) in symbols.iter().enumerate() {
        vocab.insert(s.clone(), json!(i));
    }
    for (i, s) in symbols.iter().enumerate() {
        vocab.insert(format!("{s}</w>"), json!(i + 256));
    }
    vocab.insert("<|startoftext|>".into(), json!(BOS_ID));
    vocab.insert("<|endoftext|>".into(), json!(EOS_ID));
    write_json(&dir.join("vocab.json"), &Value::Object(vocab))?;
    let merges = dir.join("merges.txt");
    std::fs::write(&merges, "#version: 0.2\n").map_err(io_err(&merges))?;
    let special = json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad
    });
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    let mut config = special;
    if let Some(map) = config.as_object_mut() {
        map.insert("model_max_length".into(), json!(77));
        map.insert("tokenizer_class".into(), json!("CLIPTokenizer"));
    }
    write_json(&dir.join("tokenizer_config.json"), &config)
}

/// Writes the demo pipeline to `out`, deterministic for `seed`.
pub fn write_demo_model(out: &Path, seed: u64) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    let sched = out.join("scheduler");
    std::fs::create_dir_all(&sched).map_err(io_err(&sched))?;
    write_json(
        &sched.join("scheduler_config.json"),
        &json!({
            "_class_name": "EulerDiscreteScheduler",
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
            "use_karras_sigmas": false, "final_sigmas_type": "zero",
            "clip_sample": false, "set_alpha_to_one": false, "sample_max_value": 1.0,
            "skip_prk_steps": true
        }),
    )?;
    write_tokenizer(&out.join("tokenizer"), "<|endoftext|>")?;
    write_tokenizer(&out.join("tokenizer_2"), "!")?;

    let components: [(&str, &str, Value); 4] = [
        (
            "text_encoder",
            "model",
            text_encoder_config(64, 4, 4, "quick_gelu", None),
        ),
        (
            "text_encoder_2",
            "model",
            text_encoder_config(96, 4, 4, "gelu", Some(64)),
        ),
        (
            "unet",
            "diffusion_pytorch_model",
            json!({
                "_class_name": "UNet2DConditionModel",
                "sample_size": 32, "in_channels": 4, "out_channels": 4,
                "block_out_channels": [32, 64, 128], "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "attention_head_dim": [2, 4, 8], "transformer_layers_per_block": [1, 1, 2],
                "cross_attention_dim": 160, "use_linear_projection": true,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 16,
                "projection_class_embeddings_input_dim": 16 * 6 + 64,
                "norm_num_groups": 16, "norm_eps": 1e-5, "flip_sin_to_cos": true, "freq_shift": 0
            }),
        ),
        (
            "vae",
            "diffusion_pytorch_model",
            json!({
                "_class_name": "AutoencoderKL",
                "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "norm_num_groups": 8, "sample_size": 256, "scaling_factor": 0.13025, "force_upcast": true
            }),
        ),
    ];
    for (index, (name, stem, config)) in components.into_iter().enumerate() {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let config_path = dir.join("config.json");
        write_json(&config_path, &config)?;
        let weights = Weights::random(seed.wrapping_mul(31).wrapping_add(index as u64));
        let root = weights.root();
        match name {
            "text_encoder" => drop(ClipTextModel::load(
                &root,
                parse::<ClipTextConfig>(&config_path, &config)?,
                false,
            )?),
            "text_encoder_2" => drop(ClipTextModel::load(
                &root,
                parse::<ClipTextConfig>(&config_path, &config)?,
                true,
            )?),
            "unet" => drop(UNet2DConditionModel::load(
                &root,
                parse::<UNetConfig>(&config_path, &config)?,
                &config_path,
            )?),
            _ => drop(AutoencoderKL::load(
                &root,
                parse::<VaeConfig>(&config_path, &config)?,
            )?),
        }
        save_safetensors(
            &dir.join(format!("{stem}.safetensors")),
            &weights.recorded(),
        )?;
    }
    Ok(())
}
