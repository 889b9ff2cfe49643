//! The embeddings of the diffusion time and of SDXL's micro-conditioning as diffusers
//! defines them (`embeddings.py`), shared by the UNet and the ControlNet.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Linear;
use crate::engine::models::unet_config::UNetConfig;
use crate::engine::weights::VarPath;

/// The SDXL added conditioning: pooled text embedding and six size/crop values per image.
pub struct AddedCond<'a> {
    /// [batch, projection_dim] pooled text embedding.
    pub text_embeds: &'a Tensor,
    /// [batch, 6]: original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: &'a Tensor,
    /// [1 or batch, time_cond_proj_dim]: the guidance-scale embedding a guidance-distilled
    /// UNet (LCM) adds to its time embedding (diffusers' `timestep_cond`).
    pub timestep_cond: Option<&'a Tensor>,
}

/// diffusers' `get_guidance_scale_embedding` of one guidance weight `w` (the pipelines
/// give `guidance_scale - 1`) in `dim` channels, float32: [1, dim].
pub fn guidance_scale_embedding(w: f64, dim: i64) -> Tensor {
    let options = (Kind::Float, tch::Device::Cpu);
    let w = Tensor::from_slice(&[w as f32]) * 1000.0;
    let half = dim / 2;
    let step = Tensor::from(10000f32).log() / (half - 1) as f64;
    let frequencies = (Tensor::arange(half, options) * -step).exp();
    let emb = w.unsqueeze(1) * frequencies.unsqueeze(0);
    let emb = Tensor::cat(&[emb.sin(), emb.cos()], 1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// Sinusoidal embedding of `timesteps` ([n] floats) into `dim` channels, as diffusers'
/// `get_timestep_embedding`.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent =
        Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln())) / (half as f64 - shift);
    let freqs = exponent.exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads the embedding at `vp`.
    pub fn load(vp: &VarPath, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&vp.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(&vp.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }

    /// Embeds `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

/// The time embedding and, for SDXL, the `text_time` embedding added to it.
pub struct TimeEmbeddings {
    time: TimestepEmbedding,
    /// A guidance-distilled model's projection of the guidance embedding (`cond_proj`).
    cond_proj: Option<Linear>,
    added: Option<TimestepEmbedding>,
    /// Channels of the sinusoidal time embedding (the first level's width).
    channels: i64,
    /// Channels of each micro-conditioning value's sinusoidal embedding.
    added_channels: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl TimeEmbeddings {
    /// Loads `time_embedding` (and `add_embedding`) at `vp` for the model `c` describes;
    /// the embedding is four times the first level's width.
    pub fn load(vp: &VarPath, c: &UNetConfig, config_path: &Path) -> Result<Self> {
        let channels = c.block_out_channels.first().copied().unwrap_or(0);
        let time_dim = channels * 4;
        let added = match c.addition_embed_type.as_deref() {
            Some("text_time") => {
                let input =
                    c.projection_class_embeddings_input_dim
                        .ok_or_else(|| EngineError::Config {
                            path: config_path.to_path_buf(),
                            message: "text_time needs projection_class_embeddings_input_dim".into(),
                        })?;
                Some(TimestepEmbedding::load(
                    &vp.pp("add_embedding"),
                    input,
                    time_dim,
                )?)
            }
            _ => None,
        };
        let cond_proj = c
            .time_cond_proj_dim
            .map(|dim| {
                Linear::load(
                    &vp.pp("time_embedding").pp("cond_proj"),
                    dim,
                    channels,
                    false,
                )
            })
            .transpose()?;
        Ok(Self {
            time: TimestepEmbedding::load(&vp.pp("time_embedding"), channels, time_dim)?,
            cond_proj,
            added,
            channels,
            added_channels: c.addition_time_embed_dim.unwrap_or(0),
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
        })
    }

    /// The embedding of `timestep` (a scalar) for a batch of `batch` in `kind`, with the
    /// added conditioning when the model has an added embedding.
    pub fn forward(
        &self,
        timestep: &Tensor,
        batch: i64,
        kind: Kind,
        added: Option<&AddedCond>,
    ) -> Tensor {
        self.forward_with(timestep, batch, kind, None, added)
    }

    /// [`Self::forward`] with `extra` [batch, time_dim] added to the time embedding before
    /// the added conditioning (a union ControlNet's control-type embedding).
    pub fn forward_with(
        &self,
        timestep: &Tensor,
        batch: i64,
        kind: Kind,
        extra: Option<Tensor>,
        added: Option<&AddedCond>,
    ) -> Tensor {
        let timesteps = timestep.reshape([-1]).expand([batch], false);
        let sinusoid = timestep_embedding(
            &timesteps,
            self.channels,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        let mut sinusoid = sinusoid.to_kind(kind);
        if let (Some(proj), Some(cond)) = (&self.cond_proj, added.and_then(|a| a.timestep_cond)) {
            sinusoid += proj.forward(&cond.to_kind(kind));
        }
        let mut emb = self.time.forward(&sinusoid);
        if let Some(extra) = extra {
            emb += extra;
        }
        if let (Some(embedding), Some(added)) = (&self.added, added) {
            let time_embeds = timestep_embedding(
                &added.time_ids.reshape([-1]),
                self.added_channels,
                self.flip_sin_to_cos,
                self.freq_shift,
            )
            .reshape([added.text_embeds.size()[0], -1]);
            let input = Tensor::cat(
                &[added.text_embeds.to_kind(kind), time_embeds.to_kind(kind)],
                -1,
            );
            emb += embedding.forward(&input);
        }
        emb
    }
}
