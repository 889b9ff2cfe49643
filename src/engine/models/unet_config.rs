//! The configuration of diffusers' `UNet2DConditionModel` (`unet/config.json`) and the
//! checks that refuse, when the model loads, any config this implementation would not
//! compute exactly or that no model could have.

use serde::Deserialize;

use crate::engine::config_check::{CheckedConfig, ConfigCheck};

/// An integer or one integer per block, as diffusers configs write them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(i64),
    /// One value per down block.
    Many(Vec<i64>),
}

impl PerBlock {
    /// The value for each of `n` blocks.
    pub(crate) fn expand(&self, n: usize) -> Vec<i64> {
        match self {
            PerBlock::One(v) => vec![*v; n],
            PerBlock::Many(v) => v.clone(),
        }
    }
}

/// Mirrors diffusers' `UNet2DConditionModel` config (`unet/config.json`); defaults are
/// diffusers' defaults. Only what SDXL-family models use is supported; other values are
/// refused when the model loads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: i64,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: i64,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: i64,
    /// `DownBlock2D` or `CrossAttnDownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn` (the only one SDXL uses).
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Heads per level (diffusers' historical name for the head count).
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    /// Heads per level, when the config uses the newer name.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks per attention, per level.
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    /// Transformer blocks per attention of each up block, when they differ.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<i64>>>,
    /// Width of the text conditioning.
    pub cross_attention_dim: i64,
    /// Linear rather than 1×1 convolution projections in the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `text_time` for SDXL.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each micro-conditioning value's sinusoidal embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// Input width of the added embedding (pooled text + 6 × addition_time_embed_dim).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// Group norm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: i64,
    /// Group norm epsilon of the resnets and the output norm.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Cosine first in the timestep embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Padding of the down-sampling convolutions.
    #[serde(default = "one")]
    pub downsample_padding: i64,
    /// Latent size the model was trained at.
    #[serde(default)]
    pub sample_size: Option<i64>,
    /// Width of the guidance-scale embedding a guidance-distilled (LCM) UNet takes.
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    /// Unsupported if set.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Unsupported if set.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// `default` only.
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// Activation of the blocks (`silu` only).
    #[serde(default)]
    pub act_fn: Option<String>,
    /// Unsupported if true.
    #[serde(default)]
    pub center_input_sample: bool,
}

impl UNetConfig {
    /// The module paths of the UNet's attentions (`Transformer2DModel`s), as its blocks
    /// name them: `down_blocks.<i>.attentions.<j>`, `up_blocks.<i>.attentions.<j>`,
    /// `mid_block.attentions.0`.
    pub fn attention_paths(&self) -> Vec<String> {
        let per_block = |types: &[String], kind: &str, section: &str, count: i64| {
            types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.as_str() == kind)
                .flat_map(|(i, _)| {
                    (0..count.max(0)).map(move |j| format!("{section}.{i}.attentions.{j}"))
                })
                .collect::<Vec<_>>()
        };
        let mut paths = per_block(
            &self.down_block_types,
            "CrossAttnDownBlock2D",
            "down_blocks",
            self.layers_per_block,
        );
        paths.extend(per_block(
            &self.up_block_types,
            "CrossAttnUpBlock2D",
            "up_blocks",
            self.layers_per_block + 1,
        ));
        paths.push("mid_block.attentions.0".into());
        paths
    }
}

impl UNetConfig {
    /// stabilityai/stable-diffusion-xl-base-1.0's `unet/config.json`.
    pub fn sdxl_base() -> Self {
        let text = |names: [&str; 3]| names.map(str::to_string).to_vec();
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280],
            layers_per_block: 2,
            down_block_types: text([
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]),
            up_block_types: text(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
            mid_block_type: None,
            attention_head_dim: Some(PerBlock::Many(vec![5, 10, 20])),
            num_attention_heads: None,
            transformer_layers_per_block: Some(PerBlock::Many(vec![1, 2, 10])),
            reverse_transformer_layers_per_block: None,
            cross_attention_dim: 2048,
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            sample_size: Some(128),
            time_cond_proj_dim: None,
            class_embed_type: None,
            encoder_hid_dim_type: None,
            resnet_time_scale_shift: None,
            act_fn: Some("silu".into()),
            center_input_sample: false,
        }
    }
}

fn one() -> i64 {
    1
}
fn two() -> i64 {
    2
}
fn four() -> i64 {
    4
}
fn thirty_two() -> i64 {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl UNetConfig {
    /// Heads and transformer depth per level. diffusers: `num_attention_heads =
    /// num_attention_heads or attention_head_dim`.
    pub fn attention_sizes(&self) -> (Vec<i64>, Vec<i64>) {
        let n = self.block_out_channels.len();
        let heads = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .map(|h| h.expand(n))
            .unwrap_or_else(|| vec![8; n]);
        let depths = self
            .transformer_layers_per_block
            .as_ref()
            .map(|t| t.expand(n))
            .unwrap_or_else(|| vec![1; n]);
        (heads, depths)
    }

    /// Whether level `i` has attention (a cross-attention down block; the last level's
    /// mid block always has).
    fn has_attention(&self, i: usize) -> bool {
        i + 1 == self.block_out_channels.len()
            || self.down_block_types.get(i).map(String::as_str) == Some("CrossAttnDownBlock2D")
            || self
                .up_block_types
                .get(self.block_out_channels.len() - 1 - i)
                .map(String::as_str)
                == Some("CrossAttnUpBlock2D")
    }

    fn check_kinds(&self, check: &mut ConfigCheck) {
        for t in &self.down_block_types {
            check.one_of(
                "down_block_types",
                t,
                &["DownBlock2D", "CrossAttnDownBlock2D"],
            );
        }
        for t in &self.up_block_types {
            check.one_of("up_block_types", t, &["UpBlock2D", "CrossAttnUpBlock2D"]);
        }
        if let Some(mid) = &self.mid_block_type {
            check.one_of("mid_block_type", mid, &["UNetMidBlock2DCrossAttn"]);
        }
        if let Some(added) = &self.addition_embed_type {
            check.one_of("addition_embed_type", added, &["text_time"]);
        }
        if let Some(shift) = &self.resnet_time_scale_shift {
            check.one_of("resnet_time_scale_shift", shift, &["default"]);
        }
        if let Some(act) = &self.act_fn {
            check.one_of("act_fn", act, &["silu"]);
        }
        let unsupported = "is set; sdxld does not support it";
        if let Some(dim) = self.time_cond_proj_dim {
            check.positive("time_cond_proj_dim", dim);
        }
        if self.class_embed_type.is_some() {
            check.problem("class_embed_type", unsupported);
        }
        if self.encoder_hid_dim_type.is_some() {
            check.problem("encoder_hid_dim_type", unsupported);
        }
        if self.center_input_sample {
            check.problem("center_input_sample", unsupported);
        }
    }

    fn check_levels(&self, check: &mut ConfigCheck) {
        let channels = &self.block_out_channels;
        let n = channels.len();
        if n == 0 {
            check.problem("block_out_channels", "is empty");
            return;
        }
        check.all_positive("block_out_channels", channels);
        check.length(
            "down_block_types",
            self.down_block_types.len(),
            n,
            "block_out_channels",
        );
        check.length(
            "up_block_types",
            self.up_block_types.len(),
            n,
            "block_out_channels",
        );
        for &width in channels {
            check.divisible(
                "block_out_channels",
                width,
                "norm_num_groups",
                self.norm_num_groups,
            );
        }
        let (heads, depths) = self.attention_sizes();
        let heads_key = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        check.length(heads_key, heads.len(), n, "block_out_channels");
        check.length(
            "transformer_layers_per_block",
            depths.len(),
            n,
            "block_out_channels",
        );
        if heads.len() != n || depths.len() != n {
            return;
        }
        for i in (0..n).filter(|&i| self.has_attention(i)) {
            check.positive(heads_key, heads[i]);
            check.divisible("block_out_channels", channels[i], heads_key, heads[i]);
            check.positive("transformer_layers_per_block", depths[i]);
        }
        if let Some(reverse) = &self.reverse_transformer_layers_per_block {
            let key = "reverse_transformer_layers_per_block";
            check.length(key, reverse.len(), n, "block_out_channels");
            for per_block in reverse {
                let layers = (self.layers_per_block + 1).max(0) as usize;
                check.length(key, per_block.len(), layers, "layers_per_block + 1");
                check.all_positive(key, per_block);
            }
        }
    }

    fn check_added_embedding(&self, check: &mut ConfigCheck) {
        if let Some(width) = self.addition_time_embed_dim {
            check.positive("addition_time_embed_dim", width);
        }
        if let Some(width) = self.projection_class_embeddings_input_dim {
            check.positive("projection_class_embeddings_input_dim", width);
        }
        if self.addition_embed_type.as_deref() == Some("text_time") {
            if self.addition_time_embed_dim.is_none() {
                check.problem("addition_time_embed_dim", "is missing; text_time needs it");
            }
            if self.projection_class_embeddings_input_dim.is_none() {
                let key = "projection_class_embeddings_input_dim";
                check.problem(key, "is missing; text_time needs it");
            }
        }
    }
}

impl CheckedConfig for UNetConfig {
    const FIXED: &'static [(&'static str, &'static [&'static str])] = &[
        ("attention_type", &["\"default\"", "null"]),
        ("conv_in_kernel", &["3"]),
        ("conv_out_kernel", &["3"]),
        ("time_embedding_type", &["\"positional\""]),
        ("time_embedding_dim", &["null"]),
        ("time_embedding_act_fn", &["null"]),
        ("timestep_post_act", &["null"]),
        ("mid_block_scale_factor", &["1"]),
        ("resnet_out_scale_factor", &["1"]),
        ("resnet_skip_time_act", &["false"]),
        ("only_cross_attention", &["false"]),
        ("dual_cross_attention", &["false"]),
        ("cross_attention_norm", &["null"]),
        ("class_embeddings_concat", &["false"]),
        ("num_class_embeds", &["null"]),
        ("encoder_hid_dim", &["null"]),
    ];

    fn check(&self, check: &mut ConfigCheck) {
        self.check_kinds(check);
        check.positive("in_channels", self.in_channels);
        check.positive("out_channels", self.out_channels);
        check.positive("layers_per_block", self.layers_per_block);
        check.positive("norm_num_groups", self.norm_num_groups);
        check.positive("cross_attention_dim", self.cross_attention_dim);
        check.positive_number("norm_eps", self.norm_eps);
        check.finite("freq_shift", self.freq_shift);
        check.not_negative("downsample_padding", self.downsample_padding);
        if let Some(size) = self.sample_size {
            check.positive("sample_size", size);
        }
        self.check_levels(check);
        self.check_added_embedding(check);
    }
}
