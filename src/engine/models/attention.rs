//! Attention as diffusers builds it: `Attention` (`models/attention_processor.py`),
//! `BasicTransformerBlock` and the GEGLU `FeedForward` (`models/attention.py`), and
//! `Transformer2DModel` (`models/transformers/transformer_2d.py`).

use std::rc::Rc;

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::freeu::FreeU;
use crate::engine::models::nn::{
    masked_attention, multi_head_attention, Conv2d, FusedLinear, GroupNorm, LayerNorm, Linear,
};
use crate::engine::models::region::RegionMask;
use crate::engine::profile;
use crate::engine::weights::VarPath;

/// How an attention layer projects its queries, keys and values.
enum Projections {
    /// `to_q`, `to_k` and `to_v` apart.
    Separate { q: Linear, k: Linear, v: Linear },
    /// Self-attention's three as one layer.
    FusedQkv(FusedLinear<3>),
    /// Cross-attention's `to_k` and `to_v` as one layer (they read the context), `to_q`
    /// apart.
    FusedKv { q: Linear, kv: FusedLinear<2> },
}

/// Multi-head attention with `to_q`, `to_k`, `to_v` and `to_out.0`.
pub struct Attention {
    projections: Projections,
    to_out: Linear,
    heads: i64,
}

impl Attention {
    /// Loads an attention layer of `heads` × `head_dim` over `query_dim` features, with
    /// keys and values from `context_dim` features. `qkv_bias` as the VAE's.
    pub fn load(
        vp: &VarPath,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            projections: Projections::Separate {
                q: Linear::load(&vp.pp("to_q"), query_dim, inner, qkv_bias)?,
                k: Linear::load(&vp.pp("to_k"), context_dim, inner, qkv_bias)?,
                v: Linear::load(&vp.pp("to_v"), context_dim, inner, qkv_bias)?,
            },
            to_out: Linear::load(&vp.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// Loads a transformer block's attention without biases on its projections: its
    /// self-attention when `context_dim` is `None`, else its cross-attention. Fused as the
    /// weights' layout asks; the self-attention is then always called without a context.
    fn load_in_block(
        vp: &VarPath,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        head_dim: i64,
    ) -> Result<Self> {
        if !vp.layout().fused_projections {
            let context_dim = context_dim.unwrap_or(query_dim);
            return Self::load(vp, query_dim, context_dim, heads, head_dim, false);
        }
        let inner = heads * head_dim;
        let projections = match context_dim {
            None => Projections::FusedQkv(FusedLinear::load(
                &[vp.pp("to_q"), vp.pp("to_k"), vp.pp("to_v")],
                query_dim,
                inner,
                false,
            )?),
            Some(context_dim) => Projections::FusedKv {
                q: Linear::load(&vp.pp("to_q"), query_dim, inner, false)?,
                kv: FusedLinear::load(&[vp.pp("to_k"), vp.pp("to_v")], context_dim, inner, false)?,
            },
        };
        Ok(Self {
            projections,
            to_out: Linear::load(&vp.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// Attends [batch, tokens, query_dim] to `context` (itself when `None`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        self.forward_with_images(x, (context, None), &[])
    }

    /// [`Self::forward`] with the context's tokens each image attends to (`mask`, where
    /// not all), also attending to image prompts' keys and values, each weighted by its
    /// scale and added before the output projection (diffusers'
    /// `IPAdapterAttnProcessor2_0`).
    pub fn forward_with_images(
        &self,
        x: &Tensor,
        (context, mask): (Option<&Tensor>, Option<&Tensor>),
        images: &[ImageKv],
    ) -> Tensor {
        let context = context.unwrap_or(x);
        let (q, k, v) = match &self.projections {
            Projections::Separate { q, k, v } => {
                (q.forward(x), k.forward(context), v.forward(context))
            }
            Projections::FusedQkv(qkv) => {
                let [q, k, v] = qkv.forward(x);
                (q, k, v)
            }
            Projections::FusedKv { q, kv } => {
                let [k, v] = kv.forward(context);
                (q.forward(x), k, v)
            }
        };
        let mut attended = match mask {
            Some(allowed) => masked_attention(&q, &k, &v, self.heads, allowed),
            None => multi_head_attention(&q, &k, &v, self.heads, false),
        };
        for image in images {
            let extra = multi_head_attention(&q, &image.key, &image.value, self.heads, false);
            let extra = match &image.region {
                Some(region) => extra * region.at(x.size()[1]),
                None => extra,
            };
            attended += extra * image.scale;
        }
        self.to_out.forward(&attended)
    }

    /// Self-attention over a batch of `parts` equal parts whose last part is perturbed:
    /// there each token attends to itself alone, so the attention is its value (diffusers'
    /// `PAGCFGIdentitySelfAttnProcessor2_0` and `PAGIdentitySelfAttnProcessor2_0`).
    pub fn forward_perturbed(&self, x: &Tensor, parts: i64) -> Tensor {
        let chunks = x.chunk(parts, 0);
        let Some((perturbed, original)) = chunks.split_last() else {
            return self.forward(x, None);
        };
        let mut out = Vec::with_capacity(2);
        if !original.is_empty() {
            out.push(self.forward(&Tensor::cat(original, 0), None));
        }
        out.push(self.to_out.forward(&self.values(perturbed)));
        Tensor::cat(&out, 0)
    }

    /// The values of the tokens `x` attends to.
    fn values(&self, x: &Tensor) -> Tensor {
        match &self.projections {
            Projections::Separate { v, .. } => v.forward(x),
            Projections::FusedQkv(qkv) => qkv.forward_part(2, x),
            Projections::FusedKv { kv, .. } => kv.forward_part(1, x),
        }
    }
}

/// One image prompt's keys and values for one cross-attention layer (an IP-Adapter's
/// `to_k_ip` and `to_v_ip` of its image tokens), for the whole guided batch.
pub struct ImageKv {
    /// [batch, image tokens, inner].
    pub key: Tensor,
    /// [batch, image tokens, inner].
    pub value: Tensor,
    /// The adapter's weight.
    pub scale: f64,
    /// Where the image acts, when its prompt has masks (diffusers' `ip_adapter_masks`).
    pub region: Option<Rc<RegionMask>>,
}

/// A cross-attention layer of a UNet: the attention (`Transformer2DModel`) it belongs to
/// and its inner width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossAttentionLayer {
    /// The attention's module path (`up_blocks.0.attentions.1`).
    pub attention: String,
    /// Its queries' inner width.
    pub width: i64,
}

/// The image prompts' keys and values of every cross-attention layer, by the layer's slot
/// (diffusers' attention-processor order: down blocks, up blocks, mid block).
pub struct ImageKeys {
    /// Per slot, one entry per image prompt.
    pub layers: Vec<Vec<ImageKv>>,
}

impl ImageKeys {
    /// These keys with every key and value batch mapped by `part` (a part of the batch).
    pub fn with_batches(&self, part: impl Fn(&Tensor) -> Tensor) -> ImageKeys {
        let entry = |kv: &ImageKv| ImageKv {
            key: part(&kv.key),
            value: part(&kv.value),
            scale: kv.scale,
            region: kv.region.clone(),
        };
        ImageKeys {
            layers: self
                .layers
                .iter()
                .map(|layer| layer.iter().map(entry).collect())
                .collect(),
        }
    }
}

/// What a UNet call is conditioned on beside its sample and time: the prompts' tokens
/// its cross-attention layers attend to, with image prompts their keys and values per
/// layer, and FreeU's factors for its up blocks.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// [batch, tokens, cross_attention_dim].
    pub text: &'a Tensor,
    /// Which of the tokens each image attends to ([batch, 1, 1, tokens], true where it
    /// attends), when not all.
    pub text_mask: Option<&'a Tensor>,
    /// Image prompts (IP-Adapters), when the request has any.
    pub images: Option<&'a ImageKeys>,
    /// FreeU, when the request asks for it.
    pub freeu: Option<FreeU>,
    /// Perturbed-attention guidance, when the request asks for it.
    pub perturbation: Option<Perturbation<'a>>,
}

/// Which self-attention layers perturb the last part of a UNet call's batch.
#[derive(Clone, Copy)]
pub struct Perturbation<'a> {
    /// By cross-attention slot: whether the self-attention of that transformer block is
    /// perturbed.
    pub slots: &'a [bool],
    /// The batch's equal parts; the last one is perturbed.
    pub parts: i64,
}

impl<'a> Context<'a> {
    /// The prompts' tokens alone.
    pub fn text(text: &'a Tensor) -> Self {
        Self {
            text,
            text_mask: None,
            images: None,
            freeu: None,
            perturbation: None,
        }
    }

    /// The batch's parts when the self-attention of the block in `slot` is perturbed.
    fn perturbed_parts(&self, slot: usize) -> Option<i64> {
        let perturbation = self.perturbation?;
        perturbation
            .slots
            .get(slot)
            .copied()
            .unwrap_or(false)
            .then_some(perturbation.parts)
    }

    /// The image prompts of the layer in `slot`.
    fn images_at(&self, slot: usize) -> &'a [ImageKv] {
        self.images
            .and_then(|keys| keys.layers.get(slot))
            .map_or(&[], Vec::as_slice)
    }
}

/// GEGLU feed-forward: `net.0.proj` to twice the inner width, gate, `net.2` back.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(&vp.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::load(&vp.pp("net").pp(2), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let projected = self.proj.forward(x);
        let halves = projected.chunk(2, -1);
        let mut gate = halves[1].gelu("none");
        gate *= &halves[0];
        self.out.forward(&gate)
    }
}

/// Self-attention, cross-attention and feed-forward, each with a pre-norm and residual.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    /// Its cross-attention's place in diffusers' processor order.
    slot: usize,
}

impl BasicTransformerBlock {
    fn load(
        vp: &VarPath,
        dim: i64,
        heads: i64,
        head_dim: i64,
        context_dim: i64,
        slot: usize,
    ) -> Result<Self> {
        Ok(Self {
            slot,
            norm1: LayerNorm::load(&vp.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load_in_block(&vp.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: LayerNorm::load(&vp.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load_in_block(
                &vp.pp("attn2"),
                dim,
                Some(context_dim),
                heads,
                head_dim,
            )?,
            norm3: LayerNorm::load(&vp.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vp.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Context) -> Tensor {
        let x = {
            let _stage = profile::span("self_attention");
            let normed = self.norm1.forward(x);
            let attended = match context.perturbed_parts(self.slot) {
                Some(parts) => self.attn1.forward_perturbed(&normed, parts),
                None => self.attn1.forward(&normed, None),
            };
            attended + x
        };
        let x = {
            let _stage = profile::span("cross_attention");
            let normed = self.norm2.forward(&x);
            let images = context.images_at(self.slot);
            let text = (Some(context.text), context.text_mask);
            self.attn2.forward_with_images(&normed, text, images) + &x
        };
        let _stage = profile::span("feed_forward");
        self.ff.forward(&self.norm3.forward(&x)) + &x
    }
}

/// Input and output projections of a [`Transformer2DModel`].
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// Shape parameters of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    /// Channels of the feature map (= heads × head_dim).
    pub channels: i64,
    /// Attention heads.
    pub heads: i64,
    /// Width of each head.
    pub head_dim: i64,
    /// Transformer blocks.
    pub layers: i64,
    /// Width of the text conditioning.
    pub context_dim: i64,
    /// Group norm groups.
    pub groups: i64,
    /// Linear (SDXL) rather than 1×1 convolution projections.
    pub use_linear_projection: bool,
    /// The cross-attention slot of its first block (the others follow).
    pub first_slot: usize,
}

/// A stack of transformer blocks applied to a feature map, with a residual.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Loads the model at `vp`.
    pub fn load(vp: &VarPath, c: Transformer2DConfig) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let projection = |name: &str, from: i64, to: i64| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::load(&vp.pp(name), from, to, true)?)
            } else {
                Projection::Conv(Conv2d::load(&vp.pp(name), from, to, 1, 1, 0)?)
            })
        };
        let blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::load(
                    &vp.pp("transformer_blocks").pp(i),
                    inner,
                    c.heads,
                    c.head_dim,
                    c.context_dim,
                    c.first_slot + i as usize,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vp.pp("norm"), c.groups, c.channels, 1e-6)?,
            proj_in: projection("proj_in", c.channels, inner)?,
            blocks,
            proj_out: projection("proj_out", inner, c.channels)?,
        })
    }

    /// Applies the blocks to an NCHW map conditioned on `context`.
    pub fn forward(&self, x: &Tensor, context: &Context) -> Tensor {
        let _stage = profile::span("transformer");
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        let normed = self.norm.forward(x);
        let to_tokens = |t: &Tensor| {
            let inner = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, inner])
        };
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)),
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)),
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context);
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => l
                .forward(&tokens)
                .reshape([b, h, w, c])
                .permute([0, 3, 1, 2]),
            Projection::Conv(conv) => {
                let inner = tokens.size()[2];
                conv.forward(&tokens.reshape([b, h, w, inner]).permute([0, 3, 1, 2]))
            }
        };
        out + x
    }
}
