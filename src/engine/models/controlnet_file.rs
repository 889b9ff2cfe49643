//! Single-file ControlNets: one `.safetensors` file in diffusers key names, as they are
//! shared for A1111 and ComfyUI, with no config beside it. The config is inferred from
//! the tensor shapes: block widths and types, layers per block, transformer depths,
//! linear or convolutional projections, the text and size conditioning widths, the
//! conditioning embedding's widths, and for union models their fusion. What the shapes
//! cannot tell takes SDXL's values: 32 norm groups, attention heads from 64-wide heads, a
//! pooled text embedding 1280 wide (so the size embedding is a sixth of the rest), RGB
//! input, no pooled residuals, 8 heads in a union model's fusion.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::engine::error::{EngineError, Result};

/// SDXL's pooled text embedding width (the second text encoder's projection).
const POOLED_TEXT_WIDTH: i64 = 1280;
/// The head width SDXL's attention uses.
const HEAD_WIDTH: i64 = 64;

/// Tensor shapes by name.
pub(crate) type ShapeMap = BTreeMap<String, Vec<i64>>;

/// The diffusers config (`config.json` values) of the single-file ControlNet whose
/// tensors have `shapes`; a layout that is not a diffusers ControlNet's is refused naming
/// the key that shows it.
pub fn infer_config(path: &Path, shapes: &[(String, Vec<i64>)]) -> Result<Value> {
    let map: ShapeMap = shapes.iter().cloned().collect();
    let refuse = |key: &str, why: &str| EngineError::Config {
        path: path.to_path_buf(),
        message: format!("`{key}` {why}: not a single-file ControlNet in diffusers key names"),
    };
    for required in ["conv_in.weight", "controlnet_cond_embedding.conv_in.weight"] {
        if !map.contains_key(required) {
            let first = shapes.first().map_or("(no tensor)", |(k, _)| k.as_str());
            return Err(refuse(first, &format!("is there but `{required}` is not")));
        }
    }
    let shape =
        |key: &str| -> Result<&Vec<i64>> { map.get(key).ok_or_else(|| refuse(key, "is missing")) };
    let dim = |key: &str, axis: usize| -> Result<i64> {
        shape(key)?
            .get(axis)
            .copied()
            .ok_or_else(|| refuse(key, "has too few dimensions"))
    };
    let encoder = encoder_blocks(&map, &refuse)?;
    let mut config = json!({
        "_class_name": "ControlNetModel",
        "in_channels": dim("conv_in.weight", 1)?,
        "conditioning_channels": dim("controlnet_cond_embedding.conv_in.weight", 1)?,
        "block_out_channels": encoder.widths,
        "layers_per_block": encoder.layers,
        "down_block_types": encoder.types,
        "mid_block_type": if encoder.mid_attention { "UNetMidBlock2DCrossAttn" } else { "UNetMidBlock2D" },
        "transformer_layers_per_block": encoder.depths,
        "attention_head_dim": encoder.widths.iter().map(|w| (w / HEAD_WIDTH).max(1)).collect::<Vec<_>>(),
        "use_linear_projection": encoder.linear,
        "cross_attention_dim": encoder.cross.unwrap_or(2048),
        "conditioning_embedding_out_channels": embedding_widths(&map),
        "norm_num_groups": 32,
    });
    if let Some(input) = map
        .get("add_embedding.linear_1.weight")
        .and_then(|s| s.get(1))
    {
        let rest = input - POOLED_TEXT_WIDTH;
        if rest <= 0 || rest % 6 != 0 {
            return Err(refuse(
                "add_embedding.linear_1.weight",
                &format!(
                    "takes {input} values, not 1280 pooled text values and six size embeddings"
                ),
            ));
        }
        config["addition_embed_type"] = json!("text_time");
        config["addition_time_embed_dim"] = json!(rest / 6);
        config["projection_class_embeddings_input_dim"] = json!(input);
    }
    if let Some(table) = map.get("task_embedding") {
        union_keys(&mut config, &map, table);
    }
    Ok(config)
}

/// What the down and mid blocks' shapes say.
struct EncoderBlocks {
    widths: Vec<i64>,
    layers: i64,
    types: Vec<&'static str>,
    depths: Vec<i64>,
    linear: bool,
    cross: Option<i64>,
    mid_attention: bool,
}

/// The encoder's blocks from their tensors; `refuse` names a key that does not fit.
fn encoder_blocks(
    map: &ShapeMap,
    refuse: &dyn Fn(&str, &str) -> EngineError,
) -> Result<EncoderBlocks> {
    let dim = |key: &str, axis: usize| -> Result<i64> {
        map.get(key)
            .ok_or_else(|| refuse(key, "is missing"))?
            .get(axis)
            .copied()
            .ok_or_else(|| refuse(key, "has too few dimensions"))
    };
    let blocks = count(map, "down_blocks.");
    if blocks == 0 {
        return Err(refuse("down_blocks.0.resnets.0.conv1.weight", "is missing"));
    }
    let layers = count(map, "down_blocks.0.resnets.");
    let mut widths = Vec::new();
    let mut types = Vec::new();
    let mut depths = Vec::new();
    let mut linear = true;
    let mut cross = None;
    for i in 0..blocks {
        widths.push(dim(&format!("down_blocks.{i}.resnets.0.conv2.weight"), 0)?);
        let attention = format!("down_blocks.{i}.attentions.0.");
        if let Some(proj) = map.get(&format!("{attention}proj_in.weight")) {
            types.push("CrossAttnDownBlock2D");
            depths.push(count(map, &format!("{attention}transformer_blocks.")));
            linear = proj.len() == 2;
            cross = Some(dim(
                &format!("{attention}transformer_blocks.0.attn2.to_k.weight"),
                1,
            )?);
        } else {
            types.push("DownBlock2D");
            depths.push(1);
        }
    }
    let mid_attention = map.contains_key("mid_block.attentions.0.proj_in.weight");
    if mid_attention {
        let mid_depth = count(map, "mid_block.attentions.0.transformer_blocks.");
        if Some(&mid_depth) != depths.last() {
            return Err(refuse(
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "gives the mid block another transformer depth than the last down block",
            ));
        }
        cross = cross.or(Some(dim(
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            1,
        )?));
    }
    Ok(EncoderBlocks {
        widths,
        layers,
        types,
        depths,
        linear,
        cross,
        mid_attention,
    })
}

/// The union keys a union model's shapes give (its fusion's heads cannot be seen: the
/// published models' 8).
fn union_keys(config: &mut Value, map: &ShapeMap, table: &[i64]) {
    config["_class_name"] = json!("ControlNetUnionModel");
    config["num_control_type"] = json!(table.first().copied().unwrap_or(0));
    config["num_trans_channel"] = json!(table.get(1).copied().unwrap_or(0));
    config["num_trans_layer"] = json!(count(map, "transformer_layes."));
    config["num_trans_head"] = json!(8);
    let projection = map
        .get("spatial_ch_projs.weight")
        .and_then(|s| s.first().copied())
        .unwrap_or(0);
    config["num_proj_channel"] = json!(projection);
    if let Some(obj) = config.as_object_mut() {
        obj.remove("mid_block_type");
    }
}

/// The conditioning embedding's widths: its first convolution's, then each downscaling
/// convolution's (the odd blocks).
pub(crate) fn embedding_widths(map: &ShapeMap) -> Vec<i64> {
    let first = map
        .get("controlnet_cond_embedding.conv_in.weight")
        .and_then(|s| s.first().copied())
        .unwrap_or(0);
    let blocks = count(map, "controlnet_cond_embedding.blocks.");
    std::iter::once(first)
        .chain((1..blocks).step_by(2).filter_map(|i| {
            map.get(&format!("controlnet_cond_embedding.blocks.{i}.weight"))
                .and_then(|s| s.first().copied())
        }))
        .collect()
}

/// How many numbered children `prefix` has.
fn count(map: &ShapeMap, prefix: &str) -> i64 {
    crate::engine::weights::numbered_children(map.keys().map(String::as_str), prefix)
}
