//! SwinIR, as spandrel runs it (`SwinIR/__arch/SwinIR.py`, in eval mode): the image
//! padded to whole windows, a first convolution, residual groups of Swin transformer
//! blocks (`swin.rs`) each closed by a convolution, a layer norm, then the upsampler of
//! the file.

use tch::{Kind, Tensor};

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm};
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::layout::{Architecture, SwinUpsampler};
use crate::engine::upscale::swin::{
    count_blocks, embed, pad_to_windows, shift_for, table_heads, through_groups, unembed, Block,
    Windows, LAYER_NORM_EPS,
};
use crate::engine::weights::VarPath;

/// The mean SwinIR and HAT subtract from RGB images (not in the file).
pub(super) const RGB_MEAN: [f32; 3] = [0.4488, 0.4371, 0.4040];
/// The mean the transformers subtract from an image of `channels` channels, [1, C, 1, 1]
/// on `vp`'s device and kind: SwinIR's RGB mean, zero otherwise.
pub(super) fn image_mean(channels: i64, vp: &VarPath) -> Tensor {
    let mean = match channels {
        3 => Tensor::from_slice(&RGB_MEAN).view([1, 3, 1, 1]),
        _ => Tensor::zeros([1, 1, 1, 1], (Kind::Float, tch::Device::Cpu)),
    };
    mean.to_device(vp.device()).to_kind(vp.kind())
}

/// The range SwinIR and Swin2SR work in: spandrel's rule, 0–255 for the JPEG models, the
/// only ones with 7-pixel windows.
pub(super) fn value_range(window: i64) -> f64 {
    if window == 7 {
        255.0
    } else {
        1.0
    }
}

/// The residual convolutions' and the nearest upsampler's LeakyReLU slope.
const SLOPE: f64 = 0.2;
/// `conv_before_upsample`'s LeakyReLU, PyTorch's default slope.
const BEFORE_UPSAMPLE_SLOPE: f64 = 0.01;

/// The convolution closing a group and the body: one 3×3, or 3×3–1×1–3×3 through a
/// quarter of the width (`3conv`).
pub(super) enum ResidualConv {
    One(Conv2d),
    Three([Conv2d; 3]),
}

impl ResidualConv {
    pub(super) fn load(vp: &VarPath, dim: i64, three: bool) -> Result<Self> {
        if !three {
            return Ok(Self::One(Conv2d::load(vp, dim, dim, 3, 1, 1)?));
        }
        let quarter = dim / 4;
        Ok(Self::Three([
            Conv2d::load(&vp.pp(0), dim, quarter, 3, 1, 1)?,
            Conv2d::load(&vp.pp(2), quarter, quarter, 1, 1, 0)?,
            Conv2d::load(&vp.pp(4), quarter, dim, 3, 1, 1)?,
        ]))
    }

    /// Closes a group: the convolution on the group's output tokens `y` (of an
    /// `height`×`width` image) added to the group's input tokens `x`.
    pub(super) fn close_group(&self, y: &Tensor, x: &Tensor, height: i64, width: i64) -> Tensor {
        embed(&self.forward(&unembed(y, height, width))) + x
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::One(conv) => conv.forward(x),
            Self::Three([a, b, c]) => {
                let y = leaky_in_place(a.forward(x), SLOPE);
                c.forward(&leaky_in_place(b.forward(&y), SLOPE))
            }
        }
    }
}

/// A residual Swin transformer group (`RSTB`).
struct Group {
    blocks: Vec<Block>,
    conv: ResidualConv,
}

impl Group {
    fn load(vp: &VarPath, shape: &SwinShape) -> Result<Self> {
        let blocks_path = vp.pp("residual_group").pp("blocks");
        let depth = count_blocks(&blocks_path);
        let heads = table_heads(&blocks_path.pp(0).pp("attn"));
        let blocks = (0..depth)
            .map(|b| {
                let block = blocks_path.pp(b);
                let (dim, window, hidden) = (shape.features, shape.window, shape.mlp_hidden);
                Block::load(&block, dim, heads, window, hidden, b % 2 == 1)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            conv: ResidualConv::load(&vp.pp("conv"), shape.features, shape.three_conv)?,
        })
    }

    fn forward(&self, x: &Tensor, windows: &Windows, between: &mut Between<'_>) -> Result<Tensor> {
        let y = in_turn(x.shallow_clone(), &self.blocks, between, |block, y| {
            block.forward(y, windows)
        })?;
        Ok(self.conv.close_group(&y, x, windows.height, windows.width))
    }
}

/// The layers after the body.
pub(super) enum Tail {
    PixelShuffle {
        before: Conv2d,
        rounds: Vec<(Conv2d, i64)>,
        last: Conv2d,
    },
    Direct(Conv2d),
    NearestConv {
        before: Conv2d,
        rounds: Vec<Conv2d>,
        hr: Conv2d,
        last: Conv2d,
    },
    Residual(Conv2d),
}

impl Tail {
    pub(super) fn load(vp: &VarPath, shape: &SwinShape) -> Result<Self> {
        let SwinShape {
            channels,
            features,
            upsample_features: width,
            scale,
            ..
        } = *shape;
        let conv3 = |name: &str, input: i64, output: i64| {
            Conv2d::load(&vp.pp(name), input, output, 3, 1, 1)
        };
        let before = || {
            Conv2d::load(
                &vp.pp("conv_before_upsample").pp(0),
                features,
                width,
                3,
                1,
                1,
            )
        };
        Ok(match shape.upsampler {
            SwinUpsampler::PixelShuffle => {
                let factors = if scale == 3 {
                    vec![3]
                } else {
                    vec![2; scale.trailing_zeros() as usize]
                };
                let rounds = factors
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let conv = vp.pp("upsample").pp(2 * i);
                        Ok((Conv2d::load(&conv, width, f * f * width, 3, 1, 1)?, f))
                    })
                    .collect::<Result<_>>()?;
                Tail::PixelShuffle {
                    before: before()?,
                    rounds,
                    last: conv3("conv_last", width, channels)?,
                }
            }
            SwinUpsampler::PixelShuffleDirect => Tail::Direct(Conv2d::load(
                &vp.pp("upsample").pp(0),
                features,
                scale * scale * channels,
                3,
                1,
                1,
            )?),
            SwinUpsampler::NearestConv => Tail::NearestConv {
                before: before()?,
                rounds: (1..=scale.trailing_zeros())
                    .map(|n| conv3(&format!("conv_up{n}"), width, width))
                    .collect::<Result<_>>()?,
                hr: conv3("conv_hr", width, width)?,
                last: conv3("conv_last", width, channels)?,
            },
            SwinUpsampler::Residual => Tail::Residual(conv3("conv_last", features, channels)?),
        })
    }

    /// The image (normalised, padded) from the body's output `x` and the padded input.
    pub(super) fn forward(&self, x: &Tensor, input: &Tensor, scale: i64) -> Tensor {
        match self {
            Tail::PixelShuffle {
                before,
                rounds,
                last,
            } => {
                let y = leaky_in_place(before.forward(x), BEFORE_UPSAMPLE_SLOPE);
                let y = rounds
                    .iter()
                    .fold(y, |y, (conv, f)| conv.forward(&y).pixel_shuffle(*f));
                last.forward(&y)
            }
            Tail::Direct(conv) => conv.forward(x).pixel_shuffle(scale),
            Tail::NearestConv {
                before,
                rounds,
                hr,
                last,
            } => {
                let y = leaky_in_place(before.forward(x), BEFORE_UPSAMPLE_SLOPE);
                let y = rounds.iter().fold(y, |y, conv| {
                    let size = y.size();
                    let doubled = y.upsample_nearest2d([size[2] * 2, size[3] * 2], 2.0, 2.0);
                    leaky_in_place(conv.forward(&doubled), SLOPE)
                });
                last.forward(&leaky_in_place(hr.forward(&y), SLOPE))
            }
            Tail::Residual(last) => input + last.forward(x),
        }
    }
}

/// The hyperparameters the modules are built from.
#[derive(Clone, Copy)]
pub(super) struct SwinShape {
    pub channels: i64,
    pub features: i64,
    pub window: i64,
    pub mlp_hidden: i64,
    pub upsampler: SwinUpsampler,
    pub upsample_features: i64,
    pub scale: i64,
    pub three_conv: bool,
}

/// SwinIR.
pub struct SwinIr {
    first: Conv2d,
    embed_norm: LayerNorm,
    groups: Vec<Group>,
    norm: LayerNorm,
    after_body: ResidualConv,
    tail: Tail,
    mean: Tensor,
    range: f64,
    window: i64,
    /// The shifted blocks' shift (0 where the training size fit in one window).
    shift: i64,
    scale: i64,
}

impl SwinIr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::SwinIr {
            channels,
            features,
            groups,
            window,
            mlp_hidden,
            image_size,
            upsampler,
            upsample_features,
            scale,
            three_conv,
            ..
        } = architecture
        else {
            unreachable!("a SwinIR architecture");
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
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            embed_norm: LayerNorm::load(
                &vp.pp("patch_embed").pp("norm"),
                features,
                LAYER_NORM_EPS,
            )?,
            groups: (0..groups)
                .map(|g| Group::load(&vp.pp("layers").pp(g), &shape))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body: ResidualConv::load(&vp.pp("conv_after_body"), features, three_conv)?,
            tail: Tail::load(vp, &shape)?,
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
            embed(first),
            Some(&self.embed_norm),
            (&self.groups, between),
            |group, x, between| group.forward(x, &windows, between),
            &self.norm,
            &windows,
        )
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let input = (pad_to_windows(image, self.window) - &self.mean) * self.range;
        let first = self.first.forward(&input);
        let body = self.after_body.forward(&self.features(&first, between)?) + &first;
        let output = self.tail.forward(&body, &input, self.scale) / self.range + &self.mean;
        Ok(output
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}
