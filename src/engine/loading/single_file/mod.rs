//! Single-file SDXL checkpoints (the layout model sites share: `model.diffusion_model.*`,
//! `first_stage_model.*`, `conditioner.embedders.0.transformer.*`,
//! `conditioner.embedders.1.model.*`), read through the same modules as diffusers
//! folders: each stored name is given its diffusers key, and the few weights stored in
//! another layout are transformed as they load (OpenCLIP's fused q/k/v split, its
//! text_projection transposed, the VAE's 1x1 attention convolutions as linears), as
//! diffusers' `loaders/single_file_utils.py` converts them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind};

use crate::engine::config_check::{config_from_value, CheckedConfig};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::clip::{ClipTextConfig, ClipTextModel};
use crate::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::engine::models::vae::{AutoencoderKL, VaeConfig};
use crate::engine::schedulers::SchedulerConfig;

mod infer;
mod keys;

use crate::engine::weights::{Transform, Weights};
pub use keys::{
    component, open_clip_keys, text_encoder_keys, unet_key, unet_keys, unet_sgm_names, vae_keys,
    TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE,
};

/// The metadata key under which a file may carry its diffusers configs (a JSON object
/// with `unet`, `vae`, `text_encoder`, `text_encoder_2` and `scheduler`).
pub const CONFIGS_KEY: &str = "sdxld.configs";

/// The diffusers configs of a single-file checkpoint's components.
#[derive(Debug, Clone, PartialEq)]
pub struct Configs {
    /// UNet2DConditionModel config.
    pub unet: UNetConfig,
    /// AutoencoderKL config.
    pub vae: VaeConfig,
    /// CLIPTextModel config.
    pub text_encoder: ClipTextConfig,
    /// CLIPTextModelWithProjection config.
    pub text_encoder_2: ClipTextConfig,
    /// Scheduler config.
    pub scheduler: SchedulerConfig,
}

impl Configs {
    /// stabilityai/stable-diffusion-xl-base-1.0's configs, for checkpoints that carry none.
    pub fn sdxl_base() -> Self {
        Self {
            unet: UNetConfig::sdxl_base(),
            vae: VaeConfig::sdxl(),
            text_encoder: ClipTextConfig::sdxl_text_encoder(),
            text_encoder_2: ClipTextConfig::sdxl_text_encoder_2(),
            scheduler: SchedulerConfig::sdxl_base(),
        }
    }

    /// The configs `metadata` carries (a JSON object under [`CONFIGS_KEY`]), or, as real
    /// checkpoints carry none, the ones the file's tensor shapes give (see
    /// [`Self::infer`]).
    pub fn from_metadata(path: &Path, metadata: &HashMap<String, String>) -> Result<Self> {
        let Some(text) = metadata.get(CONFIGS_KEY) else {
            let (shapes, _) = crate::engine::weights::read_shapes(path)?;
            return Self::infer(path, &shapes);
        };
        let all: Value = serde_json::from_str(text).map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            message: format!("`{CONFIGS_KEY}`: {e}"),
        })?;
        let part = |name: &str| -> Result<&Value> {
            all.get(name).ok_or_else(|| EngineError::Config {
                path: path.to_path_buf(),
                message: format!("`{CONFIGS_KEY}` has no `{name}` config"),
            })
        };
        Ok(Self {
            unet: typed(path, "unet", part("unet")?)?,
            vae: typed(path, "vae", part("vae")?)?,
            text_encoder: typed(path, "text_encoder", part("text_encoder")?)?,
            text_encoder_2: typed(path, "text_encoder_2", part("text_encoder_2")?)?,
            scheduler: typed(path, "scheduler", part("scheduler")?)?,
        })
    }

    /// The UNet's layers per block (a single number in SDXL-family models).
    pub fn layers_per_block(&self) -> usize {
        self.unet.layers_per_block.max(0) as usize
    }

    /// The number of VAE levels.
    pub fn vae_levels(&self, path: &Path) -> Result<usize> {
        match self.vae.block_out_channels.len() {
            0 => Err(EngineError::Config {
                path: config_path(path, "vae"),
                message: "the VAE config needs block_out_channels".into(),
            }),
            n => Ok(n),
        }
    }
}

/// Whether `path` looks like a single-file SDXL checkpoint (by its tensor names).
pub fn is_sdxl_checkpoint(names: &[&str]) -> bool {
    [UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2]
        .iter()
        .all(|prefix| names.iter().any(|n| n.starts_with(prefix)))
}

/// The path a config error names for a component of the file.
pub fn config_path(file: &Path, component: &str) -> PathBuf {
    PathBuf::from(format!("{}#{component}", file.display()))
}

/// The config of `component`, read and checked.
fn typed<T: serde::de::DeserializeOwned + CheckedConfig>(
    file: &Path,
    component: &str,
    value: &Value,
) -> Result<T> {
    config_from_value(&config_path(file, component), value)
}

fn open(
    file: &Path,
    device: Device,
    kind: Kind,
    rename: &dyn Fn(&str) -> Vec<(String, Transform)>,
) -> Result<Weights> {
    Weights::open_renamed(&[file.to_path_buf()], device, kind, rename)
}

/// The UNet of a single-file checkpoint.
pub fn load_unet(
    file: &Path,
    configs: &Configs,
    placement: Placement,
) -> Result<UNet2DConditionModel> {
    let weights = open_unet(file, configs.layers_per_block(), placement)?;
    let model = UNet2DConditionModel::load(
        &weights.root(),
        configs.unet.clone(),
        &config_path(file, "unet"),
    )?;
    weights.check_all_used(|_| false)?;
    Ok(model)
}

/// The UNet weights of a single-file checkpoint (`layers_per_block` resnets per down
/// block), under their diffusers keys.
pub fn open_unet(file: &Path, layers_per_block: usize, placement: Placement) -> Result<Weights> {
    let rename = component(UNET, |n| unet_keys(n, layers_per_block));
    Ok(open(file, placement.device, placement.kind, &rename)?.with_layout(placement.layout))
}

/// The VAE of a single-file checkpoint.
pub fn load_vae(file: &Path, configs: &Configs, placement: Placement) -> Result<AutoencoderKL> {
    let levels = configs.vae_levels(file)?;
    let rename = component(VAE, |n| vae_keys(n, levels));
    let weights =
        open(file, placement.device, placement.kind, &rename)?.with_layout(placement.layout);
    let model = AutoencoderKL::load(&weights.root(), configs.vae.clone())?;
    weights.check_all_used(|_| false)?;
    Ok(model)
}

/// A CLIP text encoder stored under `prefix`, its names mapped by `keys`.
fn load_clip(
    file: &Path,
    device: Device,
    kind: Kind,
    prefix: &'static str,
    keys: fn(&str) -> Vec<(String, Transform)>,
    config: &ClipTextConfig,
    with_projection: bool,
) -> Result<ClipTextModel> {
    let weights = open(file, device, kind, &component(prefix, keys))?;
    let model = ClipTextModel::load(&weights.root(), config.clone(), with_projection)?;
    weights.check_all_used(|_| false)?;
    Ok(model)
}

/// The first text encoder of a single-file checkpoint (transformers' layout).
pub fn load_text_encoder(
    file: &Path,
    configs: &Configs,
    device: Device,
    kind: Kind,
) -> Result<ClipTextModel> {
    let config = &configs.text_encoder;
    load_clip(
        file,
        device,
        kind,
        TEXT_ENCODER,
        text_encoder_keys,
        config,
        false,
    )
}

/// The second text encoder of a single-file checkpoint (OpenCLIP's layout).
pub fn load_text_encoder_2(
    file: &Path,
    configs: &Configs,
    device: Device,
    kind: Kind,
) -> Result<ClipTextModel> {
    let config = &configs.text_encoder_2;
    load_clip(
        file,
        device,
        kind,
        TEXT_ENCODER_2,
        open_clip_keys,
        config,
        true,
    )
}
