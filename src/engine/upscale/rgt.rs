//! RGT (Recursive Generalization Transformer), as spandrel runs it (`RGT/__arch/rgt.py`,
//! in eval mode): DAT's frame (a first convolution, residual groups, SwinIR's
//! pixel-shuffle tail) around blocks that alternate two attentions, each followed by
//! the spatial-gate feed-forward network and a learned share of the block's input:
//! - local blocks attend within DAT's rectangle windows (some shifted), the values'
//!   depthwise convolution added;
//! - recursive-generalization blocks attend from every pixel to the image recursively
//!   reduced by 4 (twice at least), its values given a convolutional position encoding.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::{LayerNorm, Linear};
use crate::engine::upscale::layout::rgt::{heads_from_window_heads, UPSAMPLE_FEATURES};
use crate::engine::upscale::layout::{Architecture, SwinUpsampler};
use crate::engine::upscale::rwin::{
    shifts, width, Frame, GatedFeedForward, Geometry, WindowBlock, WindowGroup, WindowPair,
};
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{count_blocks, embed, unembed, LAYER_NORM_EPS};
use crate::engine::upscale::swinir::{ResidualConv, SwinShape};
use crate::engine::weights::VarPath;

/// What each recursion divides the sides by (`reduction1`'s stride).
const REDUCTION: i64 = 4;
/// The fewest recursions at inference (the reference's training count).
const MIN_RECURSIONS: i64 = 2;

/// The recursions of an `height`×`width` map: `max(⌊log₄(H / 16)⌋, ⌊log₄(W / 16)⌋)`, at
/// least 2, as the reference computes it; at most what keeps both sides a pixel or more
/// (beyond, the reference's reduction fails).
fn recursions(height: i64, width: i64) -> i64 {
    let log4 = |n: i64| ((n.max(1) as f64).ln() / (REDUCTION as f64).ln()) as i64;
    let wanted = log4(height / 16).max(log4(width / 16)).max(MIN_RECURSIONS);
    let mut possible = 0;
    while REDUCTION.pow(possible as u32 + 1) <= height.min(width) {
        possible += 1;
    }
    wanted.min(possible)
}

/// The local block's attention (`L_SA`): DAT's window pair, the values' depthwise
/// convolution added, a projection.
struct LocalAttention {
    qkv: Linear,
    proj: Linear,
    pair: WindowPair,
    values: SameConv,
}

impl LocalAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, split: [i64; 2], shifted: bool) -> Result<Self> {
        let qkv_bias = vp.pp("qkv").contains("bias");
        Ok(Self {
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            pair: WindowPair::load(&vp.pp("attns"), heads, split, shifted)?,
            values: SameConv::depthwise(&vp.pp("get_v"), dim, 3, true)?,
        })
    }

    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let (attended, values) = self.pair.project_and_attend(&self.qkv, x, geometry);
        self.proj
            .forward(&(attended + embed(&self.values.forward(&values))))
    }
}

/// The recursive-generalization block's attention (`RG_SA`).
struct RecursiveAttention {
    /// The depthwise 4×4 stride-4 reduction, applied once per recursion.
    reduction: (Tensor, Tensor),
    depthwise: SameConv,
    narrow: SameConv,
    norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    /// The values' convolutional position encoding (`cpe`).
    position: SameConv,
    proj: Linear,
    heads: i64,
    scale: f64,
}

impl RecursiveAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, reduced: i64) -> Result<Self> {
        let qkv_bias = vp.pp("q").contains("bias");
        let reduction = vp.pp("reduction1");
        Ok(Self {
            reduction: (
                reduction.get("weight", &[dim, 1, REDUCTION, REDUCTION])?,
                reduction.get("bias", &[dim])?,
            ),
            depthwise: SameConv::depthwise(&vp.pp("dwconv"), dim, 3, true)?,
            narrow: SameConv::load(&vp.pp("conv"), [dim, reduced], 1, 1, true)?,
            norm: LayerNorm::load(&vp.pp("norm_act").pp(0), reduced, LAYER_NORM_EPS)?,
            q: Linear::load(&vp.pp("q"), dim, reduced, qkv_bias)?,
            k: Linear::load(&vp.pp("k"), reduced, reduced, qkv_bias)?,
            v: Linear::load(&vp.pp("v"), reduced, dim, qkv_bias)?,
            position: SameConv::depthwise(&vp.pp("cpe"), dim, 3, true)?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            heads,
            // `(head_dim * c_ratio) ** -0.5`, the ratio as the reference reads it.
            scale: ((dim / heads) as f64 * (reduced as f64 / dim as f64)).powf(-0.5),
        })
    }

    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let (h, w) = (geometry.height, geometry.width);
        let (weight, bias) = &self.reduction;
        let reduced = (0..recursions(h, w)).fold(unembed(x, h, w), |t, _| {
            t.conv2d(weight, Some(bias), [REDUCTION; 2], [0, 0], [1, 1], c)
        });
        let (rh, rw) = (reduced.size()[2], reduced.size()[3]);
        let context = embed(&self.narrow.forward(&self.depthwise.forward(&reduced)));
        let context = self.norm.forward(&context).gelu("none");
        let heads = self.heads;
        let split = |t: Tensor| {
            t.view([b, -1, heads, t.size()[2] / heads])
                .permute([0, 2, 1, 3])
        };
        let q = split(self.q.forward(x));
        let k = split(self.k.forward(&context));
        let v = split(self.v.forward(&context));
        let values_image = v
            .transpose(1, 2)
            .reshape([b, -1, c])
            .transpose(1, 2)
            .view([b, c, rh, rw]);
        let encoded = self
            .position
            .forward(&values_image)
            .view([b, heads, c / heads, -1])
            .transpose(-1, -2);
        let v = v + encoded;
        let scores = (q.matmul(&k.transpose(-2, -1)) * self.scale).softmax(-1, None);
        let attended = scores.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        self.proj.forward(&attended)
    }
}

enum Attention {
    Local(LocalAttention),
    Recursive(RecursiveAttention),
}

/// One block: attention and feed-forward each added, then the block's input times
/// `gamma`.
pub struct Block {
    norm1: LayerNorm,
    attention: Attention,
    norm2: LayerNorm,
    mlp: GatedFeedForward,
    gamma: Tensor,
}

impl WindowBlock for Block {
    fn shifted(&self) -> bool {
        matches!(&self.attention, Attention::Local(a) if a.pair.shifted())
    }

    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let normed = self.norm1.forward(x);
        let attended = match &self.attention {
            Attention::Local(a) => a.forward(&normed, geometry),
            Attention::Recursive(a) => a.forward(&normed, geometry),
        };
        let y = x + attended;
        let y = &y + self.mlp.forward(&self.norm2.forward(&y), geometry);
        y + x * &self.gamma
    }
}

/// The hyperparameters the blocks are built from.
struct RgtShape {
    features: i64,
    split: [i64; 2],
    mlp_hidden: i64,
    reduced: i64,
    three_conv: bool,
}

/// Group `index` under `vp`: even blocks local, odd ones recursive; windows shifted
/// where [`shifts`] says.
fn load_group(vp: &VarPath, index: i64, shape: &RgtShape) -> Result<WindowGroup<Block>> {
    let blocks_path = vp.pp("blocks");
    let depth = count_blocks(&blocks_path) as i64;
    let heads = group_heads(&blocks_path, shape.features);
    let dim = shape.features;
    let blocks = (0..depth)
        .map(|b| {
            let block = blocks_path.pp(b);
            let attn = block.pp("attn");
            let shifted = shifts(index, b);
            let attention = match b % 2 {
                0 => Attention::Local(LocalAttention::load(
                    &attn,
                    dim,
                    heads,
                    shape.split,
                    shifted,
                )?),
                _ => Attention::Recursive(RecursiveAttention::load(
                    &attn,
                    dim,
                    heads,
                    shape.reduced,
                )?),
            };
            Ok(Block {
                norm1: LayerNorm::load(&block.pp("norm1"), dim, LAYER_NORM_EPS)?,
                attention,
                norm2: LayerNorm::load(&block.pp("norm2"), dim, LAYER_NORM_EPS)?,
                mlp: GatedFeedForward::load(&block.pp("mlp"), dim, shape.mlp_hidden)?,
                gamma: block.get("gamma", &[dim])?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(WindowGroup {
        blocks,
        conv: ResidualConv::load(&vp.pp("conv"), dim, shape.three_conv)?,
    })
}

fn group_heads(blocks: &VarPath, features: i64) -> i64 {
    let window_heads = width(&blocks.pp(0).pp("attn"), "attns.0.pos.pos3.2.weight");
    heads_from_window_heads(window_heads, features)
}

/// RGT.
pub type Rgt = Frame<Block>;

impl Rgt {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Rgt {
            channels,
            features,
            groups,
            split,
            mlp_hidden,
            reduced,
            scale,
            three_conv,
            ..
        } = architecture
        else {
            unreachable!("an RGT architecture");
        };
        let shape = RgtShape {
            features,
            split,
            mlp_hidden,
            reduced,
            three_conv,
        };
        let tail_shape = SwinShape {
            channels,
            features,
            window: split[0],
            mlp_hidden,
            upsampler: SwinUpsampler::PixelShuffle,
            upsample_features: UPSAMPLE_FEATURES,
            scale,
            three_conv,
        };
        let groups = (0..groups)
            .map(|g| load_group(&vp.pp("layers").pp(g), g, &shape))
            .collect::<Result<_>>()?;
        Frame::new(vp, &tail_shape, split, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's count (`max(int(log(H // 16, 4)), int(log(W // 16, 4)))`, at least
    /// 2) wherever its reduction keeps a pixel.
    #[test]
    fn recursions_follow_the_reference() {
        assert_eq!(recursions(16, 16), 2);
        assert_eq!(recursions(255, 255), 2);
        assert_eq!(recursions(256, 16), 2);
        assert_eq!(recursions(1024, 1024), 3);
        assert_eq!(recursions(1023, 64), 2);
        assert_eq!(recursions(4096, 4096), 4);
        // 16 rows reduce by 4 twice only.
        assert_eq!(recursions(16, 4096), 2);
    }
}
