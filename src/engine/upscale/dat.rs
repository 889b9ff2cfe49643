//! DAT (Dual Aggregation Transformer), as spandrel runs it (`DAT/__arch/DAT.py`, in eval
//! mode): a first convolution, then residual groups whose blocks alternate two
//! attentions, each beside a depthwise convolution branch that the adaptive interaction
//! module mixes in, and each followed by the spatial-gate feed-forward network:
//! - spatial blocks attend within windows, half the channels in `[rows, columns]`
//!   windows and half in the transposed ones, with a position bias drawn by a small MLP
//!   from the offsets; the q/k/v are zero-padded to whole windows after their projection,
//!   and some blocks shift their windows by half;
//! - channel blocks attend across channels over the whole image.
//!
//! Then SwinIR's pixel-shuffle or direct upsampler.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::{LayerNorm, Linear};
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::rwin::{
    shifts, width, Frame, GatedFeedForward, Geometry, WindowBlock, WindowGroup, WindowPair,
};
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{count_blocks, embed, unembed, LAYER_NORM_EPS};
use crate::engine::upscale::swinir::{ResidualConv, SwinShape};
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// The depthwise convolution branch beside an attention and the adaptive interaction
/// module's two maps (before their sigmoid).
struct Interaction {
    depthwise: SameConv,
    channel: [SameConv; 2],
    spatial: [SameConv; 2],
}

impl Interaction {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        let squeezed = width(vp, "channel_interaction.1.weight");
        let thin = width(vp, "spatial_interaction.0.weight");
        let (channel, spatial) = (vp.pp("channel_interaction"), vp.pp("spatial_interaction"));
        Ok(Self {
            depthwise: SameConv::folded(
                &vp.pp("dwconv.0"),
                [dim, dim],
                3,
                dim,
                true,
                &vp.pp("dwconv.1"),
            )?,
            channel: [
                SameConv::folded(&channel.pp(1), [dim, squeezed], 1, 1, true, &channel.pp(2))?,
                SameConv::load(&channel.pp(4), [squeezed, dim], 1, 1, true)?,
            ],
            spatial: [
                SameConv::folded(&spatial.pp(0), [dim, thin], 1, 1, true, &spatial.pp(1))?,
                SameConv::load(&spatial.pp(3), [thin, 1], 1, 1, true)?,
            ],
        })
    }

    /// The convolution branch on [B, C, H, W].
    fn convolve(&self, x: &Tensor) -> Tensor {
        self.depthwise.forward(x).gelu("none")
    }

    /// [B, C, 1, 1] channel weights from the mean of [B, C, H, W].
    fn channel_map(&self, x: &Tensor) -> Tensor {
        let mean = x.mean_dim([2i64, 3].as_slice(), true, None);
        self.channel[1].forward(&self.channel[0].forward(&mean).gelu("none"))
    }

    /// [B, 1, H, W] pixel weights of [B, C, H, W].
    fn spatial_map(&self, x: &Tensor) -> Tensor {
        self.spatial[1].forward(&self.spatial[0].forward(x).gelu("none"))
    }
}

/// The spatial block's attention (`Adaptive_Spatial_Attention`).
struct SpatialAttention {
    qkv: Linear,
    proj: Linear,
    pair: WindowPair,
    interaction: Interaction,
}

impl SpatialAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, split: [i64; 2], shifted: bool) -> Result<Self> {
        let qkv_bias = vp.pp("qkv").contains("bias");
        Ok(Self {
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            pair: WindowPair::load(&vp.pp("attns"), heads, split, shifted)?,
            interaction: Interaction::load(vp, dim)?,
        })
    }

    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let (b, c) = (x.size()[0], x.size()[2]);
        let (h, w) = (geometry.height, geometry.width);
        let (attended, values) = self.pair.project_and_attend(&self.qkv, x, geometry);
        let convolved = self.interaction.convolve(&values);
        let channel = self.interaction.channel_map(&convolved).view([b, 1, c]);
        let spatial = self.interaction.spatial_map(&unembed(&attended, h, w));
        let mixed = attended * channel.sigmoid() + embed(&(convolved * spatial.sigmoid()));
        self.proj.forward(&mixed)
    }
}

/// The channel block's attention (`Adaptive_Channel_Attention`): each head's channels
/// attend to each other over the whole image, their rows L2-normalised, the scores
/// times a learned temperature.
struct ChannelAttention {
    qkv: Linear,
    proj: Linear,
    /// [heads, 1, 1].
    temperature: Tensor,
    heads: i64,
    interaction: Interaction,
}

impl ChannelAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64) -> Result<Self> {
        let qkv_bias = vp.pp("qkv").contains("bias");
        Ok(Self {
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            temperature: vp.get("temperature", &[heads, 1, 1])?,
            heads,
            interaction: Interaction::load(vp, dim)?,
        })
    }

    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let (h, w) = (geometry.height, geometry.width);
        let qkv = self
            .qkv
            .forward(x)
            .view([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 4, 1]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scores = unit_norm(&q).matmul(&unit_norm(&k).transpose(-2, -1)) * &self.temperature;
        let attended = scores
            .softmax(-1, None)
            .matmul(&v)
            .permute([0, 3, 1, 2])
            .reshape([b, n, c]);
        let convolved = self.interaction.convolve(&v.reshape([b, c, h, w]));
        let channel = self.interaction.channel_map(&unembed(&attended, h, w));
        let spatial = embed(&self.interaction.spatial_map(&convolved));
        let mixed = attended * spatial.sigmoid() + embed(&(convolved * channel.sigmoid()));
        self.proj.forward(&mixed)
    }
}

enum Attention {
    Spatial(SpatialAttention),
    Channel(ChannelAttention),
}

/// One dual aggregation transformer block (`DATB`).
pub struct Block {
    norm1: LayerNorm,
    attention: Attention,
    norm2: LayerNorm,
    ffn: GatedFeedForward,
}

impl WindowBlock for Block {
    fn shifted(&self) -> bool {
        matches!(&self.attention, Attention::Spatial(a) if a.pair.shifted())
    }

    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let normed = self.norm1.forward(x);
        let attended = match &self.attention {
            Attention::Spatial(a) => a.forward(&normed, geometry),
            Attention::Channel(a) => a.forward(&normed, geometry),
        };
        let x = x + attended;
        self.ffn.forward(&self.norm2.forward(&x), geometry) + x
    }
}

/// The hyperparameters the blocks are built from.
struct DatShape {
    features: i64,
    split: [i64; 2],
    ffn_hidden: i64,
    three_conv: bool,
}

/// Group `index` under `vp`: even blocks spatial, odd ones channel blocks; windows
/// shifted where [`shifts`] says.
fn load_group(vp: &VarPath, index: i64, shape: &DatShape) -> Result<WindowGroup<Block>> {
    let blocks_path = vp.pp("blocks");
    let depth = count_blocks(&blocks_path) as i64;
    let heads = group_heads(&blocks_path);
    let dim = shape.features;
    let blocks = (0..depth)
        .map(|b| {
            let block = blocks_path.pp(b);
            let attn = block.pp("attn");
            let shifted = shifts(index, b);
            let attention = match b % 2 {
                0 => Attention::Spatial(SpatialAttention::load(
                    &attn,
                    dim,
                    heads,
                    shape.split,
                    shifted,
                )?),
                _ => Attention::Channel(ChannelAttention::load(&attn, dim, heads)?),
            };
            Ok(Block {
                norm1: LayerNorm::load(&block.pp("norm1"), dim, LAYER_NORM_EPS)?,
                attention,
                norm2: LayerNorm::load(&block.pp("norm2"), dim, LAYER_NORM_EPS)?,
                ffn: GatedFeedForward::load(&block.pp("ffn"), dim, shape.ffn_hidden)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(WindowGroup {
        blocks,
        conv: ResidualConv::load(&vp.pp("conv"), dim, shape.three_conv)?,
    })
}

/// A group's heads as the layout read them: its channel block's, or twice its first
/// block's window heads (every block's tensors are then loaded against them).
fn group_heads(blocks: &VarPath) -> i64 {
    match blocks.pp(1).pp("attn").shape("temperature") {
        Some(temperature) => temperature.first().copied().unwrap_or(2),
        None => 2 * width(&blocks.pp(0).pp("attn"), "attns.0.pos.pos3.2.weight"),
    }
}

/// DAT.
pub type Dat = Frame<Block>;

impl Dat {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Dat {
            channels,
            features,
            groups,
            split,
            ffn_hidden,
            upsampler,
            upsample_features,
            scale,
            three_conv,
            ..
        } = architecture
        else {
            unreachable!("a DAT architecture");
        };
        let shape = DatShape {
            features,
            split,
            ffn_hidden,
            three_conv,
        };
        let tail_shape = SwinShape {
            channels,
            features,
            window: split[0],
            mlp_hidden: ffn_hidden,
            upsampler,
            upsample_features,
            scale,
            three_conv,
        };
        let groups = (0..groups)
            .map(|g| load_group(&vp.pp("layers").pp(g), g, &shape))
            .collect::<Result<_>>()?;
        Frame::new(vp, &tail_shape, split, groups)
    }
}
