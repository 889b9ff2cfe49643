//! The UNet's building blocks as diffusers defines them (`unet_2d_blocks.py`): the down,
//! mid and up blocks, each loading itself from its weight path. The UNet and the
//! ControlNet, which shares the UNet's encoder, are made of them.

use std::cell::RefCell;
use std::path::Path;

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::models::attention::{
    Context, CrossAttentionLayer, Transformer2DConfig, Transformer2DModel,
};
use crate::engine::models::freeu::FreeUStage;
use crate::engine::models::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::engine::models::unet_config::UNetConfig;
use crate::engine::profile;
use crate::engine::weights::VarPath;

/// What every block of one model shares (from its config).
#[derive(Debug, Clone)]
pub struct BlockSettings<'a> {
    /// Width of the time embedding the resnets take.
    pub temb_channels: i64,
    /// Group norm groups.
    pub groups: i64,
    /// Group norm epsilon of the resnets.
    pub eps: f64,
    /// Width of the text conditioning.
    pub cross_attention_dim: i64,
    /// Linear rather than 1×1 convolution projections in the transformers.
    pub use_linear_projection: bool,
    /// The config the blocks come from, named in errors.
    pub config_path: &'a Path,
    /// Each cross-attention layer loaded so far, in load order (the slots image prompts
    /// address them by).
    cross_attention_layers: RefCell<Vec<CrossAttentionLayer>>,
}

impl<'a> BlockSettings<'a> {
    /// The settings of the model `c` describes (its time embedding is four times its first
    /// level's width).
    pub fn of(c: &UNetConfig, config_path: &'a Path) -> Self {
        Self {
            temb_channels: c.block_out_channels.first().copied().unwrap_or(0) * 4,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            cross_attention_dim: c.cross_attention_dim,
            use_linear_projection: c.use_linear_projection,
            config_path,
            cross_attention_layers: RefCell::default(),
        }
    }

    /// Every cross-attention layer loaded with these settings, by slot.
    pub fn cross_attention_layers(&self) -> Vec<CrossAttentionLayer> {
        self.cross_attention_layers.borrow().clone()
    }

    fn resnet(&self, vp: &VarPath, in_channels: i64, out_channels: i64) -> Result<ResnetBlock2D> {
        ResnetBlock2D::load(
            vp,
            ResnetConfig {
                in_channels,
                out_channels,
                temb_channels: Some(self.temb_channels),
                groups: self.groups,
                eps: self.eps,
            },
        )
    }

    fn transformer(
        &self,
        vp: &VarPath,
        channels: i64,
        heads: i64,
        depth: i64,
    ) -> Result<Transformer2DModel> {
        if heads <= 0 || channels % heads != 0 {
            return Err(EngineError::Config {
                path: self.config_path.to_path_buf(),
                message: format!("{channels} channels cannot be split into {heads} heads"),
            });
        }
        let first_slot = {
            let mut layers = self.cross_attention_layers.borrow_mut();
            let first = layers.len();
            let layer = CrossAttentionLayer {
                attention: vp.prefix().to_string(),
                width: channels,
            };
            layers.extend(std::iter::repeat_n(layer, depth.max(0) as usize));
            first
        };
        Transformer2DModel::load(
            vp,
            Transformer2DConfig {
                first_slot,
                channels,
                heads,
                head_dim: channels / heads,
                layers: depth,
                context_dim: self.cross_attention_dim,
                groups: self.groups,
                use_linear_projection: self.use_linear_projection,
            },
        )
    }
}

/// The transformers of a cross-attention block: heads, and transformer blocks per
/// attention (one entry per resnet of the block).
#[derive(Debug, Clone)]
pub struct CrossAttention {
    /// Attention heads.
    pub heads: i64,
    /// Transformer blocks of each attention.
    pub depths: Vec<i64>,
}

/// A down block (`DownBlock2D`, or `CrossAttnDownBlock2D` with transformers): resnets,
/// each optionally followed by a transformer, then a downsampler.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Runs the down blocks from `h` (the `conv_in` output): the deepest output, and every
/// skip state in the order the blocks produce them (`h` itself first). `features` are
/// T2I-Adapter features, one per block in order (see [`DownBlock::forward`]); blocks
/// beyond them get none.
pub fn encode(
    blocks: &[DownBlock],
    h: Tensor,
    temb: &Tensor,
    context: &Context,
    features: &[Tensor],
) -> (Tensor, Vec<Tensor>) {
    let mut states = vec![h.shallow_clone()];
    let h = blocks.iter().enumerate().fold(h, |h, (i, block)| {
        let _stage = profile::span_numbered("down", i);
        let (out, block_states) = block.forward(&h, temb, context, features.get(i));
        states.extend(block_states);
        out
    });
    (h, states)
}

/// The shape of one down block.
#[derive(Debug, Clone)]
pub struct DownBlockShape {
    /// Channels in.
    pub in_channels: i64,
    /// Channels out.
    pub out_channels: i64,
    /// Resnets.
    pub layers: i64,
    /// Its transformers, for a cross-attention block.
    pub attention: Option<CrossAttention>,
    /// The downsampler's padding, unless it is the last block.
    pub downsample_padding: Option<i64>,
}

impl DownBlock {
    /// Loads `down_blocks.{i}` at `vp`.
    pub fn load(vp: &VarPath, s: &BlockSettings<'_>, shape: &DownBlockShape) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..shape.layers {
            let from = if j == 0 {
                shape.in_channels
            } else {
                shape.out_channels
            };
            resnets.push(s.resnet(&vp.pp("resnets").pp(j), from, shape.out_channels)?);
            if let Some(a) = &shape.attention {
                let depth = a.depths.get(j as usize).copied().unwrap_or(1);
                let vp = vp.pp("attentions").pp(j);
                attentions.push(s.transformer(&vp, shape.out_channels, a.heads, depth)?);
            }
        }
        let downsampler = match shape.downsample_padding {
            Some(padding) => Some(Downsample2D::load(
                &vp.pp("downsamplers").pp(0),
                shape.out_channels,
                padding,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the states the up blocks concatenate. A T2I-Adapter
    /// `feature` joins where diffusers adds it: in a block with attention, to the output
    /// of its last resnet and transformer (before that state is kept and before the
    /// downsampler); in one without, to the block's output, which is also its last state.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Context,
        feature: Option<&Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        let attended = !self.attentions.is_empty();
        let last = self.resnets.len().saturating_sub(1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context);
            }
            if let Some(feature) = feature.filter(|_| attended && i == last) {
                h += feature;
            }
            states.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h);
            states.push(h.shallow_clone());
        }
        if let Some(feature) = feature.filter(|_| !attended) {
            h = &h + feature;
            if let Some(state) = states.last_mut() {
                *state = h.shallow_clone();
            }
        }
        (h, states)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Loads `mid_block` at `vp`: `channels` wide, one transformer of `heads` heads and
    /// `depth` blocks.
    pub fn load(
        vp: &VarPath,
        s: &BlockSettings<'_>,
        channels: i64,
        heads: i64,
        depth: i64,
    ) -> Result<Self> {
        Ok(Self {
            resnets: vec![
                s.resnet(&vp.pp("resnets").pp(0), channels, channels)?,
                s.resnet(&vp.pp("resnets").pp(1), channels, channels)?,
            ],
            attentions: vec![s.transformer(&vp.pp("attentions").pp(0), channels, heads, depth)?],
        })
    }

    /// Loads a `UNetMidBlock2D` without attention at `vp` (one resnet), as small
    /// ControlNets have.
    pub fn load_plain(vp: &VarPath, s: &BlockSettings<'_>, channels: i64) -> Result<Self> {
        Ok(Self {
            resnets: vec![s.resnet(&vp.pp("resnets").pp(0), channels, channels)?],
            attentions: Vec::new(),
        })
    }

    /// The block's output.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Context) -> Tensor {
        let mut h = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context);
            h = resnet.forward(&h, Some(temb));
        }
        h
    }
}

/// An up block (`UpBlock2D`, or `CrossAttnUpBlock2D` with transformers): resnets over the
/// concatenated skip states, transformers, an upsampler.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// The shape of one up block.
#[derive(Debug, Clone)]
pub struct UpBlockShape {
    /// Channels of the previous block's output.
    pub prev_out_channels: i64,
    /// Channels out.
    pub out_channels: i64,
    /// Channels of the skip state its last resnet takes (the next-deeper level's width).
    pub last_skip_channels: i64,
    /// Resnets.
    pub layers: i64,
    /// Its transformers, for a cross-attention block.
    pub attention: Option<CrossAttention>,
    /// Whether it ends with an upsampler (all but the last block).
    pub upsample: bool,
}

impl UpBlock {
    /// Loads `up_blocks.{i}` at `vp`.
    pub fn load(vp: &VarPath, s: &BlockSettings<'_>, shape: &UpBlockShape) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        let out = shape.out_channels;
        for j in 0..shape.layers {
            let skip = if j + 1 == shape.layers {
                shape.last_skip_channels
            } else {
                out
            };
            let from = if j == 0 { shape.prev_out_channels } else { out };
            resnets.push(s.resnet(&vp.pp("resnets").pp(j), from + skip, out)?);
            if let Some(a) = &shape.attention {
                let depth =
                    a.depths
                        .get(j as usize)
                        .copied()
                        .ok_or_else(|| EngineError::Config {
                            path: s.config_path.to_path_buf(),
                            message: "reverse_transformer_layers_per_block is too short".into(),
                        })?;
                attentions.push(s.transformer(&vp.pp("attentions").pp(j), out, a.heads, depth)?);
            }
        }
        let upsampler = if shape.upsample {
            Some(Upsample2D::load(&vp.pp("upsamplers").pp(0), out)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Resnets (one skip state consumed by each).
    pub fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// The block's output, consuming skip states from the end of `skips`; with FreeU's
    /// factors when given.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Context,
        upsample_size: Option<(i64, i64)>,
        freeu: Option<FreeUStage>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                let (backbone, skip) = match freeu {
                    Some(stage) => stage.apply(&h, &skip),
                    None => (h, skip),
                };
                h = Tensor::cat(&[backbone, skip], 1);
            }
            h = resnet.forward(&h, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context);
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => h,
        }
    }
}
