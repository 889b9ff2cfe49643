//! Stability's Control-LoRAs (`control-lora-<type>-rank128.safetensors`): a ControlNet
//! stored against the base UNet's encoder, in the original (sgm) names. Every weight of two
//! or more dimensions it shares with the UNet is an `up`/`down` pair (the difference,
//! low rank), every one-dimensional tensor (biases, norms) and every tensor of the
//! ControlNet's own (`input_hint_block`, `zero_convs`, `middle_block_out`) is whole, and
//! an empty `lora_controlnet` tensor marks the file.
//!
//! The ControlNet is built on the base model's UNet as ComfyUI and sd-webui-controlnet
//! build it: its config is the UNet's (with the hint block's widths), each shared weight
//! is the UNet's plus up · down, and each whole tensor replaces the UNet's. diffusers'
//! loader (`ControlNetModel.from_unet`, then `load_lora_adapter`) builds the same
//! ControlNet except that it keeps the UNet's biases of the low-rank layers where the
//! file stores trained ones.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tch::Kind;

use crate::engine::config_check::ConfigCheck;
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::loading::single_file::unet_key;
use crate::engine::models::controlnet::{ControlKeys, ControlNetConfig, ControlNetModel};
use crate::engine::models::controlnet_file::{embedding_widths, ShapeMap};
use crate::engine::models::unet_config::UNetConfig;
use crate::engine::weights::{
    loaded_bytes_of, read_header, read_shapes, Transform, Weights, LOW_RANK_DOWN, LOW_RANK_UP,
};

/// The tensor that marks a Control-LoRA file.
pub const MARKER: &str = "lora_controlnet";

/// Whether the tensors `names` are a Control-LoRA's.
pub fn is_control_lora<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n == MARKER)
}

/// Whether the file at `path` is a Control-LoRA (its header holds the marker).
pub fn is_control_lora_file(path: &Path) -> bool {
    path.is_file()
        && read_header(path)
            .is_ok_and(|(names, _)| is_control_lora(names.iter().map(String::as_str)))
}

/// How the stored names of one file map to diffusers ControlNet keys.
struct Names {
    /// Resnets per down block of the UNet it is built on.
    layers_per_block: usize,
    /// Index of the hint block's last convolution (the embedding's `conv_out`).
    hint_out: usize,
}

impl Names {
    fn of(stored: &[(String, Vec<i64>)], layers_per_block: usize) -> Self {
        let hint_out = stored
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("input_hint_block.")?.split('.').next())
            .filter_map(|i| i.parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        Self {
            layers_per_block,
            hint_out,
        }
    }

    /// The diffusers key a stored name loads as: the key of a whole tensor, or the key a
    /// low-rank pair adds to with its suffix. A name that fits nothing keeps its stored
    /// name (and is reported as unknown); the marker is no tensor.
    fn key(&self, name: &str) -> Vec<(String, Transform)> {
        if name == MARKER {
            return Vec::new();
        }
        let key = self
            .own_key(name)
            .or_else(|| self.low_rank_key(name))
            .or_else(|| unet_key(name, self.layers_per_block))
            .unwrap_or_else(|| name.to_string());
        vec![(key, Transform::Identity)]
    }

    /// The key of a tensor only ControlNets have.
    fn own_key(&self, name: &str) -> Option<String> {
        if let Some(rest) = name.strip_prefix("input_hint_block.") {
            let (index, param) = rest.split_once('.')?;
            let index: usize = index.parse().ok()?;
            let module = match index {
                0 => "conv_in".to_string(),
                i if i == self.hint_out => "conv_out".to_string(),
                i if i % 2 == 0 => format!("blocks.{}", i / 2 - 1),
                _ => return None,
            };
            return Some(format!("controlnet_cond_embedding.{module}.{param}"));
        }
        if let Some(rest) = name.strip_prefix("zero_convs.") {
            let (index, param) = rest.split_once(".0.")?;
            return Some(format!("controlnet_down_blocks.{index}.{param}"));
        }
        name.strip_prefix("middle_block_out.0.")
            .map(|param| format!("controlnet_mid_block.{param}"))
    }

    /// The name the file stores a tensor of the ControlNet's own under (the inverse of
    /// [`Names::own_key`]); other keys as they are.
    fn stored_name(&self, key: &str) -> String {
        let (module, param) = key.rsplit_once('.').unwrap_or((key, ""));
        let stored = if let Some(index) = module.strip_prefix("controlnet_down_blocks.") {
            format!("zero_convs.{index}.0")
        } else if module == "controlnet_mid_block" {
            "middle_block_out.0".to_string()
        } else {
            match module.strip_prefix("controlnet_cond_embedding.") {
                Some("conv_in") => "input_hint_block.0".to_string(),
                Some("conv_out") => format!("input_hint_block.{}", self.hint_out),
                Some(block) => match block.strip_prefix("blocks.").map(str::parse::<usize>) {
                    Some(Ok(i)) => format!("input_hint_block.{}", 2 * (i + 1)),
                    _ => return key.to_string(),
                },
                None => return key.to_string(),
            }
        };
        format!("{stored}.{param}")
    }

    /// The key a low-rank `up`/`down` matrix adds to, with its suffix.
    fn low_rank_key(&self, name: &str) -> Option<String> {
        let (module, suffix) = match name.rsplit_once('.')? {
            (module, "up") => (module, LOW_RANK_UP),
            (module, "down") => (module, LOW_RANK_DOWN),
            _ => return None,
        };
        let key = unet_key(&format!("{module}.weight"), self.layers_per_block)?;
        Some(format!("{key}{suffix}"))
    }
}

/// The ControlNet's config: the base UNet's encoder, its hint block's widths from the
/// stored shapes (`renamed`, by diffusers key).
fn config(path: &Path, base: &UNetConfig, renamed: &ShapeMap) -> Result<ControlNetConfig> {
    let hint = renamed
        .get("controlnet_cond_embedding.conv_in.weight")
        .ok_or_else(|| EngineError::Config {
            path: path.to_path_buf(),
            message: "a Control-LoRA needs `input_hint_block.0.weight`".into(),
        })?;
    let control = ControlKeys {
        conditioning_channels: hint.get(1).copied().unwrap_or(0),
        conditioning_embedding_out_channels: embedding_widths(renamed),
        controlnet_conditioning_channel_order: "rgb".into(),
        global_pool_conditions: false,
        mid_block_type: "UNetMidBlock2DCrossAttn".into(),
    };
    let mut check = ConfigCheck::default();
    control.check(&mut check);
    check.finish(path)?;
    Ok(ControlNetConfig {
        encoder: base.clone(),
        control,
        union: None,
    })
}

/// Builds the ControlNet the Control-LoRA at `path` makes of a UNet: `base` holds the
/// UNet's weights under diffusers keys, `base_config` its config. A file made for another
/// UNet (other widths, depths or text width) is [`EngineError::Incompatible`], naming the
/// tensor that does not fit.
pub fn load(
    path: &Path,
    base: Weights,
    base_config: &UNetConfig,
    placement: Placement,
) -> Result<ControlNetModel> {
    let (stored, _) = read_shapes(path)?;
    let names = Names::of(&stored, base_config.layers_per_block.max(0) as usize);
    let renamed: ShapeMap = stored
        .iter()
        .flat_map(|(name, shape)| names.key(name).into_iter().map(|(k, _)| (k, shape.clone())))
        .collect();
    let config = config(path, base_config, &renamed)?;
    let own = Weights::open_renamed(
        &[path.to_path_buf()],
        placement.device,
        placement.kind,
        &|name| names.key(name),
    )?;
    let own_keys: HashSet<String> = renamed.into_keys().collect();
    let weights = base.overlay(own);
    let model = ControlNetModel::load(&weights.root(), config, path)
        .map_err(|e| misfit(e, path, &names))?;
    weights.check_all_used(|key| !own_keys.contains(key))?;
    Ok(model)
}

/// A tensor of the file at `path` that does not fit the UNet, as the models' mismatch;
/// a tensor of the ControlNet's own that the file lacks, named as the file would store it.
fn misfit(error: EngineError, path: &Path, names: &Names) -> EngineError {
    match error {
        EngineError::ShapeMismatch {
            name,
            expected,
            actual,
            ..
        } => EngineError::Incompatible(format!(
            "it was made for another UNet: its `{name}` is {actual:?} where this UNet needs {expected:?}"
        )),
        EngineError::MissingTensor { name, .. } if name.starts_with("controlnet_") => {
            EngineError::MissingTensor {
                path: path.to_path_buf(),
                name: names.stored_name(&name),
            }
        }
        other => other,
    }
}

/// Bytes the ControlNet a Control-LoRA (`file`) builds takes once loaded in `kind`: its
/// base UNet's encoder (from `unet_files`, under `prefix` in a single-file checkpoint) and
/// the file's own tensors (headers only).
pub fn built_bytes(
    file: &Path,
    unet_files: &[PathBuf],
    prefix: Option<&str>,
    kind: Kind,
) -> Result<u64> {
    const ENCODER: [&str; 5] = [
        "conv_in.",
        "time_embedding.",
        "add_embedding.",
        "down_blocks.",
        "mid_block.",
    ];
    const SGM_ENCODER: [&str; 4] = [
        "input_blocks.",
        "middle_block.",
        "time_embed.",
        "label_emb.",
    ];
    const OWN: [&str; 3] = ["input_hint_block.", "zero_convs.", "middle_block_out."];
    let starts = |name: &str, prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
    let mut bytes = loaded_bytes_of(file, |name| starts(name, &OWN), kind)?;
    for path in unet_files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
    {
        bytes += loaded_bytes_of(
            path,
            |name| match prefix {
                Some(p) => name
                    .strip_prefix(p)
                    .is_some_and(|n| starts(n, &SGM_ENCODER)),
                None => starts(name, &ENCODER),
            },
            kind,
        )?;
    }
    Ok(bytes)
}
