//! CLIP text encoders: `CLIPTextModel` and `CLIPTextModelWithProjection` from transformers
//! (`models/clip/modeling_clip.py`), keys as transformers saves them.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::engine::config_check::{read_config, CheckedConfig, ConfigCheck};
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::{
    collect_layers, masked_attention, multi_head_attention, Embedding, LayerNorm, LayerTable,
    Linear,
};
use crate::engine::weights::{VarPath, Weights};

/// The activation of the MLP blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, as OpenAI's CLIP (SDXL's first encoder).
    QuickGelu,
    /// The exact (erf) GELU, as OpenCLIP's ViT-bigG (SDXL's second encoder).
    Gelu,
}

/// Mirrors a transformers `CLIPTextConfig` (`text_encoder*/config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    /// Token table size.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Width of the transformer.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of transformer layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Sequence length of the position table.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    /// MLP activation.
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Width of the pooled projection (with-projection models only).
    #[serde(default)]
    pub projection_dim: Option<i64>,
    /// The end-of-text token whose position is pooled (2 means the legacy argmax rule).
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

impl CheckedConfig for ClipTextConfig {
    fn check(&self, check: &mut ConfigCheck) {
        check.positive("vocab_size", self.vocab_size);
        self.layer_shape()
            .check_widths(self.num_hidden_layers, check);
        check.positive("max_position_embeddings", self.max_position_embeddings);
        check.positive_number("layer_norm_eps", self.layer_norm_eps);
        if let Some(width) = self.projection_dim {
            check.positive("projection_dim", width);
        }
        if !(0..self.vocab_size.max(0)).contains(&self.eos_token_id) {
            check.problem(
                "eos_token_id",
                format_args!("is {}, outside the vocabulary", self.eos_token_id),
            );
        }
    }
}

impl ClipTextConfig {
    /// stabilityai/stable-diffusion-xl-base-1.0's `text_encoder/config.json` (OpenAI's
    /// CLIP ViT-L/14 text model).
    pub fn sdxl_text_encoder() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
            eos_token_id: 2,
        }
    }

    /// stabilityai/stable-diffusion-xl-base-1.0's `text_encoder_2/config.json` (OpenCLIP's
    /// ViT-bigG/14 text model with its projection).
    pub fn sdxl_text_encoder_2() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
            eos_token_id: 2,
        }
    }
}

fn default_vocab_size() -> i64 {
    49408
}
fn default_max_positions() -> i64 {
    77
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

/// The shape of a CLIP transformer layer (text and vision models share it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerShape {
    /// Width of the transformer.
    pub hidden: i64,
    /// Width of the MLP.
    pub intermediate: i64,
    /// Attention heads.
    pub heads: i64,
    /// Layer norm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub activation: Activation,
}

/// The self-attention mask of a layer.
#[derive(Clone, Copy)]
enum Mask<'a> {
    /// Causal (text) or none (vision).
    Causal(bool),
    /// [batch, 1, tokens, tokens], true where a query may attend a key.
    Explicit(&'a Tensor),
}

/// transformers' `CLIPEncoderLayer`: pre-norm self-attention and MLP, each with a residual.
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    activation: Activation,
}

impl EncoderLayer {
    /// Loads `encoder.layers.<i>` at `vp`.
    pub(crate) fn load(vp: &VarPath, shape: LayerShape) -> Result<Self> {
        let h = shape.hidden;
        let attn = vp.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(&vp.pp("layer_norm1"), h, shape.eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(&vp.pp("layer_norm2"), h, shape.eps)?,
            fc1: Linear::load(&vp.pp("mlp").pp("fc1"), h, shape.intermediate, true)?,
            fc2: Linear::load(&vp.pp("mlp").pp("fc2"), shape.intermediate, h, true)?,
            heads: shape.heads,
            activation: shape.activation,
        })
    }

    /// The layer on [batch, tokens, hidden]; `causal` masks later tokens (text models).
    pub(crate) fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        self.forward_masked(x, Mask::Causal(causal))
    }

    /// The layer with `mask` on its self-attention.
    fn forward_masked(&self, x: &Tensor, mask: Mask<'_>) -> Tensor {
        let h = self.layer_norm1.forward(x);
        let (q, k, v) = (
            self.q_proj.forward(&h),
            self.k_proj.forward(&h),
            self.v_proj.forward(&h),
        );
        let attn = match mask {
            Mask::Causal(causal) => multi_head_attention(&q, &k, &v, self.heads, causal),
            Mask::Explicit(allowed) => masked_attention(&q, &k, &v, self.heads, allowed),
        };
        let x = x + self.out_proj.forward(&attn);
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        let h = match self.activation {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
        };
        x + self.fc2.forward(&h)
    }
}

impl LayerShape {
    /// Checks the widths, heads and `layers` of a CLIP config under transformers' keys.
    pub(crate) fn check_widths(&self, layers: i64, check: &mut ConfigCheck) {
        check.positive("hidden_size", self.hidden);
        check.positive("intermediate_size", self.intermediate);
        check.positive("num_hidden_layers", layers);
        check.positive("num_attention_heads", self.heads);
        check.divisible(
            "hidden_size",
            self.hidden,
            "num_attention_heads",
            self.heads,
        );
    }
}

impl ClipTextConfig {
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

/// What a text encoder returns for a batch of token ids.
pub struct TextEncoderOutput {
    /// `hidden_states[-(skip + 2)]`: the output of the layer `skip + 1` before the last
    /// (SDXL conditions on the penultimate layer, `skip = 0`).
    pub hidden: Tensor,
    /// The final-layer-normed state at the end-of-text token, projected when the model has
    /// a projection ([batch, projection_dim]); `None` for models without one.
    pub pooled: Option<Tensor>,
}

/// Token vectors past the model's own table (textual inversion): the row of token id
/// `first_id + i` is `rows[i]`.
pub struct AddedRows {
    /// The id of the first added token (the tokenizer's; ids below it are the model's).
    pub first_id: i64,
    /// [added tokens, hidden_size], on the model's device, in its kind.
    pub rows: Tensor,
}

/// A CLIP text transformer, with or without the pooled text projection.
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    /// Its linear layers, for LoRA adapters, keyed without `text_model.`.
    adaptable: LayerTable,
}

impl ClipTextModel {
    /// Loads a transformers text encoder folder (`config.json` + `model.safetensors`).
    pub fn load_dir(dir: &Path, device: tch::Device, kind: Kind) -> Result<Self> {
        let config: ClipTextConfig = read_config(&dir.join("config.json"))?;
        let weights = Weights::open_component(dir, "model", device, kind)?;
        let with_projection = weights.contains("text_projection.weight");
        // transformers 4 saves `text_model.*`; transformers 5 saves CLIPTextModel unprefixed.
        let root = weights.root();
        let model = if weights.contains("text_model.embeddings.token_embedding.weight") {
            Self::load_transformer(&root.pp("text_model"), &root, config, with_projection)?
        } else {
            Self::load_transformer(&root, &root, config, with_projection)?
        };
        weights.check_all_used(|k| k.ends_with("position_ids"))?;
        Ok(model)
    }

    /// Loads from a key space holding `text_model.*`, and `text_projection.weight` when
    /// `with_projection` (CLIPTextModelWithProjection).
    pub fn load(vp: &VarPath, config: ClipTextConfig, with_projection: bool) -> Result<Self> {
        Self::load_transformer(&vp.pp("text_model"), vp, config, with_projection)
    }

    /// Loads the transformer from `tm` and the projection from `vp.text_projection`.
    fn load_transformer(
        tm: &VarPath,
        vp: &VarPath,
        config: ClipTextConfig,
        with_projection: bool,
    ) -> Result<Self> {
        let (mut model, layers) = collect_layers(|| Self::build(tm, vp, config, with_projection))?;
        // transformers 4 names the modules `text_model.encoder...`, transformers 5
        // `encoder...`: adapters name them either way.
        model.adaptable = layers.without_prefix("text_model.");
        Ok(model)
    }

    /// The linear layers, by module key (`encoder.layers.0.self_attn.q_proj`).
    pub fn adaptable_layers(&self) -> &LayerTable {
        &self.adaptable
    }

    fn build(
        tm: &VarPath,
        vp: &VarPath,
        config: ClipTextConfig,
        with_projection: bool,
    ) -> Result<Self> {
        let emb = tm.pp("embeddings");
        let h = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&tm.pp("encoder").pp("layers").pp(i), config.layer_shape()))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if with_projection {
            let dim = config.projection_dim.unwrap_or(h);
            Some(Linear::load(&vp.pp("text_projection"), h, dim, false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: Embedding::load(&emb.pp("token_embedding"), config.vocab_size, h)?,
            position_embedding: Embedding::load(
                &emb.pp("position_embedding"),
                config.max_position_embeddings,
                h,
            )?,
            layers,
            final_layer_norm: LayerNorm::load(
                &tm.pp("final_layer_norm"),
                h,
                config.layer_norm_eps,
            )?,
            text_projection,
            config,
            adaptable: LayerTable::default(),
        })
    }

    /// `vectors` [n, hidden_size] as the rows of the ids from `first_id` on, on the
    /// model's device and in its kind.
    pub fn added_rows(&self, first_id: i64, vectors: &Tensor) -> AddedRows {
        let table = self.token_embedding.weight();
        AddedRows {
            first_id,
            rows: vectors.to_device(table.device()).to_kind(table.kind()),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of the pooled output, when the model has a projection.
    pub fn projection_dim(&self) -> Option<i64> {
        self.text_projection.as_ref().map(|_| {
            self.config
                .projection_dim
                .unwrap_or(self.config.hidden_size)
        })
    }

    /// Encodes [batch, seq] token ids. `skip` counts layers skipped from the penultimate
    /// one (diffusers' `clip_skip`, 0 for none).
    pub fn forward(&self, ids: &Tensor, skip: i64) -> Result<TextEncoderOutput> {
        self.forward_with(ids, skip, None)
    }

    /// [`Self::forward`] with `added` token vectors for the ids past the model's table.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        skip: i64,
        added: Option<&AddedRows>,
    ) -> Result<TextEncoderOutput> {
        self.forward_pooled_at(ids, skip, added, None)
    }

    /// [`Self::forward_with`] with the pooled state taken at token index `pool_at` of
    /// every sequence when given (A1111 pools at the end-of-text token it placed, where a
    /// legacy config would take the highest id, an added token's), else where
    /// transformers takes it.
    pub fn forward_pooled_at(
        &self,
        ids: &Tensor,
        skip: i64,
        added: Option<&AddedRows>,
        pool_at: Option<i64>,
    ) -> Result<TextEncoderOutput> {
        let n = self.config.num_hidden_layers;
        if skip < 0 || skip + 2 > n + 1 {
            return Err(EngineError::InvalidRequest(format!(
                "`clip_skip` must be between 0 and {}, got {skip}",
                n - 1
            )));
        }
        let seq = ids.size()[1];
        let positions = Tensor::arange(seq, (Kind::Int64, ids.device())).unsqueeze(0);
        let mut x = self.embed_tokens(ids, added) + self.position_embedding.forward(&positions);
        // hidden_states[i] is the input of layer i; hidden_states[n] the last output.
        let wanted = n + 1 - (skip + 2);
        let mut hidden = if wanted == 0 {
            Some(x.shallow_clone())
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, true);
            if i as i64 + 1 == wanted {
                hidden = Some(x.shallow_clone());
            }
        }
        let hidden = hidden.unwrap_or_else(|| x.shallow_clone());
        let pooled = match &self.text_projection {
            None => None,
            Some(proj) => {
                let last = self.final_layer_norm.forward(&x);
                let eos = match pool_at {
                    Some(at) => Tensor::full([ids.size()[0]], at, (Kind::Int64, ids.device())),
                    None => self.eos_positions(ids),
                };
                let batch = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device()));
                let pooled = last.index(&[Some(batch), Some(eos)]);
                Some(proj.forward(&pooled))
            }
        };
        Ok(TextEncoderOutput { hidden, pooled })
    }

    /// The token vectors of `ids`: the model's table, and `added`'s rows from its first id
    /// on (as a table resized and filled by diffusers' `load_textual_inversion` gives them).
    fn embed_tokens(&self, ids: &Tensor, added: Option<&AddedRows>) -> Tensor {
        let Some(added) = added else {
            return self.token_embedding.forward(ids);
        };
        let is_added = ids.ge(added.first_id);
        let own = self
            .token_embedding
            .forward(&ids.clamp_max(added.first_id - 1));
        let last = added.rows.size()[0] - 1;
        let offsets = (ids - added.first_id).clamp(0, last);
        let extra = added
            .rows
            .index_select(0, &offsets.flatten(0, -1))
            .view_as(&own);
        extra.where_self(&is_added.unsqueeze(-1), &own)
    }

    /// `hidden_states[-2]` (the penultimate layer's output, SDXL's conditioning) of
    /// [batch, seq] `ids` with the attention mask transformers builds from `keep`
    /// ([batch, seq], false for tokens no other token may attend): causal, and masked
    /// keys excluded; `added` token vectors for the ids past the model's table.
    pub fn penultimate_masked(
        &self,
        ids: &Tensor,
        keep: &Tensor,
        added: Option<&AddedRows>,
    ) -> Tensor {
        let seq = ids.size()[1];
        let device = ids.device();
        let positions = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0);
        let causal = Tensor::ones([seq, seq], (Kind::Bool, device)).tril(0);
        let allowed = causal
            .unsqueeze(0)
            .logical_and(&keep.unsqueeze(1))
            .unsqueeze(1);
        let mut x = self.embed_tokens(ids, added) + self.position_embedding.forward(&positions);
        let last = self.layers.len().saturating_sub(1);
        for layer in &self.layers[..last] {
            x = layer.forward_masked(&x, Mask::Explicit(&allowed));
        }
        x
    }

    /// The last hidden state after the final layer norm (for component tests).
    pub fn last_hidden_state(&self, ids: &Tensor) -> Tensor {
        let seq = ids.size()[1];
        let positions = Tensor::arange(seq, (Kind::Int64, ids.device())).unsqueeze(0);
        let mut x = self.token_embedding.forward(ids) + self.position_embedding.forward(&positions);
        for layer in &self.layers {
            x = layer.forward(&x, true);
        }
        self.final_layer_norm.forward(&x)
    }

    /// Index of the pooled token per sequence, as transformers chooses it.
    fn eos_positions(&self, ids: &Tensor) -> Tensor {
        if self.config.eos_token_id == 2 {
            // Legacy configs: the highest id is the end-of-text token.
            ids.argmax(-1, false)
        } else {
            // The first end-of-text token (padding may repeat it).
            ids.eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        }
    }
}
