//! SeemoRe, as spandrel runs it (`SeemoRe/__arch/seemore_arch.py`, in eval mode): the
//! image less the DIV2K mean, a 3×3 convolution, groups of a local block (the mixture of
//! low-rank experts: a projection split into features and a key, the features through a
//! striped depthwise convolution, the key calibrated by its own strided summary, each
//! image routed to its top expert, whose output joins the features weighted by the
//! router's softmax) and a global block (a striped depthwise convolution over 11 pixels
//! gating values), each with a gated feed-forward network; a channel layer norm, a
//! convolution plus the first one's output, a pixel shuffle, the mean added back.

use tch::{Kind, Tensor};

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, Linear};
use crate::engine::upscale::band_conv::BandConv;
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The DIV2K channel means the reference shifts the image by.
const MEAN: [f32; 3] = [0.4488, 0.4371, 0.4040];
/// The calibration's strided summary: a depthwise 4×4 convolution of stride 4.
const SUMMARY: i64 = 4;

/// `StripedConv2d` (depthwise): a 1×k then a k×1 convolution.
struct Striped([BandConv; 2]);

impl Striped {
    fn load(vp: &VarPath, channels: i64, kernel: i64) -> Result<Self> {
        let conv = vp.pp("conv");
        Ok(Self([
            BandConv::load(&conv.pp(0), channels, [1, kernel])?,
            BandConv::load(&conv.pp(1), channels, [kernel, 1])?,
        ]))
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.0[1].forward(&self.0[0].forward(x))
    }
}

/// `GatedFFN`: a 1×1 convolution to twice the width and GELU, halves of which one gates
/// the other through a depthwise 3×3 convolution, a 1×1 convolution back and GELU.
struct GatedFeedForward {
    widen: Conv2d,
    gate: SameConv,
    narrow: Conv2d,
}

impl GatedFeedForward {
    fn load(vp: &VarPath, dim: i64) -> Result<Self> {
        Ok(Self {
            widen: Conv2d::load(&vp.pp("fn_1").pp(0), dim, 2 * dim, 1, 1, 0)?,
            gate: SameConv::depthwise(&vp.pp("gate"), dim, 3, true)?,
            narrow: Conv2d::load(&vp.pp("fn_2").pp(0), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let widened = self.widen.forward(x).gelu("none");
        let dim = widened.size()[1] / 2;
        let gated = widened.narrow(1, 0, dim) * self.gate.forward(&widened.narrow(1, dim, dim));
        self.narrow.forward(&gated).gelu("none")
    }
}

/// The calibration's summary: a depthwise 4×4 convolution of stride 4, unpadded.
struct StridedSummary {
    weight: Tensor,
    bias: Tensor,
    channels: i64,
}

impl StridedSummary {
    fn load(vp: &VarPath, channels: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[channels, 1, SUMMARY, SUMMARY])?,
            bias: vp.get("bias", &[channels])?,
            channels,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let stride = [SUMMARY, SUMMARY];
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            stride,
            [0, 0],
            [1, 1],
            self.channels,
        )
    }
}

/// One low-rank `Expert`: the features and the key each projected to the low rank,
/// their product projected back.
struct Expert([Conv2d; 3]);

impl Expert {
    fn load(vp: &VarPath, dim: i64, low: i64) -> Result<Self> {
        Ok(Self([
            Conv2d::load(&vp.pp("conv_1"), dim, low, 1, 1, 0)?,
            Conv2d::load(&vp.pp("conv_2"), dim, low, 1, 1, 0)?,
            Conv2d::load(&vp.pp("conv_3"), low, dim, 1, 1, 0)?,
        ]))
    }

    fn forward(&self, x: &Tensor, key: &Tensor) -> Tensor {
        let [features, keyed, back] = &self.0;
        back.forward(&(keyed.forward(key) * features.forward(x)))
    }
}

/// `MoEBlock`.
struct MixtureBlock {
    /// A 3×3 convolution, GELU, a 1×1 convolution to twice the width (its outputs
    /// permuted at load as the channel shuffle would permute them).
    project: (Conv2d, SameConv),
    features: Striped,
    summary: StridedSummary,
    /// The calibration's depthwise 3×3 and 1×1 convolutions.
    calibrate: (SameConv, Conv2d),
    rounds: i64,
    router: Linear,
    experts: Vec<Expert>,
    out: Conv2d,
}

impl MixtureBlock {
    fn load(vp: &VarPath, architecture: &Architecture) -> Result<Self> {
        let Architecture::SeemoRe {
            features: dim,
            experts,
            growth,
            shuffle,
            calibration_rounds,
            ..
        } = *architecture
        else {
            unreachable!("a SeemoRe architecture");
        };
        let conv_1 = vp.pp("conv_1");
        let widen = SameConv::load(&conv_1.pp(2), [dim, 2 * dim], 1, 1, true)?;
        let moe = vp.pp("moe_layer");
        Ok(Self {
            project: (
                Conv2d::load(&conv_1.pp(0), dim, dim, 3, 1, 1)?,
                if shuffle { shuffled(widen) } else { widen },
            ),
            features: Striped::load(&vp.pp("conv_2").pp(0), dim, 3)?,
            summary: StridedSummary::load(&vp.pp("agg_conv").pp(0), dim)?,
            calibrate: (
                SameConv::depthwise(&vp.pp("conv").pp(0), dim, 3, true)?,
                Conv2d::load(&vp.pp("conv").pp(1), dim, dim, 1, 1, 0)?,
            ),
            rounds: calibration_rounds,
            router: Linear::load(&moe.pp("gate").pp("body").pp(2), dim, experts, false)?,
            experts: (0..experts)
                .map(|i| Expert::load(&moe.pp("experts").pp(i), dim, growth.width(i)))
                .collect::<Result<_>>()?,
            out: Conv2d::load(&vp.pp("proj"), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (first, widen) = &self.project;
        let projected = widen.forward(&first.forward(x).gelu("none"));
        let dim = projected.size()[1] / 2;
        let features = self
            .features
            .forward(&projected.narrow(1, 0, dim))
            .gelu("none");
        let key = self.calibrated(&projected.narrow(1, dim, dim));
        self.out.forward(&self.mixed(&features, &key))
    }

    /// `calibrate`: the key plus its strided summary, convolved and enlarged back
    /// bilinearly.
    fn calibrated(&self, key: &Tensor) -> Tensor {
        let size = key.size();
        let mut summary = key.shallow_clone();
        for _ in 0..self.rounds {
            summary = self.summary.forward(&summary).gelu("none");
        }
        let (depthwise, pointwise) = &self.calibrate;
        let summary = pointwise.forward(&depthwise.forward(&summary));
        key + summary.upsample_bilinear2d([size[2], size[3]], false, None, None)
    }

    /// `MoELayer` in eval mode with one expert: each image's features plus its top
    /// expert's output times that expert's softmax weight.
    fn mixed(&self, features: &Tensor, key: &Tensor) -> Tensor {
        let pooled = features.mean_dim([2i64, 3].as_slice(), false, None);
        let weights = self.router.forward(&pooled).softmax(1, Kind::Float);
        let (top, chosen) = weights.max_dim(1, false);
        let batch = features.size()[0];
        let images = (0..batch).map(|b| {
            let (x, k) = (features.narrow(0, b, 1), key.narrow(0, b, 1));
            let expert = &self.experts[i64::try_from(chosen.get(b)).unwrap_or(0) as usize];
            let weight = top.get(b).to_kind(x.kind());
            &x + expert.forward(&x, &k) * weight
        });
        let mut images: Vec<Tensor> = images.collect();
        match images.pop() {
            Some(image) if batch == 1 => image,
            last => {
                images.extend(last);
                Tensor::cat(&images, 0)
            }
        }
    }
}

/// The channel shuffle of `conv`'s output in two groups (`channel_shuffle`), folded
/// into its weights: output `2i + g` is the unshuffled output `g * half + i`.
fn shuffled(conv: SameConv) -> SameConv {
    let width = conv.output_channels();
    let half = width / 2;
    let order: Vec<i64> = (0..width).map(|j| (j % 2) * half + j / 2).collect();
    conv.with_output_order(&Tensor::from_slice(&order))
}

/// `RME` and `SME`: a block and the gated feed-forward network, each on its own channel
/// norm and added to its input.
struct Residual<B> {
    norm_1: ChannelNorm,
    block: B,
    norm_2: ChannelNorm,
    ffn: GatedFeedForward,
}

impl<B> Residual<B> {
    fn load(vp: &VarPath, dim: i64, block: B) -> Result<Self> {
        Ok(Self {
            norm_1: ChannelNorm::load(&vp.pp("norm_1"), dim)?,
            block,
            norm_2: ChannelNorm::load(&vp.pp("norm_2"), dim)?,
            ffn: GatedFeedForward::load(&vp.pp("ffn"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, block: impl Fn(&B, &Tensor) -> Tensor) -> Tensor {
        let x = block(&self.block, &self.norm_1.forward(x)) + x;
        self.ffn.forward(&self.norm_2.forward(&x)) + x
    }
}

/// `StripedConvFormer`: a 1×1 convolution to twice the width and GELU, the first half
/// through the striped depthwise convolution times the second, a 1×1 convolution.
struct StripedFormer {
    to_qv: Conv2d,
    attention: Striped,
    out: Conv2d,
}

impl StripedFormer {
    fn load(vp: &VarPath, dim: i64, kernel: i64) -> Result<Self> {
        Ok(Self {
            to_qv: Conv2d::load(&vp.pp("to_qv").pp(0), dim, 2 * dim, 1, 1, 0)?,
            attention: Striped::load(&vp.pp("attn"), dim, kernel)?,
            out: Conv2d::load(&vp.pp("proj"), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let qv = self.to_qv.forward(x).gelu("none");
        let dim = qv.size()[1] / 2;
        let q = self.attention.forward(&qv.narrow(1, 0, dim));
        self.out.forward(&(q * qv.narrow(1, dim, dim)))
    }
}

/// `ResGroup`: the local mixture block, then the global striped block.
struct Group {
    local: Residual<MixtureBlock>,
    global: Residual<StripedFormer>,
}

/// SeemoRe.
pub struct SeemoRe {
    first: Conv2d,
    groups: Vec<Group>,
    norm: ChannelNorm,
    last: Conv2d,
    upsample: Conv2d,
    scale: i64,
}

impl SeemoRe {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::SeemoRe {
            channels,
            features: dim,
            layers,
            kernel,
            scale,
            ..
        } = architecture
        else {
            unreachable!("a SeemoRe architecture");
        };
        let groups = (0..layers)
            .map(|g| {
                let group = vp.pp("body").pp(g);
                let (local, global) = (group.pp("local_block"), group.pp("global_block"));
                let mixture = MixtureBlock::load(&local.pp("block"), &architecture)?;
                let striped = StripedFormer::load(&global.pp("block"), dim, kernel)?;
                Ok(Group {
                    local: Residual::load(&local, dim, mixture)?,
                    global: Residual::load(&global, dim, striped)?,
                })
            })
            .collect::<Result<_>>()?;
        let shuffled = channels * scale * scale;
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_1"), channels, dim, 3, 1, 1)?,
            groups,
            norm: ChannelNorm::load(&vp.pp("norm"), dim)?,
            last: Conv2d::load(&vp.pp("conv_2"), dim, dim, 3, 1, 1)?,
            upsample: Conv2d::load(&vp.pp("upsampler").pp(0), dim, shuffled, 3, 1, 1)?,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let mean = Tensor::from_slice(&MEAN)
            .view([1, 3, 1, 1])
            .to_kind(image.kind())
            .to_device(image.device());
        let features = self.first.forward(&(image - &mean));
        let body = in_turn(
            features.shallow_clone(),
            &self.groups,
            between,
            |group, x| {
                let x = group.local.forward(x, MixtureBlock::forward);
                group.global.forward(&x, StripedFormer::forward)
            },
        )?;
        let x = self.last.forward(&self.norm.forward(&body)) + features;
        Ok(self.upsample.forward(&x).pixel_shuffle(self.scale) + mean)
    }
}
