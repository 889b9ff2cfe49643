//! The pre-norm ViT layer of transformers' ViT-style backbones under their published
//! tensor names (DPT's ViT, BEiT): self-attention, then a GELU MLP, each added back
//! after a layer scale where the file stores one (BEiT's `lambda_1`, `lambda_2`), the
//! attention scores with a bias where the caller has one (BEiT's relative positions).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::{biased_attention, multi_head_attention, LayerNorm, Linear};
use crate::engine::weights::VarPath;

/// A layer's sizes.
#[derive(Debug, Clone, Copy)]
pub struct VitSizes {
    pub hidden: i64,
    pub intermediate: i64,
    pub layer_norm_eps: f64,
    /// Whether the key projection has a bias (BEiT's has none).
    pub key_bias: bool,
}

/// One pre-norm layer.
pub struct VitLayer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    norm2: LayerNorm,
    up: Linear,
    down: Linear,
    /// Layer scales of the attention and MLP branches.
    scales: Option<(Tensor, Tensor)>,
}

impl VitLayer {
    /// Loads the layer under `vp` (`encoder.layer.{i}`).
    pub fn load(vp: &VarPath, s: VitSizes) -> Result<Self> {
        let (d, i, eps) = (s.hidden, s.intermediate, s.layer_norm_eps);
        let attention = vp.pp("attention.attention");
        let scales = if vp.contains("lambda_1") {
            Some((vp.get("lambda_1", &[d])?, vp.get("lambda_2", &[d])?))
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("layernorm_before"), d, eps)?,
            query: Linear::load(&attention.pp("query"), d, d, true)?,
            key: Linear::load(&attention.pp("key"), d, d, s.key_bias)?,
            value: Linear::load(&attention.pp("value"), d, d, true)?,
            out: Linear::load(&vp.pp("attention.output.dense"), d, d, true)?,
            norm2: LayerNorm::load(&vp.pp("layernorm_after"), d, eps)?,
            up: Linear::load(&vp.pp("intermediate.dense"), d, i, true)?,
            down: Linear::load(&vp.pp("output.dense"), i, d, true)?,
            scales,
        })
    }

    /// The layer on tokens [N, T, D], the scores biased by `bias` ([1, heads, T, T]).
    pub fn forward(&self, x: &Tensor, heads: i64, bias: Option<&Tensor>) -> Tensor {
        let h = self.norm1.forward(x);
        let (q, k, v) = (
            self.query.forward(&h),
            self.key.forward(&h),
            self.value.forward(&h),
        );
        let attended = match bias {
            Some(bias) => biased_attention(&q, &k, &v, heads, bias),
            None => multi_head_attention(&q, &k, &v, heads, false),
        };
        let attended = self.out.forward(&attended);
        let x = match &self.scales {
            Some((scale, _)) => attended * scale + x,
            None => attended + x,
        };
        let h = self.up.forward(&self.norm2.forward(&x)).gelu("none");
        let h = self.down.forward(&h);
        match &self.scales {
            Some((_, scale)) => h * scale + x,
            None => h + x,
        }
    }
}
