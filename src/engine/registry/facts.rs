//! What a pipeline's configs say that requests are checked against before it loads.

use std::path::Path;

use crate::engine::config_check::read_config;
use crate::engine::loading::single_file::Configs;
use crate::engine::models::clip::ClipTextConfig;
use crate::engine::models::unet::UNet2DConditionModel;
use crate::engine::schedulers::{SchedulerConfig, SchedulerKind};

/// What validation needs to know of a pipeline before it is loaded, read from its
/// configs: its default image size, the depth of its text encoders, its scheduler and
/// what its UNet takes.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineFacts {
    /// Default image side in pixels (UNet sample size × VAE scale factor).
    pub default_size: u32,
    /// Layers of its shallowest text encoder.
    pub text_encoder_layers: u32,
    /// Its scheduler config, which names its scheduler and places a request's timesteps.
    pub scheduler_config: SchedulerConfig,
    /// Its UNet takes more than latents (an inpainting UNet: latents, mask and masked
    /// image latents), so it runs only with an init image and a mask.
    pub inpainting: bool,
    /// Its UNet embeds the guidance scale (`time_cond_proj_dim`, as LCM-distilled UNets
    /// do), so it runs without a negative prediction for a guider to combine.
    pub guidance_distilled: bool,
    /// Its UNet's attentions by module path (`up_blocks.0.attentions.1`), the layers an
    /// image prompt may be limited to.
    pub attentions: Vec<String>,
    /// Its UNet's self-attention layers by module name
    /// (`mid_block.attentions.0.transformer_blocks.0.attn1`), the layers
    /// perturbed-attention guidance may perturb.
    pub self_attentions: Vec<String>,
}

/// What a ControlNet's config says: whether it is a union model or a T2I-Adapter, and of
/// which base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetFacts {
    /// For a union model, the control types it knows.
    pub union_types: Option<i64>,
    /// Width of its text conditioning (2048 for SDXL).
    pub cross_attention_dim: Option<i64>,
    /// For a T2I-Adapter, what its config says.
    pub adapter: Option<AdapterFacts>,
    /// A Control-LoRA: built on the UNet of the base model it controls.
    pub control_lora: bool,
}

/// What a T2I-Adapter's config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterFacts {
    /// Its pixel unshuffle's factor: output sides must be multiples of it.
    pub downscale_factor: i64,
    /// SDXL's layout (`full_adapter_xl`), rather than SD 1.5's.
    pub xl: bool,
}

impl ControlNetFacts {
    /// Reads a ControlNet or T2I-Adapter folder's `config.json`, or infers a single
    /// file's (each read once).
    pub(super) fn read(path: &Path) -> Option<Self> {
        use crate::engine::loading::control_lora::is_control_lora;
        use crate::engine::models::t2i_adapter::{infer_config, is_adapter_file};
        let config_path = path.join("config.json");
        let config: serde_json::Value = if path.is_file() {
            let (shapes, _) = crate::engine::weights::read_shapes(path).ok()?;
            if is_adapter_file(&shapes) {
                return Some(Self::adapter(&infer_config(path, &shapes).ok()?));
            }
            if is_control_lora(shapes.iter().map(|(name, _)| name.as_str())) {
                return Some(Self::control_lora(&shapes));
            }
            crate::engine::models::controlnet_file::infer_config(path, &shapes).ok()?
        } else {
            crate::engine::files::read_json(&config_path).ok()?
        };
        let class = config.get("_class_name")?.as_str()?;
        if class == "T2IAdapter" {
            let adapter = crate::engine::config_check::config_from_value(&config_path, &config);
            return Some(Self::adapter(&adapter.ok()?));
        }
        let union = class == "ControlNetUnionModel";
        Some(Self {
            union_types: union.then(|| {
                config
                    .get("num_control_type")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(6)
            }),
            cross_attention_dim: config
                .get("cross_attention_dim")
                .and_then(serde_json::Value::as_i64),
            adapter: None,
            control_lora: false,
        })
    }

    /// The facts of a Control-LoRA of tensors `shapes`: its text width is the input of
    /// its cross-attention keys' low-rank down matrices.
    fn control_lora(shapes: &[(String, Vec<i64>)]) -> Self {
        let cross_attention_dim = shapes
            .iter()
            .find(|(name, _)| name.ends_with(".attn2.to_k.down"))
            .and_then(|(_, shape)| shape.get(1).copied());
        Self {
            union_types: None,
            cross_attention_dim,
            adapter: None,
            control_lora: true,
        }
    }

    /// The facts of a T2I-Adapter of `config`.
    fn adapter(config: &crate::engine::models::t2i_adapter::T2IAdapterConfig) -> Self {
        Self {
            union_types: None,
            cross_attention_dim: None,
            control_lora: false,
            adapter: Some(AdapterFacts {
                downscale_factor: config.downscale_factor,
                xl: config.adapter_type == "full_adapter_xl",
            }),
        }
    }
}

/// What an upscaler file's tensors show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpscalerFacts {
    /// The factor the network enlarges by.
    pub scale: u32,
}

impl UpscalerFacts {
    /// Reads the file's header; `None` when it fits no served layout.
    pub(super) fn read(path: &Path) -> Option<Self> {
        let architecture = crate::engine::upscale::layout::read(path).ok()?;
        Some(Self {
            scale: architecture.scale().max(0) as u32,
        })
    }
}

impl PipelineFacts {
    /// Its scheduler, where sdxld implements it.
    pub fn scheduler(&self) -> Option<SchedulerKind> {
        self.scheduler_config.kind().ok()
    }

    /// Reads the configs of a pipeline folder or single-file checkpoint.
    pub(super) fn read(path: &Path) -> Option<Self> {
        let configs = if path.is_file() {
            let (_, metadata) = crate::engine::weights::read_header(path).ok()?;
            Configs::from_metadata(path, &metadata).ok()?
        } else {
            let read_clip =
                |sub: &str| read_config::<ClipTextConfig>(&path.join(sub).join("config.json"));
            let text_encoder_2 = read_clip("text_encoder_2").ok()?;
            Configs {
                unet: read_config(&path.join("unet/config.json")).ok()?,
                vae: read_config(&path.join("vae/config.json")).ok()?,
                // A refiner has only the second encoder.
                text_encoder: read_clip("text_encoder").unwrap_or_else(|_| text_encoder_2.clone()),
                text_encoder_2,
                scheduler: read_config(&path.join("scheduler/scheduler_config.json")).ok()?,
            }
        };
        let sample = configs.unet.sample_size.unwrap_or(128).max(0) as u32;
        let layers = configs
            .text_encoder
            .num_hidden_layers
            .min(configs.text_encoder_2.num_hidden_layers);
        Some(Self {
            default_size: sample * configs.vae.scale_factor() as u32,
            text_encoder_layers: layers.max(0) as u32,
            scheduler_config: configs.scheduler,
            inpainting: configs.unet.in_channels != configs.vae.latent_channels,
            guidance_distilled: configs.unet.time_cond_proj_dim.is_some(),
            attentions: configs.unet.attention_paths(),
            self_attentions: UNet2DConditionModel::self_attention_names(&configs.unet),
        })
    }
}
