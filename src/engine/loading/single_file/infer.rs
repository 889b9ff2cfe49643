//! The configs of a single-file checkpoint that carries none, inferred from its tensor
//! shapes: the UNet's widths, levels, layers per block, block types, transformer depths
//! per block (and per up-block layer where they differ, as distilled models such as
//! SSD-1B and Segmind Vega have), linear or convolutional projections, cross-attention and
//! size-conditioning widths; the VAE's levels, widths, layers and latent channels; each
//! text encoder's width, depth, feed-forward width, positions, vocabulary and projection.
//! What the tensors cannot tell keeps SDXL base 1.0's values: 32 norm groups, 64-wide
//! attention heads, the activations, the VAE's scaling factor, the scheduler.

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::config_check::{CheckedConfig, ConfigCheck};
use crate::engine::error::{EngineError, Result};
use crate::engine::loading::single_file::{config_path, Configs};
use crate::engine::models::unet::PerBlock;

/// The attention head width SDXL-family models use.
const HEAD_WIDTH: i64 = 64;

/// Tensor shapes by name, read for one component (its prefix removed).
struct Shapes<'a> {
    map: BTreeMap<&'a str, &'a [i64]>,
    file: &'a Path,
    component: &'static str,
    prefix: &'static str,
}

impl<'a> Shapes<'a> {
    fn of(
        shapes: &'a [(String, Vec<i64>)],
        file: &'a Path,
        component: &'static str,
        prefix: &'static str,
    ) -> Self {
        let map = shapes
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?, v.as_slice())))
            .collect();
        Self {
            map,
            file,
            component,
            prefix,
        }
    }

    fn refuse(&self, key: &str, why: &str) -> EngineError {
        EngineError::Config {
            path: config_path(self.file, self.component),
            message: format!("`{}{key}` {why}", self.prefix),
        }
    }

    /// Dimension `axis` of `key`.
    fn dim(&self, key: &str, axis: usize) -> Result<i64> {
        self.map
            .get(key)
            .ok_or_else(|| self.refuse(key, "is missing"))?
            .get(axis)
            .copied()
            .ok_or_else(|| self.refuse(key, "has too few dimensions"))
    }

    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// How many numbered children `prefix` has.
    fn count(&self, prefix: &str) -> i64 {
        crate::engine::weights::numbered_children(self.map.keys().copied(), prefix)
    }
}

impl Configs {
    /// The configs of a checkpoint whose tensors have `shapes`: SDXL base 1.0's, with
    /// every value the shapes determine taken from them.
    pub fn infer(file: &Path, shapes: &[(String, Vec<i64>)]) -> Result<Self> {
        let mut configs = Self::sdxl_base();
        let te2 = Shapes::of(shapes, file, "text_encoder_2", super::TEXT_ENCODER_2);
        infer_open_clip(&te2, &mut configs)?;
        let te1 = Shapes::of(shapes, file, "text_encoder", super::TEXT_ENCODER);
        infer_clip(&te1, &mut configs)?;
        let pooled = configs.text_encoder_2.projection_dim.unwrap_or(1280);
        infer_unet(
            &Shapes::of(shapes, file, "unet", super::UNET),
            pooled,
            &mut configs,
        )?;
        infer_vae(&Shapes::of(shapes, file, "vae", super::VAE), &mut configs)?;
        check(file, "unet", &configs.unet)?;
        check(file, "vae", &configs.vae)?;
        check(file, "text_encoder", &configs.text_encoder)?;
        check(file, "text_encoder_2", &configs.text_encoder_2)?;
        Ok(configs)
    }
}

/// Checks an inferred config as a read one is checked.
fn check<C: CheckedConfig>(file: &Path, component: &str, config: &C) -> Result<()> {
    let mut problems = ConfigCheck::default();
    config.check(&mut problems);
    problems.finish(&config_path(file, component))
}

/// transformers' CLIP text model (`text_model.` keys).
fn infer_clip(s: &Shapes<'_>, configs: &mut Configs) -> Result<()> {
    let c = &mut configs.text_encoder;
    c.vocab_size = s.dim("text_model.embeddings.token_embedding.weight", 0)?;
    c.hidden_size = s.dim("text_model.embeddings.token_embedding.weight", 1)?;
    c.max_position_embeddings = s.dim("text_model.embeddings.position_embedding.weight", 0)?;
    c.num_hidden_layers = s.count("text_model.encoder.layers.");
    c.intermediate_size = s.dim("text_model.encoder.layers.0.mlp.fc1.weight", 0)?;
    c.num_attention_heads = (c.hidden_size / HEAD_WIDTH).max(1);
    Ok(())
}

/// OpenCLIP's text tower (`transformer.resblocks.` keys).
fn infer_open_clip(s: &Shapes<'_>, configs: &mut Configs) -> Result<()> {
    let c = &mut configs.text_encoder_2;
    c.vocab_size = s.dim("token_embedding.weight", 0)?;
    c.hidden_size = s.dim("token_embedding.weight", 1)?;
    c.max_position_embeddings = s.dim("positional_embedding", 0)?;
    c.num_hidden_layers = s.count("transformer.resblocks.");
    c.intermediate_size = s.dim("transformer.resblocks.0.mlp.c_fc.weight", 0)?;
    c.num_attention_heads = (c.hidden_size / HEAD_WIDTH).max(1);
    c.projection_dim = Some(s.dim("text_projection", 1)?);
    Ok(())
}

/// The original VAE layout (`encoder.down.{i}.block.{j}`).
fn infer_vae(s: &Shapes<'_>, configs: &mut Configs) -> Result<()> {
    let c = &mut configs.vae;
    let levels = s.count("encoder.down.");
    c.layers_per_block = s.count("encoder.down.0.block.");
    c.block_out_channels = (0..levels)
        .map(|i| s.dim(&format!("encoder.down.{i}.block.0.conv2.weight"), 0))
        .collect::<Result<_>>()?;
    c.in_channels = s.dim("encoder.conv_in.weight", 1)?;
    c.out_channels = s.dim("decoder.conv_out.weight", 0)?;
    c.latent_channels = s.dim("decoder.conv_in.weight", 1)?;
    Ok(())
}

/// The sgm UNet layout (`input_blocks`, `middle_block`, `output_blocks`).
fn infer_unet(s: &Shapes<'_>, pooled: i64, configs: &mut Configs) -> Result<()> {
    let inputs = s.count("input_blocks.");
    let downsamples: Vec<i64> = (0..inputs)
        .filter(|n| s.has(&format!("input_blocks.{n}.0.op.weight")))
        .collect();
    let levels = downsamples.len() as i64 + 1;
    let lpb = downsamples.first().map_or(inputs - 1, |first| first - 1);
    if lpb < 1 || inputs != 1 + levels * lpb + (levels - 1) {
        return Err(s.refuse(
            "input_blocks.0.0.weight",
            "starts input blocks that are not levels of equal depth",
        ));
    }
    let c = &mut configs.unet;
    c.in_channels = s.dim("input_blocks.0.0.weight", 1)?;
    c.out_channels = s.dim("out.2.weight", 0)?;
    c.layers_per_block = lpb;
    let (widths, down_types, depths) = down_levels(s, lpb, levels)?;
    let (up_types, reverse) = up_blocks(s, lpb, levels)?;
    let attention = |n: i64, block: &str| {
        s.map.iter().find_map(|(k, v)| {
            k.strip_prefix(&format!("{block}.{n}.1.transformer_blocks.0."))
                .filter(|rest| *rest == "attn2.to_k.weight")
                .and(v.get(1).copied())
        })
    };
    let cross = (0..inputs)
        .find_map(|n| attention(n, "input_blocks"))
        .unwrap_or(c.cross_attention_dim);
    let proj_in = s
        .map
        .iter()
        .find(|(k, _)| k.ends_with(".1.proj_in.weight"))
        .map(|(_, v)| v.len());
    let mid_depth = s.count("middle_block.1.transformer_blocks.");
    let reversed_down: Vec<Vec<i64>> = depths
        .iter()
        .rev()
        .zip(&down_types)
        .map(|(d, _)| vec![*d; (lpb + 1) as usize])
        .collect();
    let c = &mut configs.unet;
    c.attention_head_dim = Some(PerBlock::Many(
        widths.iter().map(|w| (w / HEAD_WIDTH).max(1)).collect(),
    ));
    c.block_out_channels = widths;
    c.down_block_types = down_types;
    c.up_block_types = up_types;
    c.transformer_layers_per_block = Some(PerBlock::Many(depths.clone()));
    c.reverse_transformer_layers_per_block = (reverse != reversed_down).then_some(reverse);
    c.cross_attention_dim = cross;
    c.use_linear_projection = proj_in.is_none_or(|dims| dims == 2);
    c.mid_block_type = (mid_depth == 0).then(|| "UNetMidBlock2D".to_string());
    if mid_depth > 0 && Some(&mid_depth) != depths.last() {
        return Err(s.refuse(
            "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            "gives the mid block another depth than the last level",
        ));
    }
    let label = s.dim("label_emb.0.0.weight", 1)?;
    let rest = label - pooled;
    if rest <= 0 || rest % 6 != 0 {
        return Err(s.refuse(
            "label_emb.0.0.weight",
            "does not take the pooled text embedding and six size embeddings",
        ));
    }
    c.addition_time_embed_dim = Some(rest / 6);
    c.projection_class_embeddings_input_dim = Some(label);
    Ok(())
}

/// Each down level's width, block type and transformer depth.
#[allow(clippy::type_complexity)]
fn down_levels(s: &Shapes<'_>, lpb: i64, levels: i64) -> Result<(Vec<i64>, Vec<String>, Vec<i64>)> {
    let (mut widths, mut down_types, mut depths) = (Vec::new(), Vec::new(), Vec::new());
    for level in 0..levels {
        let first = 1 + level * (lpb + 1);
        widths.push(s.dim(&format!("input_blocks.{first}.0.out_layers.3.weight"), 0)?);
        let layer_depths: Vec<i64> = (first..first + lpb)
            .map(|n| s.count(&format!("input_blocks.{n}.1.transformer_blocks.")))
            .collect();
        if layer_depths.iter().any(|d| *d != layer_depths[0]) {
            let key = format!("input_blocks.{first}.1.transformer_blocks.0.attn1.to_q.weight");
            return Err(s.refuse(
                &key,
                "starts a level whose layers have different transformer depths",
            ));
        }
        let depth = layer_depths[0];
        down_types.push(
            if depth > 0 {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
            .to_string(),
        );
        depths.push(depth.max(1));
    }
    Ok((widths, down_types, depths))
}

/// The up blocks' types and the transformer depth of each of their layers, deepest level
/// first.
fn up_blocks(s: &Shapes<'_>, lpb: i64, levels: i64) -> Result<(Vec<String>, Vec<Vec<i64>>)> {
    let outputs = s.count("output_blocks.");
    if outputs != levels * (lpb + 1) {
        return Err(s.refuse(
            "output_blocks.0.0.in_layers.2.weight",
            "starts output blocks that do not mirror the input blocks",
        ));
    }
    let mut types = Vec::new();
    let mut depths = Vec::new();
    for level in 0..levels {
        let layer_depths: Vec<i64> = (0..=lpb)
            .map(|l| {
                s.count(&format!(
                    "output_blocks.{}.1.transformer_blocks.",
                    level * (lpb + 1) + l
                ))
            })
            .collect();
        let attention = layer_depths.iter().any(|d| *d > 0);
        types.push(
            if attention {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
            .to_string(),
        );
        depths.push(layer_depths.iter().map(|d| (*d).max(1)).collect());
    }
    Ok((types, depths))
}
