//! The image projections of IP-Adapters, in the layout the adapters are shared in
//! (tencent-ailab's key names under `image_proj.`): diffusers' `ImageProjection` (the
//! plain adapter: the image embedding to four tokens) and `IPAdapterPlusImageProjection`
//! (Plus: a perceiver resampler from the encoder's penultimate hidden states).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::{multi_head_attention, LayerNorm, Linear};
use crate::engine::weights::VarPath;

/// The width of a resampler head (diffusers derives the head count from it).
const RESAMPLER_HEAD_DIM: i64 = 64;

/// The shapes an adapter's projection has, read from its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionShape {
    /// `proj` [4 × cross, embed] and `norm` [cross].
    Plain {
        /// Width of the image embedding it reads (the encoder's projection).
        embed: i64,
        /// Width of the tokens (the UNet's cross-attention width).
        cross: i64,
    },
    /// `latents` [1, queries, hidden], `proj_in` [hidden, embed], `proj_out` [cross,
    /// hidden], and `layers` blocks of perceiver attention and feed-forward.
    Resampler {
        /// Width of the hidden states it reads (the encoder's width).
        embed: i64,
        /// Width of its latents.
        hidden: i64,
        /// Width of the tokens.
        cross: i64,
        /// Output tokens.
        queries: i64,
        /// Blocks.
        depth: i64,
        /// Width of the blocks' feed-forward.
        ff_inner: i64,
    },
}

impl ProjectionShape {
    /// How many tokens an image becomes.
    pub fn tokens(self) -> i64 {
        match self {
            ProjectionShape::Plain { .. } => 4,
            ProjectionShape::Resampler { queries, .. } => queries,
        }
    }

    /// The width of the tokens.
    pub fn cross(self) -> i64 {
        match self {
            ProjectionShape::Plain { cross, .. } | ProjectionShape::Resampler { cross, .. } => {
                cross
            }
        }
    }

    /// Whether it reads the encoder's penultimate hidden states (else its image embeds).
    pub fn reads_hidden_states(self) -> bool {
        matches!(self, ProjectionShape::Resampler { .. })
    }

    /// The width of what it reads from the encoder.
    pub fn embed(self) -> i64 {
        match self {
            ProjectionShape::Plain { embed, .. } | ProjectionShape::Resampler { embed, .. } => {
                embed
            }
        }
    }
}

/// One resampler block: perceiver attention of the latents over the image states and
/// themselves, then a feed-forward, each with a residual.
pub struct ResamplerBlock {
    norm_image: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: i64,
}

impl ResamplerBlock {
    fn load(vp: &VarPath, hidden: i64, ff_inner: i64) -> Result<Self> {
        let attn = vp.pp(0);
        let ff = vp.pp(1);
        Ok(Self {
            norm_image: LayerNorm::load(&attn.pp("norm1"), hidden, 1e-5)?,
            norm_latents: LayerNorm::load(&attn.pp("norm2"), hidden, 1e-5)?,
            to_q: Linear::load(&attn.pp("to_q"), hidden, hidden, false)?,
            to_kv: Linear::load(&attn.pp("to_kv"), hidden, 2 * hidden, false)?,
            to_out: Linear::load(&attn.pp("to_out"), hidden, hidden, false)?,
            ff_norm: LayerNorm::load(&ff.pp(0), hidden, 1e-5)?,
            ff_in: Linear::load(&ff.pp(1), hidden, ff_inner, false)?,
            ff_out: Linear::load(&ff.pp(3), ff_inner, hidden, false)?,
            heads: hidden / RESAMPLER_HEAD_DIM,
        })
    }

    fn forward(&self, image: &Tensor, latents: &Tensor) -> Tensor {
        let image_normed = self.norm_image.forward(image);
        let latents_normed = self.norm_latents.forward(latents);
        let context = Tensor::cat(&[&image_normed, &latents_normed], 1);
        let kv = self.to_kv.forward(&context).chunk(2, -1);
        let q = self.to_q.forward(&latents_normed);
        let attended = multi_head_attention(&q, &kv[0], &kv[1], self.heads, false);
        let latents = self.to_out.forward(&attended) + latents;
        let ff = self.ff_out.forward(
            &self
                .ff_in
                .forward(&self.ff_norm.forward(&latents))
                .gelu("none"),
        );
        ff + latents
    }
}

/// An adapter's image projection.
pub enum ImageProjection {
    /// The plain adapter's.
    Plain { proj: Linear, norm: LayerNorm },
    /// IP-Adapter Plus's resampler.
    Resampler {
        latents: Tensor,
        proj_in: Linear,
        blocks: Vec<ResamplerBlock>,
        proj_out: Linear,
        norm_out: LayerNorm,
    },
}

impl ImageProjection {
    /// Loads the projection of `shape` from `image_proj.*` at `vp`.
    pub fn load(vp: &VarPath, shape: ProjectionShape) -> Result<Self> {
        Ok(match shape {
            ProjectionShape::Plain { embed, cross } => ImageProjection::Plain {
                proj: Linear::load(&vp.pp("proj"), embed, 4 * cross, true)?,
                norm: LayerNorm::load(&vp.pp("norm"), cross, 1e-5)?,
            },
            ProjectionShape::Resampler {
                embed,
                hidden,
                cross,
                queries,
                depth,
                ff_inner,
            } => ImageProjection::Resampler {
                latents: vp.get("latents", &[1, queries, hidden])?,
                proj_in: Linear::load(&vp.pp("proj_in"), embed, hidden, true)?,
                blocks: (0..depth)
                    .map(|i| ResamplerBlock::load(&vp.pp("layers").pp(i), hidden, ff_inner))
                    .collect::<Result<Vec<_>>>()?,
                proj_out: Linear::load(&vp.pp("proj_out"), hidden, cross, true)?,
                norm_out: LayerNorm::load(&vp.pp("norm_out"), cross, 1e-5)?,
            },
        })
    }

    /// The tokens of [images, embed] image embeddings (plain) or [images, patches + 1,
    /// embed] hidden states (resampler): [images, tokens, cross].
    pub fn forward(&self, image: &Tensor) -> Tensor {
        match self {
            ImageProjection::Plain { proj, norm } => {
                let images = image.size()[0];
                norm.forward(&proj.forward(image).reshape([images, 4, -1]))
            }
            ImageProjection::Resampler {
                latents,
                proj_in,
                blocks,
                proj_out,
                norm_out,
            } => {
                let images = image.size()[0];
                let x = proj_in.forward(image);
                let mut latents = latents.repeat([images, 1, 1]);
                for block in blocks {
                    latents = block.forward(&x, &latents);
                }
                norm_out.forward(&proj_out.forward(&latents))
            }
        }
    }
}
