//! `UNet2DConditionModel` as SDXL uses it (`models/unets/unet_2d_condition.py` in
//! diffusers), with the `text_time` added embedding, made of the blocks in
//! [`crate::engine::models::unet_blocks`].

use std::path::Path;

use tch::Tensor;

use crate::engine::config_check::{check_config, read_config};
use crate::engine::device::Placement;
use crate::engine::error::Result;
use crate::engine::models::attention::{Context, CrossAttentionLayer};
use crate::engine::models::embeddings::TimeEmbeddings;
use crate::engine::models::nn::{collect_layers, Conv2d, GroupNorm, LayerTable};
use crate::engine::models::seamless;
use crate::engine::models::unet_blocks::{
    encode, BlockSettings, CrossAttention, DownBlock, DownBlockShape, MidBlock, UpBlock,
    UpBlockShape,
};
use crate::engine::pag::self_attention_names;
use crate::engine::profile;
use crate::engine::weights::VarPath;

pub use crate::engine::models::embeddings::AddedCond;

/// What ControlNets add to a UNet: one residual per skip state and one for the mid block.
pub struct ControlResiduals {
    /// Added to the skip states, in the order the down blocks produce them.
    pub down: Vec<Tensor>,
    /// Added to the mid block's output.
    pub mid: Tensor,
}

/// What control units add to one UNet call.
#[derive(Default)]
pub struct ControlAdditions {
    /// ControlNets' residuals.
    pub residuals: Option<ControlResiduals>,
    /// T2I-Adapters' features (diffusers' `down_intrablock_additional_residuals`): one
    /// per down block in order, added inside it, then the next one added to the mid
    /// block's output where its shape is that output's.
    pub features: Vec<Tensor>,
}
pub use crate::engine::models::unet_config::{PerBlock, UNetConfig};

/// The SDXL denoising UNet.
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    embeddings: TimeEmbeddings,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Its linear and convolution layers, for LoRA adapters.
    adaptable: LayerTable,
    /// Each cross-attention layer, by slot (diffusers' attention processor order).
    cross_attention_layers: Vec<CrossAttentionLayer>,
    /// The self-attention layer beside each, by slot: its diffusers module name.
    self_attention_names: Vec<String>,
}

impl UNet2DConditionModel {
    /// Loads a diffusers `unet/` folder.
    pub fn load_dir(dir: &Path, placement: Placement) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: UNetConfig = read_config(&config_path)?;
        let weights = placement.open_component(dir, "diffusion_pytorch_model")?;
        let model = Self::load(&weights.root(), config, &config_path)?;
        weights.check_all_used(|_| false)?;
        Ok(model)
    }

    /// Builds the model from weights at `vp` (diffusers keys).
    pub fn load(vp: &VarPath, config: UNetConfig, config_path: &Path) -> Result<Self> {
        let (mut model, layers) = collect_layers(|| Self::build(vp, config, config_path))?;
        model.adaptable = layers;
        Ok(model)
    }

    /// The linear and convolution layers, by module key.
    pub fn adaptable_layers(&self) -> &LayerTable {
        &self.adaptable
    }

    fn build(vp: &VarPath, config: UNetConfig, config_path: &Path) -> Result<Self> {
        check_config(&config, config_path)?;
        let c = &config;
        let channels = &c.block_out_channels;
        let (heads, depths) = c.attention_sizes();
        let settings = BlockSettings::of(c, config_path);
        let n = channels.len();

        // 1. time and added embeddings
        let embeddings = TimeEmbeddings::load(vp, c, config_path)?;

        // 2. down blocks
        let mut down_blocks = Vec::with_capacity(n);
        for (i, shape) in Self::down_shapes(c, &heads, &depths).iter().enumerate() {
            down_blocks.push(DownBlock::load(
                &vp.pp("down_blocks").pp(i),
                &settings,
                shape,
            )?);
        }

        // 3. up blocks, loaded before the mid block: cross-attention slots follow
        // diffusers' processor order (down, up, mid)
        let mut up_blocks = Vec::with_capacity(n);
        for (i, shape) in Self::up_shapes(c, &heads, &depths).iter().enumerate() {
            up_blocks.push(UpBlock::load(&vp.pp("up_blocks").pp(i), &settings, shape)?);
        }

        // 4. mid block
        let mid_block = MidBlock::load(
            &vp.pp("mid_block"),
            &settings,
            channels[n - 1],
            heads[n - 1],
            depths[n - 1],
        )?;

        // 5. output
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        Ok(Self {
            conv_in: Conv2d::load(&vp.pp("conv_in"), c.in_channels, channels[0], 3, 1, 1)?,
            embeddings,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vp.pp("conv_norm_out"), groups, channels[0], eps)?,
            conv_out: Conv2d::load(&vp.pp("conv_out"), channels[0], c.out_channels, 3, 1, 1)?,
            cross_attention_layers: settings.cross_attention_layers(),
            self_attention_names: Self::self_attention_names(c),
            config,
            adaptable: LayerTable::default(),
        })
    }

    /// The down blocks' shapes.
    pub fn down_shapes(c: &UNetConfig, heads: &[i64], depths: &[i64]) -> Vec<DownBlockShape> {
        let channels = &c.block_out_channels;
        let n = channels.len();
        (0..n)
            .map(|i| DownBlockShape {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                layers: c.layers_per_block,
                attention: (c.down_block_types[i] == "CrossAttnDownBlock2D").then(|| {
                    CrossAttention {
                        heads: heads[i],
                        depths: vec![depths[i]; c.layers_per_block.max(0) as usize],
                    }
                }),
                downsample_padding: (i + 1 < n).then_some(c.downsample_padding),
            })
            .collect()
    }

    /// The names of its self-attention layers (diffusers' module names,
    /// `<attention>.transformer_blocks.<j>.attn1`), in the order of the cross-attention
    /// slots: down blocks, up blocks, mid block, as [`Self::build`] loads them.
    pub fn self_attention_names(c: &UNetConfig) -> Vec<String> {
        let (heads, depths) = c.attention_sizes();
        let mut attentions: Vec<(String, usize)> = Vec::new();
        let mut add = |section: String, layers: i64, attention: &Option<CrossAttention>| {
            let Some(a) = attention else { return };
            for j in 0..layers.max(0) {
                let depth = a.depths.get(j as usize).copied().unwrap_or(1);
                attentions.push((format!("{section}.attentions.{j}"), depth.max(0) as usize));
            }
        };
        for (i, shape) in Self::down_shapes(c, &heads, &depths).iter().enumerate() {
            add(format!("down_blocks.{i}"), shape.layers, &shape.attention);
        }
        for (i, shape) in Self::up_shapes(c, &heads, &depths).iter().enumerate() {
            add(format!("up_blocks.{i}"), shape.layers, &shape.attention);
        }
        if let Some(&depth) = depths.last() {
            attentions.push(("mid_block.attentions.0".into(), depth.max(0) as usize));
        }
        self_attention_names(
            attentions
                .iter()
                .map(|(path, depth)| (path.as_str(), *depth)),
        )
    }

    /// The up blocks' shapes (their levels in reverse).
    fn up_shapes(c: &UNetConfig, heads: &[i64], depths: &[i64]) -> Vec<UpBlockShape> {
        let reversed: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let n = reversed.len();
        let layers = c.layers_per_block + 1;
        let reversed_depths: Vec<Vec<i64>> = match &c.reverse_transformer_layers_per_block {
            Some(per_block) => per_block.clone(),
            None => depths
                .iter()
                .rev()
                .map(|&d| vec![d; layers.max(0) as usize])
                .collect(),
        };
        (0..n)
            .map(|i| UpBlockShape {
                prev_out_channels: if i == 0 { reversed[0] } else { reversed[i - 1] },
                out_channels: reversed[i],
                last_skip_channels: reversed[(i + 1).min(n - 1)],
                layers,
                attention: (c.up_block_types[i] == "CrossAttnUpBlock2D").then(|| CrossAttention {
                    heads: heads[n - 1 - i],
                    depths: reversed_depths.get(i).cloned().unwrap_or_default(),
                }),
                upsample: i + 1 < n,
            })
            .collect()
    }

    /// The model's configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Each cross-attention layer, in diffusers' attention-processor order (down blocks,
    /// up blocks, mid block): the layers image prompts address.
    pub fn cross_attention_layers(&self) -> &[CrossAttentionLayer] {
        &self.cross_attention_layers
    }

    /// The self-attention layers' module names, by slot (as
    /// [`Self::cross_attention_layers`]).
    pub fn self_attentions(&self) -> &[String] {
        &self.self_attention_names
    }

    /// Width of the guidance-scale embedding it takes, when it is guidance-distilled (an
    /// LCM UNet: classifier-free guidance is then off and the scale an input).
    pub fn time_cond_proj_dim(&self) -> Option<i64> {
        self.config.time_cond_proj_dim
    }

    /// Width of the pooled text embedding the added conditioning expects, given the
    /// number of micro-conditioning values (6 for SDXL, 5 for its refiner).
    pub fn pooled_dim(&self, time_values: i64) -> Option<i64> {
        let input = self.config.projection_class_embeddings_input_dim?;
        let per_value = self.config.addition_time_embed_dim?;
        Some(input - time_values * per_value)
    }

    /// Predicts the noise (or v) for `sample` [batch, C, h, w] at `timestep` (a scalar
    /// float tensor), conditioned on `context` [batch, tokens, cross_attention_dim].
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Tensor {
        self.forward_controlled(sample, timestep, &Context::text(context), added, None)
    }

    /// [`Self::forward`] with image prompts in `context`, ControlNet residuals added to
    /// the skip states and to the mid block's output, as diffusers adds
    /// `down_block_additional_residuals` and `mid_block_additional_residual`, and
    /// T2I-Adapter features added as it adds `down_intrablock_additional_residuals`.
    pub fn forward_controlled(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Context,
        added: Option<&AddedCond>,
        additions: Option<&ControlAdditions>,
    ) -> Tensor {
        let _seamless = seamless::model();
        let features = additions.map_or(&[][..], |a| a.features.as_slice());
        let control = additions.and_then(|a| a.residuals.as_ref());
        let batch = sample.size()[0];
        let dtype = sample.kind();

        // 1. time
        let emb = {
            let _stage = profile::span("time_embedding");
            self.embeddings.forward(timestep, batch, dtype, added)
        };

        // 2. pre-process
        let h = self.conv_in.forward(sample);

        // 3. down; the skip states are consumed from the end by the up blocks
        let (mut h, mut skips) = encode(&self.down_blocks, h, &emb, context, features);

        if let Some(control) = control {
            for (skip, residual) in skips.iter_mut().zip(&control.down) {
                *skip = &*skip + residual;
            }
        }

        // 4. mid
        h = {
            let _stage = profile::span("mid");
            self.mid_block.forward(&h, &emb, context)
        };
        if let Some(feature) = features
            .get(self.down_blocks.len())
            .filter(|f| f.size() == h.size())
        {
            h += feature;
        }
        if let Some(control) = control {
            h += &control.mid;
        }

        // 5. up; diffusers' forward_upsample_size when the latent does not divide evenly
        let factor = 1i64 << (self.up_blocks.len() - 1);
        let size = sample.size();
        let forward_upsample_size = size[2] % factor != 0 || size[3] % factor != 0;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let _stage = profile::span_numbered("up", i);
            let mut taken = skips.split_off(skips.len().saturating_sub(block.layers()));
            let upsample_size = if forward_upsample_size {
                skips.last().map(|s| {
                    let s = s.size();
                    (s[2], s[3])
                })
            } else {
                None
            };
            let freeu = context.freeu.and_then(|f| f.stage(i));
            h = block.forward(&h, &mut taken, &emb, context, upsample_size, freeu);
        }

        // 6. post-process
        let _stage = profile::span("conv_out");
        // Contiguous whatever the convolutions' memory format (channels-last weights).
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
            .contiguous()
    }
}
