//! `ControlNetModel` as diffusers defines it (`models/controlnets/controlnet.py`) for
//! SDXL: the UNet's encoder (its own config: small ControlNets have other blocks and
//! depths), a conditioning embedding of the control image added after `conv_in`, and a
//! 1×1 convolution per skip state and for the mid block, whose outputs the UNet adds to
//! its own.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::engine::config_check::{config_from_value, ConfigCheck};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::files::read_json;
use crate::engine::models::attention::Context;
pub use crate::engine::models::controlnet_union::EmbeddedCondition;
use crate::engine::models::controlnet_union::{UnionFusion, UnionKeys};
use crate::engine::models::embeddings::{AddedCond, TimeEmbeddings};
use crate::engine::models::nn::Conv2d;
use crate::engine::models::unet::{ControlResiduals, UNet2DConditionModel};
use crate::engine::models::unet_blocks::{encode, BlockSettings, DownBlock, MidBlock};
use crate::engine::models::unet_config::UNetConfig;
use crate::engine::weights::{VarPath, Weights};

/// A ControlNet's config: the encoder it shares with a UNet, and its own keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetConfig {
    /// The encoder, as a UNet config (up block types mirror the down blocks, unused).
    pub encoder: UNetConfig,
    /// The keys only ControlNets have.
    pub control: ControlKeys,
    /// The keys of a union model (`_class_name` `ControlNetUnionModel`).
    pub union: Option<UnionKeys>,
}

/// The config keys only ControlNets have, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ControlKeys {
    /// Channels of the control image.
    #[serde(default = "three")]
    pub conditioning_channels: i64,
    /// Widths of the conditioning embedding's levels (each halves the image).
    #[serde(default = "embedding_widths")]
    pub conditioning_embedding_out_channels: Vec<i64>,
    /// `rgb`, or `bgr` for models trained on BGR images (the channels are flipped).
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Residuals averaged over space (shuffle-style models).
    #[serde(default)]
    pub global_pool_conditions: bool,
    /// `UNetMidBlock2DCrossAttn`, or `UNetMidBlock2D` (one resnet, no attention).
    #[serde(default = "cross_attention_mid")]
    pub mid_block_type: String,
}

fn three() -> i64 {
    3
}
fn embedding_widths() -> Vec<i64> {
    vec![16, 32, 96, 256]
}
fn rgb() -> String {
    "rgb".into()
}
fn cross_attention_mid() -> String {
    "UNetMidBlock2DCrossAttn".into()
}

impl ControlNetConfig {
    /// Reads and checks a ControlNet's `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_value(path, &read_json(path)?)
    }

    /// The config `value` (read from `path`), checked.
    pub fn from_value(path: &Path, value: &Value) -> Result<Self> {
        let bad = |e: serde_json::Error| EngineError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let control = ControlKeys::deserialize(value).map_err(bad)?;
        let is_union =
            value.get("_class_name").and_then(Value::as_str) == Some("ControlNetUnionModel");
        let union = if is_union {
            Some(UnionKeys::deserialize(value).map_err(bad)?)
        } else {
            None
        };
        let mut check = ConfigCheck::default();
        control.check(&mut check);
        if let Some(keys) = &union {
            let width = value
                .get("block_out_channels")
                .and_then(|c| c.get(0))
                .and_then(Value::as_i64)
                .unwrap_or(320);
            keys.check(&mut check, width);
            if control.controlnet_conditioning_channel_order != "rgb" {
                check.problem(
                    "controlnet_conditioning_channel_order",
                    "must be rgb for a union model",
                );
            }
        }
        check.finish(path)?;
        // The encoder is checked as a UNet's, with up blocks that mirror its down blocks
        // and the mid block checked above.
        let mut encoder = value.clone();
        if let Some(map) = encoder.as_object_mut() {
            let mirrored: Vec<Value> = map
                .get("down_block_types")
                .and_then(Value::as_array)
                .map(|down| {
                    down.iter()
                        .rev()
                        .map(|t| Value::from(t.as_str().unwrap_or("").replace("Down", "Up")))
                        .collect()
                })
                .unwrap_or_default();
            map.insert("up_block_types".into(), Value::Array(mirrored));
            map.remove("mid_block_type");
        }
        Ok(Self {
            encoder: config_from_value(path, &encoder)?,
            control,
            union,
        })
    }
}

impl ControlKeys {
    pub(crate) fn check(&self, check: &mut ConfigCheck) {
        check.positive("conditioning_channels", self.conditioning_channels);
        if self.conditioning_embedding_out_channels.is_empty() {
            check.problem("conditioning_embedding_out_channels", "is empty");
        }
        check.all_positive(
            "conditioning_embedding_out_channels",
            &self.conditioning_embedding_out_channels,
        );
        check.one_of(
            "controlnet_conditioning_channel_order",
            &self.controlnet_conditioning_channel_order,
            &["rgb", "bgr"],
        );
        check.one_of(
            "mid_block_type",
            &self.mid_block_type,
            &["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"],
        );
    }

    /// How many times the conditioning embedding halves the control image: the control
    /// image is this many times the latent size.
    pub fn downscale(&self) -> i64 {
        1 << (self.conditioning_embedding_out_channels.len().clamp(1, 8) - 1)
    }
}

/// `ControlNetConditioningEmbedding`: the control image to the first level's width.
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn load(vp: &VarPath, keys: &ControlKeys, out_channels: i64) -> Result<Self> {
        let widths = &keys.conditioning_embedding_out_channels;
        let mut blocks = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            let (from, to) = (pair[0], pair[1]);
            blocks.push(Conv2d::load(
                &vp.pp("blocks").pp(2 * i),
                from,
                from,
                3,
                1,
                1,
            )?);
            blocks.push(Conv2d::load(
                &vp.pp("blocks").pp(2 * i + 1),
                from,
                to,
                3,
                2,
                1,
            )?);
        }
        let last = widths.last().copied().unwrap_or(0);
        Ok(Self {
            conv_in: Conv2d::load(
                &vp.pp("conv_in"),
                keys.conditioning_channels,
                widths[0],
                3,
                1,
                1,
            )?,
            blocks,
            conv_out: Conv2d::load(&vp.pp("conv_out"), last, out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, image: &Tensor) -> Tensor {
        let h = self.conv_in.forward(image).silu();
        let h = self.blocks.iter().fold(h, |h, b| b.forward(&h).silu());
        self.conv_out.forward(&h)
    }
}

/// How a ControlNet's residuals are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlScale {
    /// The conditioning scale.
    pub scale: f64,
    /// diffusers' guess mode: residuals scaled from 0.1 (shallowest) to 1 (mid block).
    pub guess_mode: bool,
}

/// An SDXL ControlNet.
pub struct ControlNetModel {
    config: ControlNetConfig,
    embeddings: TimeEmbeddings,
    conv_in: Conv2d,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    controlnet_down_blocks: Vec<Conv2d>,
    controlnet_mid_block: Conv2d,
    /// A union model's fusion.
    union: Option<UnionFusion>,
}

/// A condition of a union model's call.
pub struct UnionCondition<'a> {
    /// The control image, as [`ControlNetModel::forward`] takes it.
    pub image: &'a Tensor,
    /// Its control type's index.
    pub control_type: i64,
    /// Its scale.
    pub scale: f64,
}

impl ControlNetModel {
    /// Loads a diffusers ControlNet folder (`config.json` and its weights).
    pub fn load_dir(dir: &Path, placement: Placement) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ControlNetConfig::read(&config_path)?;
        let weights = placement.open_component(dir, "diffusion_pytorch_model")?;
        let model = Self::load(&weights.root(), config, &config_path)?;
        weights.check_all_used(|_| false)?;
        Ok(model)
    }

    /// Loads a ControlNet folder, or a single `.safetensors` file in diffusers key names
    /// (its config inferred from the tensor shapes).
    pub fn load_path(path: &Path, placement: Placement) -> Result<Self> {
        if path.is_dir() {
            Self::load_dir(path, placement)
        } else {
            Self::load_file(path, placement)
        }
    }

    /// Loads a single-file ControlNet (see [`crate::engine::models::controlnet_file`]).
    pub fn load_file(path: &Path, placement: Placement) -> Result<Self> {
        let config = Self::file_config(path)?;
        let weights = Weights::open(&[path.to_path_buf()], placement.device, placement.kind)?
            .with_layout(placement.layout);
        let model = Self::load(&weights.root(), config, path)?;
        weights.check_all_used(|_| false)?;
        Ok(model)
    }

    /// The config of a single-file ControlNet, inferred from its tensor shapes and checked.
    pub fn file_config(path: &Path) -> Result<ControlNetConfig> {
        let (shapes, _) = crate::engine::weights::read_shapes(path)?;
        let value = crate::engine::models::controlnet_file::infer_config(path, &shapes)?;
        ControlNetConfig::from_value(path, &value)
    }

    /// Builds the model from weights at `vp` (diffusers keys).
    pub fn load(vp: &VarPath, config: ControlNetConfig, config_path: &Path) -> Result<Self> {
        let c = &config.encoder;
        let channels = &c.block_out_channels;
        let (heads, depths) = c.attention_sizes();
        let settings = BlockSettings::of(c, config_path);
        let shapes = UNet2DConditionModel::down_shapes(c, &heads, &depths);
        let mut down_blocks = Vec::with_capacity(shapes.len());
        // One 1×1 convolution per skip state: conv_in's, then each block's.
        let mut widths = vec![channels[0]];
        for (i, shape) in shapes.iter().enumerate() {
            down_blocks.push(DownBlock::load(
                &vp.pp("down_blocks").pp(i),
                &settings,
                shape,
            )?);
            let states = shape.layers + i64::from(shape.downsample_padding.is_some());
            widths.extend(std::iter::repeat_n(
                shape.out_channels,
                states.max(0) as usize,
            ));
        }
        let controlnet_down_blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| Conv2d::load(&vp.pp("controlnet_down_blocks").pp(i), w, w, 1, 1, 0))
            .collect::<Result<Vec<_>>>()?;
        let last = channels[channels.len() - 1];
        let mid = vp.pp("mid_block");
        let mid_block = if config.control.mid_block_type == "UNetMidBlock2D" {
            MidBlock::load_plain(&mid, &settings, last)?
        } else {
            let n = channels.len();
            MidBlock::load(&mid, &settings, last, heads[n - 1], depths[n - 1])?
        };
        let union = match &config.union {
            Some(keys) => Some(UnionFusion::load(vp, keys, c)?),
            None => None,
        };
        Ok(Self {
            union,
            embeddings: TimeEmbeddings::load(vp, c, config_path)?,
            conv_in: Conv2d::load(&vp.pp("conv_in"), c.in_channels, channels[0], 3, 1, 1)?,
            cond_embedding: ConditioningEmbedding::load(
                &vp.pp("controlnet_cond_embedding"),
                &config.control,
                channels[0],
            )?,
            down_blocks,
            mid_block,
            controlnet_down_blocks,
            controlnet_mid_block: Conv2d::load(
                &vp.pp("controlnet_mid_block"),
                last,
                last,
                1,
                1,
                0,
            )?,
            config,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The residuals for a UNet denoising `sample` at `timestep` with `context` and
    /// `added`, controlled by `image` ([batch, channels, h, w] in [0, 1], h and w the
    /// latent size times [`ControlKeys::downscale`]).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        image: &Tensor,
        scale: ControlScale,
    ) -> ControlResiduals {
        let embedded = self.embed(image);
        let context = Context::text(context);
        self.forward_embedded(sample, timestep, &context, added, &embedded, scale)
    }

    /// The conditioning embedding of a control image (in its channel order): what
    /// [`Self::forward_embedded`] adds after `conv_in`. It depends on the image only, so a
    /// run computes it once for all its steps.
    pub fn embed(&self, image: &Tensor) -> Tensor {
        if self.config.control.controlnet_conditioning_channel_order == "bgr" {
            self.cond_embedding.forward(&image.flip([1]))
        } else {
            self.cond_embedding.forward(image)
        }
    }

    /// [`Self::forward`] with the control image already through [`Self::embed`], and
    /// the prompts' tokens in a [`Context`] (with the tokens each image attends to).
    pub fn forward_embedded(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Context<'_>,
        added: Option<&AddedCond>,
        embedded: &Tensor,
        scale: ControlScale,
    ) -> ControlResiduals {
        let emb = self
            .embeddings
            .forward(timestep, sample.size()[0], sample.kind(), added);
        let h = self.conv_in.forward(sample) + embedded;
        self.residuals(h, &emb, context, scale)
    }

    /// Whether this is a union model (its calls go through [`Self::forward_union`]).
    pub fn is_union(&self) -> bool {
        self.union.is_some()
    }

    /// Control types a union model knows (0 for other ControlNets).
    pub fn control_types(&self) -> i64 {
        self.union.as_ref().map_or(0, UnionFusion::types)
    }

    /// A union model's residuals for `conditions` (at least one), as diffusers'
    /// `ControlNetUnionModel.forward` computes them: with one condition its scale applies
    /// to the residuals; with several, each condition's scale applies inside the fusion
    /// and the residuals are not scaled again. `guess_mode` as in [`Self::forward`].
    pub fn forward_union(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        conditions: &[UnionCondition<'_>],
        guess_mode: bool,
    ) -> Option<ControlResiduals> {
        let embedded: Vec<Tensor> = conditions.iter().map(|c| self.embed(c.image)).collect();
        let conditions: Vec<EmbeddedCondition<'_>> = conditions
            .iter()
            .zip(&embedded)
            .map(|(c, embedded)| EmbeddedCondition {
                embedded,
                control_type: c.control_type,
                scale: c.scale,
            })
            .collect();
        let context = Context::text(context);
        self.forward_union_embedded(sample, timestep, &context, added, &conditions, guess_mode)
    }

    /// [`Self::forward_union`] with the conditions' images already through
    /// [`Self::embed`], and the prompts' tokens in a [`Context`].
    pub fn forward_union_embedded(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Context<'_>,
        added: Option<&AddedCond>,
        conditions: &[EmbeddedCondition<'_>],
        guess_mode: bool,
    ) -> Option<ControlResiduals> {
        let fusion = self.union.as_ref()?;
        let batch = sample.size()[0];
        let types: Vec<i64> = conditions.iter().map(|c| c.control_type).collect();
        let type_embedding = fusion.type_embedding(&types, batch, sample.kind());
        let emb = self.embeddings.forward_with(
            timestep,
            batch,
            sample.kind(),
            Some(type_embedding),
            added,
        );
        let h = self.conv_in.forward(sample);
        let single = conditions.len() == 1;
        let h = &h + fusion.fuse(&h, conditions, !single);
        let scale = ControlScale {
            scale: if single {
                conditions.first()?.scale
            } else {
                1.0
            },
            guess_mode,
        };
        Some(self.residuals(h, &emb, context, scale))
    }

    /// The encoder from the conditioned `h` on: the 1×1 convolutions of every skip state
    /// and of the mid block's output, scaled.
    fn residuals(
        &self,
        h: Tensor,
        emb: &Tensor,
        context: &Context<'_>,
        scale: ControlScale,
    ) -> ControlResiduals {
        // ControlNets attend to the prompts only (diffusers passes them no image prompts).
        let context = Context {
            text_mask: context.text_mask,
            ..Context::text(context.text)
        };
        let (h, states) = encode(&self.down_blocks, h, emb, &context, &[]);
        let h = self.mid_block.forward(&h, emb, &context);
        let down: Vec<Tensor> = states
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(state, conv)| conv.forward(state))
            .collect();
        let mid = self.controlnet_mid_block.forward(&h);
        self.scaled(down, mid, scale)
    }

    /// Scales the residuals as diffusers does (guess mode's logspace, then the pooling).
    fn scaled(&self, down: Vec<Tensor>, mid: Tensor, scale: ControlScale) -> ControlResiduals {
        let pooled = self.config.control.global_pool_conditions;
        let (down, mid) = if scale.guess_mode && !pooled {
            let n = down.len() as i64;
            let options = (Kind::Float, mid.device());
            let scales = Tensor::logspace(-1.0, 0.0, n + 1, 10.0, options) * scale.scale;
            let down = down
                .iter()
                .enumerate()
                .map(|(i, d)| d * scales.get(i as i64))
                .collect();
            (down, mid * scales.get(n))
        } else {
            let down = down.iter().map(|d| d * scale.scale).collect();
            (down, mid * scale.scale)
        };
        if !pooled {
            return ControlResiduals { down, mid };
        }
        let mean = |t: &Tensor| t.mean_dim([2i64, 3].as_slice(), true, t.kind());
        ControlResiduals {
            down: down.iter().map(mean).collect(),
            mid: mean(&mid),
        }
    }
}
