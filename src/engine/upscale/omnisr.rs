//! OmniSR, as spandrel runs it (`OmniSR/__arch/`): the image zero-padded to whole
//! windows, a convolution, groups of omni self-attention blocks (each a mobile
//! convolution, attention within windows and across a grid, channel attention within
//! windows and across a grid, gated feed-forward convolutions between them) closed by a
//! 1×1 convolution, the group's input and an enhanced spatial attention, then a
//! convolution with the long skip and a pixel shuffle.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::gated_dconv::GatedDconvFeedForward;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{attend, gather_bias, relative_position_index, LAYER_NORM_EPS};
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// The channel attentions' heads (fixed in the reference; the spatial ones have as many,
/// `dim // (dim // 4)`, for every width the reference can build).
pub const HEADS: i64 = 4;

/// How an attention groups pixels: a window of neighbours, or one pixel from each cell
/// of a grid (the reference's "block" and "grid" rearrangements).
#[derive(Clone, Copy)]
enum Grouping {
    Window,
    Grid,
}

/// [B, C, H, W] as [B·groups, window², C] tokens: each window's pixels, or for the grid
/// the pixels `H / window` rows and `W / window` columns apart (`(w1 x)`).
fn to_tokens(x: &Tensor, window: i64, grouping: Grouping) -> Tensor {
    let size = x.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    let (rows, columns) = (h / window, w / window);
    let split = match grouping {
        Grouping::Window => x.view([b, c, rows, window, columns, window]),
        Grouping::Grid => x
            .view([b, c, window, rows, window, columns])
            .permute([0, 1, 3, 2, 5, 4]),
    };
    split
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([b * rows * columns, window * window, c])
}

/// The tokens back as [B, C, H, W].
fn from_tokens(
    tokens: &Tensor,
    window: i64,
    grouping: Grouping,
    height: i64,
    width: i64,
) -> Tensor {
    let (rows, columns) = (height / window, width / window);
    let c = tokens.size()[2];
    let x = tokens
        .view([-1, rows, columns, window, window, c])
        .permute([0, 5, 1, 3, 2, 4]);
    match grouping {
        Grouping::Window => x.reshape([-1, c, height, width]),
        Grouping::Grid => x
            .permute([0, 1, 3, 2, 5, 4])
            .reshape([-1, c, height, width]),
    }
}

/// `PreNormResidual(Attention)`: a layer norm, multi-head attention among each group's
/// pixels with the relative position bias where the file has one, the input added.
struct SpatialAttention {
    norm: LayerNorm,
    qkv: Linear,
    out: Linear,
    /// [heads, window², window²], gathered once.
    bias: Option<Tensor>,
    window: i64,
    grouping: Grouping,
}

impl SpatialAttention {
    fn load(vp: &VarPath, dim: i64, window: i64, grouping: Grouping, bias: bool) -> Result<Self> {
        let attention = vp.pp("fn");
        let pixels = window * window;
        let side = 2 * window - 1;
        let bias = bias
            .then(|| {
                let table = attention
                    .pp("rel_pos_bias")
                    .get("weight", &[side * side, HEADS])?;
                let index = relative_position_index([window, window]);
                Ok::<_, EngineError>(gather_bias(&table, &index, pixels, pixels))
            })
            .transpose()?;
        Ok(Self {
            norm: LayerNorm::load(&vp.pp("norm"), dim, LAYER_NORM_EPS)?,
            qkv: Linear::load(&attention.pp("to_qkv"), dim, 3 * dim, false)?,
            out: Linear::load(&attention.pp("to_out").pp(0), dim, dim, false)?,
            bias,
            window,
            grouping,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let tokens = to_tokens(x, self.window, self.grouping);
        let (b, n, c) = (tokens.size()[0], tokens.size()[1], tokens.size()[2]);
        let qkv = self
            .qkv
            .forward(&self.norm.forward(&tokens))
            .view([b, n, 3, HEADS, c / HEADS])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attended = match &self.bias {
            Some(bias) => attend(&q, &k, &v, bias, None),
            None => Tensor::scaled_dot_product_attention::<&Tensor>(
                &q, &k, &v, None, 0.0, false, None, false,
            )
            .transpose(1, 2)
            .reshape([b, n, c]),
        };
        let mut y = self.out.forward(&attended);
        let _ = y.g_add_(&tokens);
        from_tokens(&y, self.window, self.grouping, size[2], size[3])
    }
}

/// 1×1 convolution to q, k and v, then a depthwise 3×3 one over them (no biases).
struct QkvConv {
    pointwise: SameConv,
    depthwise: SameConv,
}

impl QkvConv {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        Ok(Self {
            pointwise: SameConv::load(&vp.pp("qkv"), [dim, 3 * dim], 1, 1, false)?,
            depthwise: SameConv::depthwise(&vp.pp("qkv_dwconv"), 3 * dim, 3, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        self.depthwise
            .forward(&self.pointwise.forward(x))
            .chunk(3, 1)
    }
}

/// `Conv_PreNormResidual(Channel_Attention[_grid])`: a channel norm, then per head
/// attention among the channels (their L2-normalised values over each window's pixels,
/// or over the pixels at one offset of every window, scaled by a learned temperature),
/// the input added.
struct ChannelAttention {
    norm: ChannelNorm,
    qkv: QkvConv,
    temperature: Tensor,
    out: SameConv,
    window: i64,
    grouping: Grouping,
}

impl ChannelAttention {
    fn load(vp: &VarPath, dim: i64, window: i64, grouping: Grouping) -> Result<Self> {
        let attention = vp.pp("fn");
        Ok(Self {
            norm: ChannelNorm::load(&vp.pp("norm"), dim)?,
            qkv: QkvConv::load(&attention, dim)?,
            temperature: attention.get("temperature", &[HEADS, 1, 1])?,
            out: SameConv::load(&attention.pp("project_out"), [dim, dim], 1, 1, false)?,
            window,
            grouping,
        })
    }

    /// The permutation of [B, heads, d, h, ps, w, ps] that puts the attention's groups
    /// first and its pixels last: windows over their pixels, or pixel offsets over the
    /// windows.
    fn permutation(&self) -> [i64; 7] {
        match self.grouping {
            Grouping::Window => [0, 3, 5, 1, 2, 4, 6],
            Grouping::Grid => [0, 4, 6, 1, 2, 3, 5],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        let ps = self.window;
        let d = c / HEADS;
        let order = self.permutation();
        let grouped = |t: &Tensor| {
            let t = t
                .view([b, HEADS, d, h / ps, ps, w / ps, ps].as_slice())
                .permute(order);
            let s = t.size();
            t.reshape([b, s[1] * s[2], HEADS, d, s[5] * s[6]])
        };
        let qkv = self.qkv.forward(&self.norm.forward(x));
        let (q, k, v) = (grouped(&qkv[0]), grouped(&qkv[1]), grouped(&qkv[2]));
        let scores = unit_norm(&q).matmul(&unit_norm(&k).transpose(-2, -1)) * &self.temperature;
        let out = scores.softmax(-1, scores.kind()).matmul(&v);
        // Back to [B, heads, d, h, ps, w, ps], then the image.
        let axes = [b, HEADS, d, h / ps, ps, w / ps, ps];
        let mut inverse = [0i64; 7];
        for (i, axis) in order.iter().enumerate() {
            inverse[*axis as usize] = i as i64;
        }
        let image = out
            .view(order.map(|axis| axes[axis as usize]).as_slice())
            .permute(inverse)
            .reshape([b, c, h, w]);
        let mut y = self.out.forward(&image);
        let _ = y.g_add_(x);
        y
    }
}

/// `Conv_PreNormResidual(Gated_Conv_FeedForward)`: a channel norm, a 1×1 convolution to
/// twice the width, a depthwise 3×3 one, GELU of the first half times the second, a 1×1
/// convolution back (no biases), the input added.
struct GatedFeedForward {
    norm: ChannelNorm,
    ffn: GatedDconvFeedForward,
}

impl GatedFeedForward {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        Ok(Self {
            norm: ChannelNorm::load(&vp.pp("norm"), dim)?,
            ffn: GatedDconvFeedForward::load(&vp.pp("fn"), dim, dim, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = self.ffn.forward(&self.norm.forward(x));
        let _ = y.g_add_(x);
        y
    }
}

/// `MBConv` with its residual: a 1×1 convolution, GELU, a depthwise 3×3 one, GELU, a
/// squeeze and excitation (the channels' means through two bias-free linears with SiLU
/// between, a sigmoid), a 1×1 convolution, the input added.
struct MobileConv {
    expand: Conv2d,
    depthwise: SameConv,
    squeeze: Linear,
    excite: Linear,
    project: Conv2d,
}

impl MobileConv {
    fn load(vp: &VarPath, dim: i64, squeezed: i64) -> Result<Self> {
        let net = vp.pp("fn");
        let gate = net.pp(4).pp("gate");
        Ok(Self {
            expand: Conv2d::load(&net.pp(0), dim, dim, 1, 1, 0)?,
            depthwise: SameConv::depthwise(&net.pp(2), dim, 3, true)?,
            squeeze: Linear::load(&gate.pp(1), dim, squeezed, false)?,
            excite: Linear::load(&gate.pp(3), squeezed, dim, false)?,
            project: Conv2d::load(&net.pp(5), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.expand.forward(x).gelu("none");
        let mut y = self.depthwise.forward(&y).gelu("none");
        let means = y.mean_dim([2i64, 3].as_slice(), false, None);
        let gate = self
            .excite
            .forward(&self.squeeze.forward(&means).silu())
            .sigmoid();
        let _ = y.g_mul_(&gate.unsqueeze(-1).unsqueeze(-1));
        let mut y = self.project.forward(&y);
        let _ = y.g_add_(x);
        y
    }
}

/// `OSA_Block`: the mobile convolution, then windows and grid, each as spatial attention,
/// feed-forward, channel attention, feed-forward.
struct OmniBlock {
    mobile: MobileConv,
    spatial: [SpatialAttention; 2],
    channel: [ChannelAttention; 2],
    /// After each spatial and each channel attention, in order.
    feed_forward: [GatedFeedForward; 4],
}

impl OmniBlock {
    fn load(vp: &VarPath, shape: &OmniShape) -> Result<Self> {
        let layer = vp.pp("layer");
        let (dim, window, bias) = (shape.features, shape.window, shape.position_bias);
        let ffn = |i: i64| GatedFeedForward::load(&layer.pp(i), dim);
        Ok(Self {
            mobile: MobileConv::load(&layer.pp(0), dim, shape.squeezed)?,
            spatial: [
                SpatialAttention::load(&layer.pp(2), dim, window, Grouping::Window, bias)?,
                SpatialAttention::load(&layer.pp(8), dim, window, Grouping::Grid, bias)?,
            ],
            channel: [
                ChannelAttention::load(&layer.pp(5), dim, window, Grouping::Window)?,
                ChannelAttention::load(&layer.pp(11), dim, window, Grouping::Grid)?,
            ],
            feed_forward: [ffn(4)?, ffn(6)?, ffn(10)?, ffn(12)?],
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = self.mobile.forward(x);
        for half in 0..2 {
            y = self.spatial[half].forward(&y);
            y = self.feed_forward[2 * half].forward(&y);
            y = self.channel[half].forward(&y);
            y = self.feed_forward[2 * half + 1].forward(&y);
        }
        y
    }
}

/// `ESA`: a spatial mask from a strided, max-pooled and bilinearly enlarged narrow copy
/// of the features, through a sigmoid, multiplying them.
struct SpatialMask {
    narrow: Conv2d,
    strided: Conv2d,
    pooled: Conv2d,
    skip: Conv2d,
    widen: Conv2d,
}

/// ESA's max pooling.
const ESA_POOL: (i64, i64) = (7, 3);

impl SpatialMask {
    fn load(vp: &VarPath, dim: i64, narrow: i64) -> Result<Self> {
        Ok(Self {
            narrow: Conv2d::load(&vp.pp("conv1"), dim, narrow, 1, 1, 0)?,
            strided: Conv2d::load(&vp.pp("conv2"), narrow, narrow, 3, 2, 0)?,
            pooled: Conv2d::load(&vp.pp("conv3"), narrow, narrow, 3, 1, 1)?,
            skip: Conv2d::load(&vp.pp("conv_f"), narrow, narrow, 1, 1, 0)?,
            widen: Conv2d::load(&vp.pp("conv4"), narrow, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, mut x: Tensor) -> Tensor {
        let size = x.size();
        let narrowed = self.narrow.forward(&x);
        let (kernel, stride) = ESA_POOL;
        let pooled = self.strided.forward(&narrowed).max_pool2d(
            [kernel, kernel],
            [stride, stride],
            [0, 0],
            [1, 1],
            false,
        );
        let enlarged =
            self.pooled
                .forward(&pooled)
                .upsample_bilinear2d([size[2], size[3]], false, None, None);
        let mask = self
            .widen
            .forward(&(enlarged + self.skip.forward(&narrowed)))
            .sigmoid();
        let _ = x.g_mul_(&mask);
        x
    }
}

/// `OSAG`: its blocks, a 1×1 convolution, the group's input added, the spatial mask.
struct Group {
    blocks: Vec<OmniBlock>,
    conv: SameConv,
    mask: SpatialMask,
}

impl Group {
    fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let y = in_turn(x.shallow_clone(), &self.blocks, between, |block, y| {
            block.forward(y)
        })?;
        let mut y = self.conv.forward(&y);
        let _ = y.g_add_(x);
        Ok(self.mask.forward(y))
    }
}

/// What every block and group is built from.
struct OmniShape {
    features: i64,
    window: i64,
    position_bias: bool,
    squeezed: i64,
}

/// OmniSR.
pub struct OmniSr {
    input: SameConv,
    groups: Vec<Group>,
    output: SameConv,
    up: SameConv,
    window: i64,
    scale: i64,
}

impl OmniSr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::OmniSr {
            channels,
            features,
            groups,
            blocks,
            window,
            position_bias,
            bias,
            scale,
        } = architecture
        else {
            unreachable!("an OmniSR architecture");
        };
        let shape = OmniShape {
            features,
            window,
            position_bias,
            // `SqueezeExcitation(dim, 0.25)`: `int(dim * 0.25)`.
            squeezed: features / 4,
        };
        let groups = (0..groups)
            .map(|g| {
                let group = vp.pp("residual_layer").pp(g);
                let layers = group.pp("residual_layer");
                Ok(Group {
                    blocks: (0..blocks)
                        .map(|b| OmniBlock::load(&layers.pp(b), &shape))
                        .collect::<Result<_>>()?,
                    conv: SameConv::load(&layers.pp(blocks), [features, features], 1, 1, bias)?,
                    // ESA's narrow width: `max(dim // 4, 16)`.
                    mask: SpatialMask::load(&group.pp("esa"), features, (features / 4).max(16))?,
                })
            })
            .collect::<Result<_>>()?;
        let conv3 = |vp: &VarPath, output: i64| SameConv::load(vp, [features, output], 3, 1, bias);
        Ok(Self {
            input: SameConv::load(&vp.pp("input"), [channels, features], 3, 1, bias)?,
            groups,
            output: conv3(&vp.pp("output"), features)?,
            up: conv3(&vp.pp("up").pp(0), channels * scale * scale)?,
            window,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let more = |n: i64| (self.window - n % self.window) % self.window;
        let padded = image.constant_pad_nd([0, more(width), 0, more(height)]);
        let features = self.input.forward(&padded);
        let trunk = self
            .groups
            .iter()
            .try_fold(features.shallow_clone(), |y, group| {
                group.forward(&y, between)
            })?;
        let mut y = self.output.forward(&trunk);
        let _ = y.g_add_(&features);
        Ok(self
            .up
            .forward(&y)
            .pixel_shuffle(self.scale)
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}
