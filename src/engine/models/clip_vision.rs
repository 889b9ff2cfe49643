//! CLIP image encoders: transformers' `CLIPVisionModelWithProjection`
//! (`models/clip/modeling_clip.py`), the image encoder IP-Adapters read, keys as
//! transformers saves them (`vision_model.*`, `visual_projection.weight`).

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::config_check::{read_config, CheckedConfig, ConfigCheck};
use crate::engine::error::Result;
use crate::engine::models::clip::{Activation, EncoderLayer, LayerShape};
use crate::engine::models::nn::{LayerNorm, Linear};
use crate::engine::weights::{VarPath, Weights};

/// Mirrors a transformers `CLIPVisionConfig` (`image_encoder/config.json`); defaults as
/// transformers has them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    #[serde(default = "default_hidden")]
    pub hidden_size: i64,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: i64,
    /// Number of transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    #[serde(default = "default_layers")]
    pub num_attention_heads: i64,
    /// Side of the square input image in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// Side of a patch in pixels.
    #[serde(default = "default_patch_size")]
    pub patch_size: i64,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    /// MLP activation.
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Width of `image_embeds`.
    #[serde(default = "default_projection")]
    pub projection_dim: i64,
}

fn default_hidden() -> i64 {
    768
}
fn default_intermediate() -> i64 {
    3072
}
fn default_layers() -> i64 {
    12
}
fn default_image_size() -> i64 {
    224
}
fn default_patch_size() -> i64 {
    32
}
fn default_channels() -> i64 {
    3
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_projection() -> i64 {
    512
}

impl ClipVisionConfig {
    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            eps: self.layer_norm_eps,
            activation: self.hidden_act,
        }
    }
}

impl CheckedConfig for ClipVisionConfig {
    fn check(&self, check: &mut ConfigCheck) {
        self.layer_shape()
            .check_widths(self.num_hidden_layers, check);
        check.positive("image_size", self.image_size);
        check.positive("patch_size", self.patch_size);
        check.divisible("image_size", self.image_size, "patch_size", self.patch_size);
        if self.num_channels != 3 {
            check.problem(
                "num_channels",
                format_args!("is {}; image encoders read RGB (3)", self.num_channels),
            );
        }
        check.positive_number("layer_norm_eps", self.layer_norm_eps);
        check.positive("projection_dim", self.projection_dim);
    }
}

/// What an image encoder returns for a batch of images.
pub struct VisionOutput {
    /// `image_embeds`: the post-layer-normed class token, projected [batch,
    /// projection_dim].
    pub image_embeds: Tensor,
    /// `hidden_states[-2]`: the output of the layer before the last [batch, patches + 1,
    /// hidden_size] (what IP-Adapter Plus reads).
    pub penultimate: Tensor,
}

/// A CLIP vision transformer with its projection.
pub struct ClipVisionModel {
    config: ClipVisionConfig,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
}

impl ClipVisionModel {
    /// Loads a transformers image encoder folder (`config.json` + `model.safetensors`).
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: ClipVisionConfig = read_config(&config_path)?;
        crate::engine::config_check::check_config(&config, &config_path)?;
        let weights = Weights::open_component(dir, "model", device, kind)?;
        let model = Self::load(&weights.root(), config)?;
        weights.check_all_used(|k| k.ends_with("position_ids"))?;
        Ok(model)
    }

    /// Loads from a key space holding `vision_model.*` and `visual_projection.weight`.
    pub fn load(vp: &VarPath, config: ClipVisionConfig) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let tm = vp.pp("vision_model");
        let emb = tm.pp("embeddings");
        let grid = c.image_size / c.patch_size;
        let shape = c.layer_shape();
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&tm.pp("encoder").pp("layers").pp(i), shape))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding: emb.get("class_embedding", &[h])?,
            patch_embedding: emb
                .pp("patch_embedding")
                .get("weight", &[h, c.num_channels, c.patch_size, c.patch_size])?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", &[grid * grid + 1, h])?,
            pre_layrnorm: LayerNorm::load(&tm.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(&tm.pp("post_layernorm"), h, c.layer_norm_eps)?,
            visual_projection: Linear::load(
                &vp.pp("visual_projection"),
                h,
                c.projection_dim,
                false,
            )?,
            config,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Encodes [batch, 3, image_size, image_size] normalised pixels (on the model's device,
    /// any float kind).
    pub fn forward(&self, pixels: &Tensor) -> VisionOutput {
        let kind = self.patch_embedding.kind();
        let patches = pixels
            .to_kind(kind)
            .conv2d(
                &self.patch_embedding,
                None::<Tensor>,
                [self.config.patch_size, self.config.patch_size],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let batch = patches.size()[0];
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([batch, 1, self.config.hidden_size], false);
        let tokens = Tensor::cat(&[class, patches], 1) + self.position_embedding.unsqueeze(0);
        let mut x = self.pre_layrnorm.forward(&tokens);
        // hidden_states[i] is the input of layer i; hidden_states[-2] is the input of the
        // last layer.
        let mut penultimate = x.shallow_clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            if i == last {
                penultimate = x.shallow_clone();
            }
            x = layer.forward(&x, false);
        }
        let pooled = self.post_layernorm.forward(&x.select(1, 0));
        VisionOutput {
            image_embeds: self.visual_projection.forward(&pooled),
            penultimate,
        }
    }
}
