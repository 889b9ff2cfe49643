//! The local deformable attention upsampler of FDAT's "lda" files (`LDA_AQU`), as
//! spandrel runs it: each output pixel's query (a 1×1 projection of the channel-normed
//! input, enlarged bilinearly with aligned corners) predicts, per group of channels,
//! nine sampling points around its own position (3×3 base offsets plus 11·tanh of a
//! depthwise convolution, a channel norm, SiLU and a convolution); keys (a 1×1
//! projection) and values (the input itself) are sampled there bilinearly, zero
//! outside, with corners aligned; the query attends over its nine points with a learned
//! bias per point and channel.

use tch::{Kind, Tensor};

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The constructor's fixed choices: queries a quarter of the width, two groups, a 3×3
/// neighbourhood, offsets up to 11 pixels.
const REDUCTION: i64 = 4;
const GROUPS: i64 = 2;
const SIDE: i64 = 3;
const POINTS: i64 = SIDE * SIDE;
const RANGE: f64 = 11.0;

/// `grid_sampler`'s bilinear interpolation and zero padding.
const BILINEAR: i64 = 0;
const ZEROS: i64 = 0;

/// A loaded `LDA_AQU`.
pub struct DeformableUpsample {
    norm: ChannelNorm,
    query: SameConv,
    key: SameConv,
    /// The offset predictor: a depthwise 3×3 convolution (no bias), a channel norm, SiLU,
    /// then a 3×3 convolution to the nine points' (row, column) offsets.
    offset_depthwise: SameConv,
    offset_norm: ChannelNorm,
    offset_conv: Conv2d,
    /// [1, 1, 1, 9, width / 4].
    position_bias: Tensor,
    scale: i64,
}

impl DeformableUpsample {
    /// The upsampler under `vp` over `width` channels, enlarging by `scale`.
    pub fn load(vp: &VarPath, width: i64, scale: i64) -> Result<Self> {
        let hidden = width / REDUCTION;
        let group = width / (REDUCTION * GROUPS);
        let offset = vp.pp("conv_offset");
        Ok(Self {
            norm: ChannelNorm::load(&vp.pp("layer_norm"), width)?,
            query: SameConv::load(&vp.pp("proj_q"), [width, hidden], 1, 1, false)?,
            key: SameConv::load(&vp.pp("proj_k"), [width, hidden], 1, 1, false)?,
            offset_depthwise: SameConv::depthwise(&offset.pp(0), group, 3, false)?,
            offset_norm: ChannelNorm::load(&offset.pp(1), group)?,
            offset_conv: Conv2d::load(&offset.pp(3), group, 2 * POINTS, 3, 1, 1)?,
            position_bias: vp.get("relative_position_bias_table", &[1, 1, 1, POINTS, hidden])?,
            scale,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        let (out_h, out_w) = (h * self.scale, w * self.scale);
        let normed = self.norm.forward(x);
        let query =
            self.query
                .forward(&normed)
                .upsample_bilinear2d([out_h, out_w], true, None, None);
        let key = self.key.forward(&normed);
        let hidden = key.size()[1];
        let predicted = self.offset_conv.forward(
            &self
                .offset_norm
                .forward(&self.offset_depthwise.forward(&query.view([
                    b * GROUPS,
                    -1,
                    out_h,
                    out_w,
                ])))
                .silu(),
        );
        let offsets = predicted.tanh() * RANGE + base_offsets(x);
        let grid = sampling_grid(&offsets, out_h, out_w);
        let gather = |t: Tensor, channels: i64| {
            let per_group = channels / GROUPS;
            t.view([b * GROUPS, per_group, h, w])
                .grid_sampler(&grid, BILINEAR, ZEROS, true)
                .view([b, GROUPS, per_group, SIDE, out_h, SIDE, out_w].as_slice())
                .permute([0, 4, 6, 3, 5, 1, 2])
                .reshape([b, 1, out_h * out_w, POINTS, channels])
        };
        let keys = gather(key, hidden) + &self.position_bias;
        let values = gather(x.shallow_clone(), c);
        let query = query
            .view([b, 1, hidden, out_h * out_w])
            .permute([0, 1, 3, 2])
            .unsqueeze(3);
        let scale = (hidden as f64).powf(-0.5);
        (query * scale)
            .matmul(&keys.transpose(-1, -2))
            .softmax(-1, None)
            .matmul(&values)
            .view([b, out_h, out_w, c])
            .permute([0, 3, 1, 2])
    }
}

/// The 3×3 neighbourhood's (row, column) offsets, row-major: [1, 18, 1, 1].
fn base_offsets(x: &Tensor) -> Tensor {
    let pad = SIDE / 2;
    let values: Vec<f32> = (0..POINTS)
        .flat_map(|p| [(p / SIDE - pad) as f32, (p % SIDE - pad) as f32])
        .collect();
    Tensor::from_slice(&values)
        .view([1, 2 * POINTS, 1, 1])
        .to_kind(x.kind())
        .to_device(x.device())
}

/// `get_offset`: the offsets [B·G, (3·3·2), H', W'] added to each output pixel's (row,
/// column), scaled to [-1, 1] over the output's extent, as a grid of the nine points'
/// planes laid out [B·G, 3·H', 3·W', (x, y)].
fn sampling_grid(offsets: &Tensor, out_h: i64, out_w: i64) -> Tensor {
    let groups = offsets.size()[0];
    let offsets = offsets
        .view([groups, SIDE, SIDE, 2, out_h, out_w])
        .permute([0, 1, 4, 2, 5, 3]);
    let options = (Kind::Float, offsets.device());
    let rows = Tensor::arange(out_h, options)
        .to_kind(offsets.kind())
        .view([1, 1, out_h, 1, 1]);
    let columns = Tensor::arange(out_w, options)
        .to_kind(offsets.kind())
        .view([1, 1, 1, 1, out_w]);
    let y = (offsets.select(5, 0) + rows) * 2.0 / (out_h - 1) as f64 - 1.0;
    let x = (offsets.select(5, 1) + columns) * 2.0 / (out_w - 1) as f64 - 1.0;
    Tensor::stack(&[x, y], -1).reshape([groups, SIDE * out_h, SIDE * out_w, 2])
}
