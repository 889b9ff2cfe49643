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
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::preprocess::efficientnet::fold_batch_norm;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::swin::{
    attend, count_blocks, embed, gather_bias, partition, relative_position_index, reverse,
    shifted_mask, unembed, LAYER_NORM_EPS, MASKED,
};
use crate::engine::upscale::swinir::{image_mean, ResidualConv, SwinShape, Tail};
use crate::engine::weights::VarPath;

/// `nn.BatchNorm2d`'s epsilon.
const BATCH_NORM_EPS: f64 = 1e-5;
/// `F.normalize`'s epsilon.
const NORMALIZE_EPS: f64 = 1e-12;

/// A convolution with its inference batch norm folded in, one group per channel or one
/// for all.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    padding: i64,
}

impl Conv {
    /// The `kernel`×`kernel` convolution under `vp` from `input` to `output` channels
    /// (depthwise: one group per channel), with the batch norm under `norm` folded in.
    fn load(
        vp: &VarPath,
        [input, output]: [i64; 2],
        kernel: i64,
        depthwise: bool,
        norm: Option<&VarPath>,
    ) -> Result<Self> {
        let per_group = if depthwise { 1 } else { input };
        let weight = vp.get("weight", &[output, per_group, kernel, kernel])?;
        let bias = vp.get("bias", &[output])?;
        let (weight, bias) = match norm {
            Some(norm) => fold_batch_norm(norm, weight, Some(bias), BATCH_NORM_EPS)?,
            None => (weight, bias),
        };
        Ok(Self {
            weight,
            bias,
            groups: if depthwise { output } else { 1 },
            padding: kernel / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let padding = [self.padding, self.padding];
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [1, 1],
            padding,
            [1, 1],
            self.groups,
        )
    }
}

/// The first dimension of `name` under `vp` (0 where it is missing: the load that
/// follows names it).
fn width(vp: &VarPath, name: &str) -> i64 {
    vp.shape(name).and_then(|s| s.first().copied()).unwrap_or(0)
}

/// The depthwise convolution branch beside an attention and the adaptive interaction
/// module's two maps (before their sigmoid).
struct Interaction {
    depthwise: Conv,
    channel: [Conv; 2],
    spatial: [Conv; 2],
}

impl Interaction {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        let squeezed = width(vp, "channel_interaction.1.weight");
        let thin = width(vp, "spatial_interaction.0.weight");
        let (channel, spatial) = (vp.pp("channel_interaction"), vp.pp("spatial_interaction"));
        Ok(Self {
            depthwise: Conv::load(
                &vp.pp("dwconv.0"),
                [dim, dim],
                3,
                true,
                Some(&vp.pp("dwconv.1")),
            )?,
            channel: [
                Conv::load(
                    &channel.pp(1),
                    [dim, squeezed],
                    1,
                    false,
                    Some(&channel.pp(2)),
                )?,
                Conv::load(&channel.pp(4), [squeezed, dim], 1, false, None)?,
            ],
            spatial: [
                Conv::load(&spatial.pp(0), [dim, thin], 1, false, Some(&spatial.pp(1)))?,
                Conv::load(&spatial.pp(3), [thin, 1], 1, false, None)?,
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

/// The offsets a `[rows, columns]` window's position bias is drawn from
/// (`rpe_biases`): every (row, column) difference, row-major, as [(2r-1)(2c-1), 2].
fn position_offsets([rows, columns]: [i64; 2], like: &VarPath) -> Tensor {
    let offsets: Vec<f32> = (1 - rows..rows)
        .flat_map(|dy| (1 - columns..columns).flat_map(move |dx| [dy as f32, dx as f32]))
        .collect();
    Tensor::from_slice(&offsets)
        .view([-1, 2])
        .to_device(like.device())
        .to_kind(like.kind())
}

/// Attention within one orientation's windows (`Spatial_Attention`), its position bias
/// drawn once at load by the dynamic position bias MLP (`DynamicPosBias`, no residual).
struct WindowBranch {
    /// [heads, N, N].
    bias: Tensor,
    heads: i64,
    window: [i64; 2],
}

impl WindowBranch {
    fn load(vp: &VarPath, heads: i64, window: [i64; 2]) -> Result<Self> {
        let pos = vp.pp("pos");
        let hidden = width(&pos, "pos_proj.weight");
        let project = Linear::load(&pos.pp("pos_proj"), 2, hidden, true)?;
        let mut table = project.forward(&position_offsets(window, vp));
        for (layer, output) in [("pos1", hidden), ("pos2", hidden), ("pos3", heads)] {
            let norm = LayerNorm::load(&pos.pp(layer).pp(0), hidden, LAYER_NORM_EPS)?;
            let linear = Linear::load(&pos.pp(layer).pp(2), hidden, output, true)?;
            table = linear.forward(&norm.forward(&table).relu());
        }
        let pixels = window[0] * window[1];
        let index = relative_position_index(window);
        Ok(Self {
            bias: gather_bias(&table, &index, pixels, pixels),
            heads,
            window,
        })
    }

    /// Attention within the windows of [3, B, H, W, C] q/k/v (whole windows), `mask`
    /// [nW, N, N] on shifted ones; [B, H, W, C] out.
    fn forward(&self, qkv: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let size = qkv.size();
        let (h, w, c) = (size[2], size[3], size[4]);
        let [rows, columns] = self.window;
        let heads = self.heads;
        let windows = |i: i64| {
            partition(&qkv.get(i), self.window)
                .view([-1, rows * columns, heads, c / heads])
                .permute([0, 2, 1, 3])
        };
        let attended = attend(&windows(0), &windows(1), &windows(2), &self.bias, mask);
        reverse(&attended.view([-1, rows, columns, c]), self.window, h, w)
    }
}

/// Where a forward pass's spatial blocks put their windows: the image side lengths, the
/// sides padded with zeros to whole windows of both orientations, each orientation's
/// shift and its shifted windows' mask.
struct Geometry {
    height: i64,
    width: i64,
    padded: [i64; 2],
    shifts: [[i64; 2]; 2],
    masks: Option<[Tensor; 2]>,
}

impl Geometry {
    /// For the [B, C, H, W] feature map `like` and the first orientation's window; the
    /// masks only where some block is `shifted`.
    fn of(like: &Tensor, split: [i64; 2], shifted: bool) -> Self {
        let size = like.size();
        let (height, width) = (size[2], size[3]);
        // The reference pads to the larger side, which the smaller divides.
        let side = split[0].max(split[1]);
        let whole = |n: i64| n + (side - n % side) % side;
        let padded = [whole(height), whole(width)];
        let windows = [split, [split[1], split[0]]];
        let shifts = windows.map(|[rows, columns]| [rows / 2, columns / 2]);
        let masks = (shifted && shifts[0] != [0, 0]).then(|| {
            [0, 1].map(|i| shifted_mask(padded[0], padded[1], windows[i], shifts[i], MASKED, like))
        });
        Self {
            height,
            width,
            padded,
            shifts,
            masks,
        }
    }
}

/// The spatial block's attention (`Adaptive_Spatial_Attention`).
struct SpatialAttention {
    qkv: Linear,
    proj: Linear,
    branches: [WindowBranch; 2],
    interaction: Interaction,
    shifted: bool,
}

impl SpatialAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, split: [i64; 2], shifted: bool) -> Result<Self> {
        let qkv_bias = vp.pp("qkv").contains("bias");
        let attns = vp.pp("attns");
        Ok(Self {
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            branches: [
                WindowBranch::load(&attns.pp(0), heads / 2, split)?,
                WindowBranch::load(&attns.pp(1), heads / 2, [split[1], split[0]])?,
            ],
            interaction: Interaction::load(vp, dim)?,
            shifted,
        })
    }

    /// On [B, H·W, C] normed tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[2]);
        let (h, w) = (geometry.height, geometry.width);
        let qkv = self
            .qkv
            .forward(x)
            .view([b, h, w, 3, c])
            .permute([3, 0, 1, 2, 4]);
        let values = qkv.get(2).permute([0, 3, 1, 2]);
        let [ph, pw] = geometry.padded;
        let padded = qkv.constant_pad_nd([0, 0, 0, pw - w, 0, ph - h]);
        let half = c / 2;
        let attended: Vec<Tensor> = self
            .branches
            .iter()
            .enumerate()
            .map(|(i, branch)| {
                let part = padded.narrow(4, i as i64 * half, half);
                let shift = match (&geometry.masks, self.shifted) {
                    (Some(masks), true) => Some((geometry.shifts[i], &masks[i])),
                    _ => None,
                };
                let y = match shift {
                    Some(([sy, sx], mask)) => branch
                        .forward(&part.roll([-sy, -sx], [2, 3]), Some(mask))
                        .roll([sy, sx], [1, 2]),
                    None => branch.forward(&part, None),
                };
                y.narrow(1, 0, h).narrow(2, 0, w).reshape([b, h * w, half])
            })
            .collect();
        let attended = Tensor::cat(&attended, 2);
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
        let normalize = |t: Tensor| {
            let norm = t.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
            t / norm.clamp_min(NORMALIZE_EPS)
        };
        let scores = normalize(q).matmul(&normalize(k).transpose(-2, -1)) * &self.temperature;
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

/// The spatial-gate feed-forward network (`SGFN`): half its hidden channels, normed and
/// convolved depthwise, gate the other half.
struct GatedFeedForward {
    fc1: Linear,
    norm: LayerNorm,
    conv: Conv,
    fc2: Linear,
}

impl GatedFeedForward {
    fn load(vp: &VarPath, dim: i64, hidden: i64) -> Result<Self> {
        let half = hidden / 2;
        let gate = vp.pp("sg");
        Ok(Self {
            fc1: Linear::load(&vp.pp("fc1"), dim, hidden, true)?,
            norm: LayerNorm::load(&gate.pp("norm"), half, LAYER_NORM_EPS)?,
            conv: Conv::load(&gate.pp("conv"), [half, half], 3, true, None)?,
            fc2: Linear::load(&vp.pp("fc2"), half, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let y = self.fc1.forward(x).gelu("none");
        let half = y.size()[2] / 2;
        let (h, w) = (geometry.height, geometry.width);
        let normed = self.norm.forward(&y.narrow(2, half, half));
        let gate = embed(&self.conv.forward(&unembed(&normed, h, w)));
        self.fc2.forward(&(y.narrow(2, 0, half) * gate))
    }
}

enum Attention {
    Spatial(SpatialAttention),
    Channel(ChannelAttention),
}

/// One dual aggregation transformer block (`DATB`).
struct Block {
    norm1: LayerNorm,
    attention: Attention,
    norm2: LayerNorm,
    ffn: GatedFeedForward,
}

impl Block {
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

/// A residual group.
struct Group {
    blocks: Vec<Block>,
    conv: ResidualConv,
}

impl Group {
    /// Group `index` under `vp`: even blocks spatial, odd ones channel blocks; shifted
    /// windows in blocks 2, 6, 10, ... of even groups and 0, 4, 8, ... of odd ones.
    fn load(vp: &VarPath, index: i64, shape: &DatShape) -> Result<Self> {
        let blocks_path = vp.pp("blocks");
        let depth = count_blocks(&blocks_path) as i64;
        let heads = group_heads(&blocks_path);
        let dim = shape.features;
        let blocks = (0..depth)
            .map(|b| {
                let block = blocks_path.pp(b);
                let attn = block.pp("attn");
                let shifted = match index % 2 {
                    0 => b > 0 && (b - 2) % 4 == 0,
                    _ => b % 4 == 0,
                };
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
        Ok(Self {
            blocks,
            conv: ResidualConv::load(&vp.pp("conv"), dim, shape.three_conv)?,
        })
    }

    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let y = self
            .blocks
            .iter()
            .fold(x.shallow_clone(), |y, block| block.forward(&y, geometry));
        self.conv
            .close_group(&y, x, geometry.height, geometry.width)
    }
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
pub struct Dat {
    first: Conv2d,
    before_groups: LayerNorm,
    groups: Vec<Group>,
    norm: LayerNorm,
    after_body: ResidualConv,
    tail: Tail,
    mean: Tensor,
    split: [i64; 2],
    /// Whether any block attends on shifted windows (the masks are built for them).
    shifted: bool,
    scale: i64,
}

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
        let groups: Vec<Group> = (0..groups)
            .map(|g| Group::load(&vp.pp("layers").pp(g), g, &shape))
            .collect::<Result<_>>()?;
        let shifted = groups
            .iter()
            .flat_map(|g| &g.blocks)
            .any(|b| matches!(&b.attention, Attention::Spatial(a) if a.shifted));
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            before_groups: LayerNorm::load(&vp.pp("before_RG.1"), features, LAYER_NORM_EPS)?,
            groups,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body: ResidualConv::load(&vp.pp("conv_after_body"), features, three_conv)?,
            tail: Tail::load(vp, &tail_shape)?,
            mean: image_mean(channels, vp),
            split,
            shifted,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor) -> Tensor {
        let input = image - &self.mean;
        let first = self.first.forward(&input);
        let geometry = Geometry::of(&first, self.split, self.shifted);
        let tokens = self.before_groups.forward(&embed(&first));
        let tokens = self
            .groups
            .iter()
            .fold(tokens, |x, group| group.forward(&x, &geometry));
        let features = unembed(&self.norm.forward(&tokens), geometry.height, geometry.width);
        let body = self.after_body.forward(&features) + &first;
        self.tail.forward(&body, &input, self.scale) + &self.mean
    }
}
