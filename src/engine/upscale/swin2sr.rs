//! Swin2SR, as spandrel runs it (`Swin2SR/__arch/Swin2SR.py`, in eval mode): SwinIR's
//! frame (`swinir.rs`: the padding to whole windows, the first convolution, residual
//! groups, the upsamplers) around Swin V2 blocks: cosine attention scaled by each head's
//! learned logit scale (at most 100), a position bias drawn by a small MLP from the
//! log-spaced window offsets (16·sigmoid), layer norms after the attention and after the
//! MLP. Each group closes with its convolution and a 1×1 projection; the compressed-input
//! models add a bicubic branch to the pixel shuffle.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::swin::{
    attend_scaled, embed, gather_bias, pad_to_windows, partition, relative_position_index, reverse,
    shift_for, through_groups, unembed, Windows, LAYER_NORM_EPS,
};
use crate::engine::upscale::swinir::{image_mean, value_range, ResidualConv, SwinShape, Tail};
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// The largest logit scale (`log(1 / 0.01)` before the exponential).
const MAX_LOGIT_SCALE: f64 = 100.0;
/// The position bias's range (`16 * sigmoid`).
const BIAS_RANGE: f64 = 16.0;
/// `conv_before_upsample`'s and `conv_after_aux`'s LeakyReLU, PyTorch's default slope.
const DEFAULT_SLOPE: f64 = 0.01;

/// The window offsets as the continuous position bias's MLP takes them: each of
/// (-(w-1)..w)² scaled to ±8 and log-spaced, `sign(x)·log2(|x| + 1) / 3`, as
/// [(2w-1)², 2] rows.
fn log_spaced_offsets(window: i64) -> Tensor {
    let side = 2 * window - 1;
    let spaced = |offset: i64| {
        let x = offset as f32 / (window - 1) as f32 * 8.0;
        x.signum() * (x.abs() + 1.0).log2() / 8f32.log2()
    };
    let values: Vec<f32> = (0..side * side)
        .flat_map(|i| {
            [
                spaced(i / side - (window - 1)),
                spaced(i % side - (window - 1)),
            ]
        })
        .collect();
    Tensor::from_slice(&values).view([side * side, 2])
}

/// Cosine window attention with the continuous position bias.
struct CosineAttention {
    qkv: Tensor,
    /// `q_bias`, zeros for the keys, `v_bias`.
    qkv_bias: Option<Tensor>,
    proj: Linear,
    /// Each head's `exp(min(logit_scale, log 100))`: [heads, 1, 1].
    logit_scale: Tensor,
    /// The bias drawn once at load: [heads, N, N].
    bias: Tensor,
    heads: i64,
}

impl CosineAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, window: i64) -> Result<Self> {
        let pixels = window * window;
        let mlp = vp.pp("cpb_mlp");
        let hidden = mlp.shape("0.weight").map_or(512, |s| s[0]);
        let first = Linear::load(&mlp.pp(0), 2, hidden, true)?;
        let second = Linear::load(&mlp.pp(2), hidden, heads, false)?;
        let offsets = log_spaced_offsets(window)
            .to_device(vp.device())
            .to_kind(vp.kind());
        let table = second.forward(&first.forward(&offsets).relu());
        let index = relative_position_index([window, window]);
        let bias = gather_bias(&table, &index, pixels, pixels).sigmoid() * BIAS_RANGE;
        let qkv_bias = match vp.contains("q_bias") {
            true => {
                let q = vp.get("q_bias", &[dim])?;
                let v = vp.get("v_bias", &[dim])?;
                Some(Tensor::cat(&[&q, &v.zeros_like(), &v], 0))
            }
            false => None,
        };
        let logit_scale = vp.get("logit_scale", &[heads, 1, 1])?;
        Ok(Self {
            qkv: vp.pp("qkv").get("weight", &[3 * dim, dim])?,
            qkv_bias,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            logit_scale: logit_scale.clamp_max(MAX_LOGIT_SCALE.ln()).exp(),
            bias,
            heads,
        })
    }

    /// Attention within each of the [B·nW, N, C] windows; `mask` [nW, N, N] on shifted
    /// ones.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let qkv = x
            .linear(&self.qkv, self.qkv_bias.as_ref())
            .reshape([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let q = unit_norm(&qkv.get(0)) * &self.logit_scale;
        let k = unit_norm(&qkv.get(1));
        self.proj
            .forward(&attend_scaled(&q, &k, &qkv.get(2), &self.bias, mask, 1.0))
    }
}

/// One Swin V2 block: the norms after the attention and the MLP, inside the residuals.
struct Block {
    attention: CosineAttention,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
    shifted: bool,
}

impl Block {
    fn load(
        vp: &VarPath,
        dim: i64,
        heads: i64,
        window: i64,
        hidden: i64,
        shifted: bool,
    ) -> Result<Self> {
        Ok(Self {
            attention: CosineAttention::load(&vp.pp("attn"), dim, heads, window)?,
            norm1: LayerNorm::load(&vp.pp("norm1"), dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(&vp.pp("mlp").pp("fc1"), dim, hidden, true)?,
            fc2: Linear::load(&vp.pp("mlp").pp("fc2"), hidden, dim, true)?,
            norm2: LayerNorm::load(&vp.pp("norm2"), dim, LAYER_NORM_EPS)?,
            shifted,
        })
    }

    /// The block on [B, H·W, C] tokens.
    fn forward(&self, x: &Tensor, windows: &Windows) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[2]);
        let (h, w, window) = (windows.height, windows.width, windows.window);
        let shift = if self.shifted { windows.shift } else { 0 };
        let y = x.view([b, h, w, c]);
        let y = match shift {
            0 => y,
            s => y.roll([-s, -s], [1, 2]),
        };
        let parts = partition(&y, [window; 2]).view([-1, window * window, c]);
        let mask = windows.mask.as_ref().filter(|_| shift > 0);
        let attended = self.attention.forward(&parts, mask);
        let y = reverse(&attended.view([-1, window, window, c]), [window; 2], h, w);
        let y = match shift {
            0 => y,
            s => y.roll([s, s], [1, 2]),
        };
        let x = x + self.norm1.forward(&y.view([b, h * w, c]));
        let hidden = self.fc1.forward(&x).gelu("none");
        &x + self.norm2.forward(&self.fc2.forward(&hidden))
    }
}

/// A residual Swin transformer group: its blocks, its convolution, a 1×1 projection
/// (`patch_embed.proj`), plus its input.
struct Group {
    blocks: Vec<Block>,
    conv: ResidualConv,
    projection: Conv2d,
}

impl Group {
    fn load(vp: &VarPath, shape: &SwinShape) -> Result<Self> {
        let blocks_path = vp.pp("residual_group").pp("blocks");
        let depth = crate::engine::upscale::swin::count_blocks(&blocks_path);
        let heads = blocks_path
            .pp(0)
            .pp("attn")
            .shape("logit_scale")
            .map_or(1, |s| s[0]);
        let (dim, window, hidden) = (shape.features, shape.window, shape.mlp_hidden);
        let blocks = (0..depth)
            .map(|b| Block::load(&blocks_path.pp(b), dim, heads, window, hidden, b % 2 == 1))
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            conv: ResidualConv::load(&vp.pp("conv"), dim, shape.three_conv)?,
            projection: Conv2d::load(&vp.pp("patch_embed").pp("proj"), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor, windows: &Windows, between: &mut Between<'_>) -> Result<Tensor> {
        let y = in_turn(x.shallow_clone(), &self.blocks, between, |block, y| {
            block.forward(y, windows)
        })?;
        let convolved = self
            .conv
            .forward(&unembed(&y, windows.height, windows.width));
        Ok(embed(&self.projection.forward(&convolved)) + x)
    }
}

/// The compressed-input models' bicubic branch (`pixelshuffle_aux`).
struct Auxiliary {
    bicubic: Conv2d,
    aux: Conv2d,
    after_aux: Conv2d,
}

impl Auxiliary {
    /// The branch between `channels` image channels and `width` upsampling features.
    fn load(vp: &VarPath, channels: i64, width: i64) -> Result<Self> {
        Ok(Self {
            bicubic: Conv2d::load(&vp.pp("conv_bicubic"), channels, width, 3, 1, 1)?,
            aux: Conv2d::load(&vp.pp("conv_aux"), width, channels, 3, 1, 1)?,
            after_aux: Conv2d::load(&vp.pp("conv_after_aux").pp(0), channels, width, 3, 1, 1)?,
        })
    }
}

/// Swin2SR.
pub struct Swin2Sr {
    first: Conv2d,
    embed_projection: Conv2d,
    embed_norm: Option<LayerNorm>,
    groups: Vec<Group>,
    norm: LayerNorm,
    after_body: ResidualConv,
    tail: Tail,
    auxiliary: Option<Auxiliary>,
    mean: Tensor,
    range: f64,
    window: i64,
    /// The shifted blocks' shift (0 where the training size fit in one window).
    shift: i64,
    scale: i64,
}

impl Swin2Sr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Swin2Sr {
            channels,
            features,
            groups,
            window,
            mlp_hidden,
            image_size,
            upsampler,
            auxiliary,
            upsample_features,
            scale,
            three_conv,
            patch_norm,
            ..
        } = architecture
        else {
            unreachable!("a Swin2SR architecture");
        };
        let shape = SwinShape {
            channels,
            features,
            window,
            mlp_hidden,
            upsampler,
            upsample_features,
            scale,
            three_conv,
        };
        let embed = vp.pp("patch_embed");
        let auxiliary = auxiliary
            .then(|| Auxiliary::load(vp, channels, upsample_features))
            .transpose()?;
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            embed_projection: Conv2d::load(&embed.pp("proj"), features, features, 1, 1, 0)?,
            embed_norm: patch_norm
                .then(|| LayerNorm::load(&embed.pp("norm"), features, LAYER_NORM_EPS))
                .transpose()?,
            groups: (0..groups)
                .map(|g| Group::load(&vp.pp("layers").pp(g), &shape))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body: ResidualConv::load(&vp.pp("conv_after_body"), features, three_conv)?,
            tail: Tail::load(vp, &shape)?,
            auxiliary,
            mean: image_mean(channels, vp),
            range: value_range(window),
            window,
            shift: shift_for(image_size, window),
            scale,
        })
    }

    /// The body on the first convolution's [B, C, H, W] output.
    fn features(&self, first: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let windows = Windows::of(first, self.window, self.shift);
        through_groups(
            embed(&self.embed_projection.forward(first)),
            self.embed_norm.as_ref(),
            (&self.groups, between),
            |group, x, between| group.forward(x, &windows, between),
            &self.norm,
            &windows,
        )
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2] * self.scale, size[3] * self.scale);
        let input = (pad_to_windows(image, self.window) - &self.mean) * self.range;
        let first = self.first.forward(&input);
        let body = self.after_body.forward(&self.features(&first, between)?) + &first;
        let output = match (&self.auxiliary, &self.tail) {
            (
                Some(auxiliary),
                Tail::PixelShuffle {
                    before,
                    rounds,
                    last,
                },
            ) => {
                // The padded input resized to the unpadded output's size, as the
                // reference resizes it.
                let resized = input.upsample_bicubic2d([height, width], false, None, None);
                let bicubic = auxiliary.bicubic.forward(&resized);
                let y = leaky_in_place(before.forward(&body), DEFAULT_SLOPE);
                let aux = auxiliary.aux.forward(&y);
                let y = leaky_in_place(auxiliary.after_aux.forward(&aux), DEFAULT_SLOPE);
                let y = rounds
                    .iter()
                    .fold(y, |y, (conv, f)| conv.forward(&y).pixel_shuffle(*f));
                let y = y.narrow(2, 0, height).narrow(3, 0, width) + bicubic;
                last.forward(&y)
            }
            _ => self.tail.forward(&body, &input, self.scale),
        };
        let output = output / self.range + &self.mean;
        Ok(output.narrow(2, 0, height).narrow(3, 0, width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets equal the reference's `relative_coords_table` for a 3-pixel window:
    /// offsets of ±1 and ±2 scaled to ±4 and ±8, then `sign·log2(|x| + 1) / 3`.
    #[test]
    fn offsets_are_log_spaced_as_the_reference_spaces_them() {
        let offsets = log_spaced_offsets(3);
        assert_eq!(offsets.size(), [25, 2]);
        let (four, eight) = (5f32.log2() / 3.0, 9f32.log2() / 3.0);
        for (row, expected) in [
            (0, [-eight, -eight]),
            (7, [-four, 0.0]),
            (13, [0.0, four]),
            (24, [eight, eight]),
        ] {
            let actual = Vec::<f32>::try_from(offsets.get(row)).expect("row");
            for (a, e) in actual.iter().zip(expected) {
                assert!(
                    (a - e).abs() < 1e-6,
                    "row {row}: {actual:?}, expected {expected:?}"
                );
            }
        }
    }
}
