//! What `ControlNetUnionModel` (`models/controlnets/controlnet_union.py`, the SDXL
//! "union"/"promax" ControlNets) adds to a ControlNet: a control-type embedding added to
//! the time embedding, and a small transformer that fuses the embedded conditions (and
//! the latents' mean) into one signal added after `conv_in`.

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::engine::config_check::ConfigCheck;
use crate::engine::error::Result;
use crate::engine::models::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::engine::models::nn::{multi_head_attention, LayerNorm, Linear};
use crate::engine::models::unet_config::UNetConfig;
use crate::engine::weights::VarPath;

/// The config keys only union models have, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UnionKeys {
    /// Control types the model knows (6; 8 for "promax").
    #[serde(default = "six")]
    pub num_control_type: i64,
    /// Width of the fusion transformer.
    #[serde(default = "three_twenty")]
    pub num_trans_channel: i64,
    /// Its heads.
    #[serde(default = "eight")]
    pub num_trans_head: i64,
    /// Its layers.
    #[serde(default = "one")]
    pub num_trans_layer: i64,
    /// Width of the fused signal (the first level's width).
    #[serde(default = "three_twenty")]
    pub num_proj_channel: i64,
}

fn six() -> i64 {
    6
}
fn three_twenty() -> i64 {
    320
}
fn eight() -> i64 {
    8
}
fn one() -> i64 {
    1
}

impl UnionKeys {
    /// Checks the keys against the encoder they fuse into.
    pub fn check(&self, check: &mut ConfigCheck, encoder_width: i64) {
        check.positive("num_control_type", self.num_control_type);
        check.positive("num_trans_channel", self.num_trans_channel);
        check.positive("num_trans_head", self.num_trans_head);
        check.positive("num_trans_layer", self.num_trans_layer);
        if self.num_trans_head > 0 && self.num_trans_channel % self.num_trans_head != 0 {
            check.problem("num_trans_head", "does not divide num_trans_channel");
        }
        if self.num_proj_channel != encoder_width {
            check.problem(
                "num_proj_channel",
                "must equal block_out_channels[0] (the fused signal is added to conv_in's output)",
            );
        }
    }
}

/// One layer of the fusion transformer (CLIP's `ResidualAttentionBlock` with
/// `torch.nn.MultiheadAttention`).
struct FusionLayer {
    ln_1: LayerNorm,
    /// q, k and v stacked: [3 * width, width] and [3 * width].
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: i64,
}

impl FusionLayer {
    fn load(vp: &VarPath, width: i64, heads: i64) -> Result<Self> {
        let attn = vp.pp("attn");
        Ok(Self {
            ln_1: LayerNorm::load(&vp.pp("ln_1"), width, 1e-5)?,
            in_proj_weight: attn.get("in_proj_weight", &[3 * width, width])?,
            in_proj_bias: attn.get("in_proj_bias", &[3 * width])?,
            out_proj: Linear::load(&attn.pp("out_proj"), width, width, true)?,
            ln_2: LayerNorm::load(&vp.pp("ln_2"), width, 1e-5)?,
            c_fc: Linear::load(&vp.pp("mlp").pp("c_fc"), width, 4 * width, true)?,
            c_proj: Linear::load(&vp.pp("mlp").pp("c_proj"), 4 * width, width, true)?,
            heads,
        })
    }

    /// `x` [batch, tokens, width]. The attention module is not batch-first, so, as in the
    /// reference, it attends along the batch axis, separately for each token.
    fn forward(&self, x: &Tensor) -> Tensor {
        let qkv = self
            .ln_1
            .forward(x)
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .transpose(0, 1);
        let parts = qkv.chunk(3, -1);
        let attended = multi_head_attention(&parts[0], &parts[1], &parts[2], self.heads, false);
        let x = x + self.out_proj.forward(&attended.transpose(0, 1));
        let hidden = self.c_fc.forward(&self.ln_2.forward(&x));
        let quick_gelu = &hidden * (&hidden * 1.702).sigmoid();
        &x + self.c_proj.forward(&quick_gelu)
    }
}

/// A condition of a union model, its image already through the conditioning embedding.
pub struct EmbeddedCondition<'a> {
    /// [batch, width, h, w].
    pub embedded: &'a Tensor,
    /// Its control type's index.
    pub control_type: i64,
    /// Its scale inside the fusion (used when a call has several conditions).
    pub scale: f64,
}

/// The union model's fusion.
pub struct UnionFusion {
    task_embedding: Tensor,
    layers: Vec<FusionLayer>,
    spatial_ch_projs: Linear,
    control_add_embedding: TimestepEmbedding,
    types: i64,
    type_channels: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl UnionFusion {
    /// Loads the fusion of a union model whose encoder is `encoder`.
    pub fn load(vp: &VarPath, keys: &UnionKeys, encoder: &UNetConfig) -> Result<Self> {
        let width = keys.num_trans_channel;
        let type_channels = encoder.addition_time_embed_dim.unwrap_or(0);
        let time_dim = 4 * encoder.block_out_channels.first().copied().unwrap_or(0);
        let layers = (0..keys.num_trans_layer)
            .map(|i| {
                FusionLayer::load(
                    &vp.pp("transformer_layes").pp(i),
                    width,
                    keys.num_trans_head,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            task_embedding: vp.get("task_embedding", &[keys.num_control_type, width])?,
            layers,
            spatial_ch_projs: Linear::load(
                &vp.pp("spatial_ch_projs"),
                width,
                keys.num_proj_channel,
                true,
            )?,
            control_add_embedding: TimestepEmbedding::load(
                &vp.pp("control_add_embedding"),
                type_channels * keys.num_control_type,
                time_dim,
            )?,
            types: keys.num_control_type,
            type_channels,
            flip_sin_to_cos: encoder.flip_sin_to_cos,
            freq_shift: encoder.freq_shift,
        })
    }

    /// Control types the model knows.
    pub fn types(&self) -> i64 {
        self.types
    }

    /// The embedding of the control types present (a multi-hot vector per sample, taken
    /// as timesteps), added to the time embedding: [batch, time_dim].
    pub fn type_embedding(&self, present: &[i64], batch: i64, kind: Kind) -> Tensor {
        let device = self.task_embedding.device();
        // Filled on the device: a vector copied from the host would make the host wait
        // for the device at every step.
        let hot = Tensor::zeros([self.types], (Kind::Float, device));
        for &t in present.iter().filter(|&&t| (0..self.types).contains(&t)) {
            let _ = hot.narrow(0, t, 1).fill_(1.0);
        }
        let hot = hot.repeat([batch]);
        let sinusoid = timestep_embedding(
            &hot,
            self.type_channels,
            self.flip_sin_to_cos,
            self.freq_shift,
        )
        .reshape([batch, -1]);
        self.control_add_embedding.forward(&sinusoid.to_kind(kind))
    }

    /// The signal added to `sample` (conv_in's output): each condition plus its fused
    /// token projected, scaled inside the fusion when `scaled` (several conditions).
    pub fn fuse(
        &self,
        sample: &Tensor,
        conditions: &[EmbeddedCondition<'_>],
        scaled: bool,
    ) -> Tensor {
        let mean = |t: &Tensor| t.mean_dim([2i64, 3].as_slice(), false, t.kind());
        let mut tokens = Vec::with_capacity(conditions.len() + 1);
        let mut signals = Vec::with_capacity(conditions.len());
        for c in conditions {
            let token = (mean(c.embedded) + self.task_embedding.get(c.control_type)).unsqueeze(1);
            if scaled {
                tokens.push(token * c.scale);
                signals.push(c.embedded * c.scale);
            } else {
                tokens.push(token);
                signals.push(c.embedded.shallow_clone());
            }
        }
        tokens.push(mean(sample).unsqueeze(1));
        let x = self
            .layers
            .iter()
            .fold(Tensor::cat(&tokens, 1), |x, layer| layer.forward(&x));
        let mut fused = sample * 0.0;
        for (i, (signal, c)) in signals.iter().zip(conditions).enumerate() {
            let alpha = self
                .spatial_ch_projs
                .forward(&x.select(1, i as i64))
                .unsqueeze(-1)
                .unsqueeze(-1);
            let alpha = if scaled { alpha * c.scale } else { alpha };
            fused += signal + alpha;
        }
        fused
    }
}
