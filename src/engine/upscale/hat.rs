//! HAT (Hybrid Attention Transformer), as spandrel runs it (`HAT/__arch/HAT.py`, in
//! eval mode): SwinIR's body with a channel-attention convolution branch beside every
//! block's window attention (scaled by 0.01) and an overlapping cross-attention closing
//! every group (each window's queries over a larger window of keys unfolded around
//! it, zero-padded at the borders), then SwinIR's pixel-shuffle upsampler.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::channel_attention::ChannelAttention;
use crate::engine::upscale::layout::{Architecture, SwinUpsampler};
use crate::engine::upscale::swin::{
    attend, count_blocks, embed, gather_bias, pad_to_windows, partition, reverse, shift_for,
    table_heads, through_groups, unembed, Block, Windows, LAYER_NORM_EPS,
};
use crate::engine::upscale::swinir::{image_mean, SwinShape, Tail};
use crate::engine::weights::VarPath;

/// The convolution branch's weight beside the attention (`conv_scale`, not in the file).
const CONV_SCALE: f64 = 0.01;
/// spandrel's training image size (HAT files do not tell it).
const IMAGE_SIZE: i64 = 64;

/// The channel attention block (`CAB`): two 3×3 convolutions through a narrower width,
/// the result weighted per channel by a squeeze-and-excitation of its mean.
struct ConvBranch {
    narrow: Conv2d,
    widen: Conv2d,
    attention: ChannelAttention,
}

impl ConvBranch {
    fn load(vp: &VarPath, dim: i64, width: i64, squeezed: i64) -> Result<Self> {
        let attention = vp.pp(3).pp("attention");
        Ok(Self {
            narrow: Conv2d::load(&vp.pp(0), dim, width, 3, 1, 1)?,
            widen: Conv2d::load(&vp.pp(2), width, dim, 3, 1, 1)?,
            attention: ChannelAttention::load(&attention.pp(1), &attention.pp(3), dim, squeezed)?,
        })
    }

    /// On [B, C, H, W].
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.widen.forward(&self.narrow.forward(x).gelu("none"));
        self.attention.forward(y)
    }
}

/// `calculate_rpi_oca`: `index[i][j]` of a window's pixel `i` and its overlapping
/// window's pixel `j`, their offset's row and column shifted by `window - overlap + 1` as
/// one index into the bias table; HAT's shift leaves some negative, which PyTorch's
/// indexing counts from the table's end, so they wrap here too.
fn overlap_index(window: i64, overlap: i64) -> Vec<i64> {
    let side = window + overlap - 1;
    let start = window - overlap + 1;
    let mut index = Vec::with_capacity((window * window * overlap * overlap) as usize);
    for i in 0..window * window {
        for j in 0..overlap * overlap {
            let dy = j / overlap - i / window + start;
            let dx = j % overlap - i % window + start;
            index.push((dy * side + dx).rem_euclid(side * side));
        }
    }
    index
}

/// The overlapping cross-attention (`OCAB`) with its MLP.
struct OverlapAttention {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// The bias gathered from the table once: [heads, window², overlap²].
    bias: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    window: i64,
    overlap: i64,
}

impl OverlapAttention {
    fn load(vp: &VarPath, shape: &HatShape, heads: i64) -> Result<Self> {
        let (dim, window, overlap) = (shape.features, shape.window, shape.overlap_window);
        let side = window + overlap - 1;
        let table = vp.get("relative_position_bias_table", &[side * side, heads])?;
        let index = overlap_index(window, overlap);
        let bias = gather_bias(&table, &index, window * window, overlap * overlap);
        let mlp = vp.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("norm1"), dim, LAYER_NORM_EPS)?,
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, vp.pp("qkv").contains("bias"))?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            bias,
            norm2: LayerNorm::load(&vp.pp("norm2"), dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(&mlp.pp("fc1"), dim, shape.overlap_hidden, true)?,
            fc2: Linear::load(&mlp.pp("fc2"), shape.overlap_hidden, dim, true)?,
            heads,
            window,
            overlap,
        })
    }

    /// On [B, H·W, C] tokens of an `h`×`w` image.
    fn forward(&self, x: &Tensor, h: i64, w: i64) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[2]);
        let (window, overlap, heads) = (self.window, self.overlap, self.heads);
        let d = c / heads;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x).view([b, h, w, c]))
            .reshape([b, h, w, 3, c])
            .permute([3, 0, 4, 1, 2]);
        let q = partition(&qkv.get(0).permute([0, 2, 3, 1]), [window; 2]);
        let queries = q.size()[0];
        let q = q
            .reshape([queries, window * window, heads, d])
            .permute([0, 2, 1, 3]);
        let kv = Tensor::cat(&[qkv.get(1), qkv.get(2)], 1);
        let margin = (overlap - window) / 2;
        let unfolded = kv.im2col(
            [overlap, overlap],
            [1, 1],
            [margin, margin],
            [window, window],
        );
        let windows = unfolded.size()[2];
        let kv = unfolded
            .view([b, 2, c, overlap, overlap, windows])
            .permute([1, 0, 5, 3, 4, 2])
            .reshape([2, b * windows, overlap * overlap, heads, d])
            .permute([0, 1, 3, 2, 4]);
        let attended = attend(&q, &kv.get(0), &kv.get(1), &self.bias, None);
        let y = reverse(&attended.view([-1, window, window, c]), [window; 2], h, w);
        let x = self.proj.forward(&y.view([b, h * w, c])) + x;
        let hidden = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        self.fc2.forward(&hidden) + x
    }
}

/// A residual hybrid attention group (`RHAG`).
struct Group {
    blocks: Vec<(Block, ConvBranch)>,
    overlap: OverlapAttention,
    conv: Option<Conv2d>,
}

impl Group {
    fn load(vp: &VarPath, shape: &HatShape) -> Result<Self> {
        let blocks_path = vp.pp("residual_group").pp("blocks");
        let depth = count_blocks(&blocks_path);
        let overlap_path = vp.pp("residual_group").pp("overlap_attn");
        let heads = table_heads(&overlap_path);
        let dim = shape.features;
        let blocks = (0..depth)
            .map(|b| {
                let block = blocks_path.pp(b);
                let (window, hidden) = (shape.window, shape.mlp_hidden);
                Ok((
                    Block::load(&block, dim, heads, window, hidden, b % 2 == 1)?,
                    ConvBranch::load(
                        &block.pp("conv_block").pp("cab"),
                        dim,
                        shape.cab_width,
                        shape.squeeze_width,
                    )?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            overlap: OverlapAttention::load(&overlap_path, shape, heads)?,
            conv: match shape.identity_residual {
                true => None,
                false => Some(Conv2d::load(&vp.pp("conv"), dim, dim, 3, 1, 1)?),
            },
        })
    }

    fn forward(&self, x: &Tensor, windows: &Windows, between: &mut Between<'_>) -> Result<Tensor> {
        let (h, w) = (windows.height, windows.width);
        let y = in_turn(
            x.shallow_clone(),
            &self.blocks,
            between,
            |(block, branch), y| {
                let beside = |normed: &Tensor| {
                    let size = normed.size();
                    let convolved = branch.forward(&normed.permute([0, 3, 1, 2]));
                    let tokens = convolved
                        .permute([0, 2, 3, 1])
                        .reshape([size[0], h * w, size[3]]);
                    Some(tokens * CONV_SCALE)
                };
                block.forward_beside(y, windows, &beside)
            },
        )?;
        let y = self.overlap.forward(&y, h, w);
        Ok(match &self.conv {
            Some(conv) => embed(&conv.forward(&unembed(&y, h, w))) + x,
            None => y + x,
        })
    }
}

/// The hyperparameters the modules are built from.
#[derive(Clone, Copy)]
struct HatShape {
    features: i64,
    window: i64,
    overlap_window: i64,
    mlp_hidden: i64,
    overlap_hidden: i64,
    cab_width: i64,
    squeeze_width: i64,
    identity_residual: bool,
}

/// HAT.
pub struct Hat {
    first: Conv2d,
    embed_norm: Option<LayerNorm>,
    groups: Vec<Group>,
    norm: LayerNorm,
    after_body: Option<Conv2d>,
    tail: Tail,
    mean: Tensor,
    window: i64,
    shift: i64,
    scale: i64,
}

impl Hat {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Hat {
            channels,
            features,
            groups,
            window,
            overlap_window,
            mlp_hidden,
            cab_width,
            squeeze_width,
            upsample_features,
            scale,
            identity_residual,
            ..
        } = architecture
        else {
            unreachable!("a HAT architecture");
        };
        let overlap_mlp = vp
            .pp("layers.0.residual_group.overlap_attn.mlp.fc1")
            .shape("weight")
            .and_then(|s| s.first().copied())
            .unwrap_or(mlp_hidden);
        let shape = HatShape {
            features,
            window,
            overlap_window,
            mlp_hidden,
            overlap_hidden: overlap_mlp,
            cab_width,
            squeeze_width,
            identity_residual,
        };
        let tail = SwinShape {
            channels,
            features,
            window,
            mlp_hidden,
            upsampler: SwinUpsampler::PixelShuffle,
            upsample_features,
            scale,
            three_conv: false,
        };
        let embed_norm = vp.pp("patch_embed").pp("norm");
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            embed_norm: match embed_norm.contains("weight") {
                true => Some(LayerNorm::load(&embed_norm, features, LAYER_NORM_EPS)?),
                false => None,
            },
            groups: (0..groups)
                .map(|g| Group::load(&vp.pp("layers").pp(g), &shape))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body: match identity_residual {
                true => None,
                false => Some(Conv2d::load(
                    &vp.pp("conv_after_body"),
                    features,
                    features,
                    3,
                    1,
                    1,
                )?),
            },
            tail: Tail::load(vp, &tail)?,
            // HAT's files are RGB (the layout reads no other channel count).
            mean: image_mean(3, vp),
            window,
            shift: shift_for(IMAGE_SIZE, window),
            scale,
        })
    }

    /// The body on the first convolution's [B, C, H, W] output.
    fn features(&self, first: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let windows = Windows::of(first, self.window, self.shift);
        through_groups(
            embed(first),
            self.embed_norm.as_ref(),
            (&self.groups, between),
            |group, x, between| group.forward(x, &windows, between),
            &self.norm,
            &windows,
        )
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let input = pad_to_windows(&(image - &self.mean), self.window);
        let first = self.first.forward(&input);
        let features = self.features(&first, between)?;
        let body = match &self.after_body {
            Some(conv) => conv.forward(&features),
            None => features,
        } + &first;
        let output = self.tail.forward(&body, &input, self.scale) + &self.mean;
        Ok(output
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlap_index_is_hats() {
        // torch's `calculate_rpi_oca` for a 2-pixel window in a 4-pixel one, indexing
        // a 25-row table: its first and last query's rows.
        let index = overlap_index(2, 4);
        assert_eq!(index.len(), 64);
        let first = [19, 20, 21, 22, 24, 0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12];
        let last = [13, 14, 15, 16, 18, 19, 20, 21, 23, 24, 0, 1, 3, 4, 5, 6];
        assert_eq!(&index[..16], first);
        assert_eq!(&index[48..], last);
    }
}
