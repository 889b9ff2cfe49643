//! A stride-1 convolution padded to keep the size, in groups, with or without bias or
//! with its inference batch norm folded in: OmniSR's bias-free layers, the depthwise
//! ones of SAFMN, MoSR, OmniSR, DAT and RGT, DAT's, Swift-SRGAN's and DnCNN's batch-normed ones.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::preprocess::efficientnet::fold_batch_norm;
use crate::engine::weights::VarPath;

/// `nn.BatchNorm2d`'s epsilon.
const BATCH_NORM_EPS: f64 = 1e-5;

/// `nn.Conv2d(input, output, k, 1, k // 2, groups=groups, bias=bias)`.
pub struct SameConv {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: i64,
    groups: i64,
}

impl SameConv {
    /// The `kernel`×`kernel` convolution under `vp`, its bias read where `bias`.
    pub fn load(
        vp: &VarPath,
        [input, output]: [i64; 2],
        kernel: i64,
        groups: i64,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[output, input / groups, kernel, kernel])?,
            bias: bias.then(|| vp.get("bias", &[output])).transpose()?,
            padding: kernel / 2,
            groups,
        })
    }

    /// The convolution of the square kernels `weight` and `bias`, in `groups`.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, groups: i64) -> Self {
        let padding = weight.size()[3] / 2;
        Self {
            weight,
            bias,
            padding,
            groups,
        }
    }

    /// As [`Self::load`], the inference batch norm under `norm` folded in.
    pub fn folded(
        vp: &VarPath,
        [input, output]: [i64; 2],
        kernel: i64,
        groups: i64,
        bias: bool,
        norm: &VarPath,
    ) -> Result<Self> {
        Self::load(vp, [input, output], kernel, groups, bias)?.normed(norm, BATCH_NORM_EPS)
    }

    /// The convolution with the inference batch norm under `norm` (of epsilon `eps`)
    /// after it folded in.
    pub fn normed(self, norm: &VarPath, eps: f64) -> Result<Self> {
        let (weight, bias) = fold_batch_norm(norm, self.weight, self.bias, eps)?;
        Ok(Self {
            weight,
            bias: Some(bias),
            ..self
        })
    }

    /// The convolution with its outputs in `order` (a permutation of their indices): a
    /// channel permutation after it, folded in.
    pub fn with_output_order(self, order: &Tensor) -> Self {
        Self {
            weight: self.weight.index_select(0, order),
            bias: self.bias.map(|bias| bias.index_select(0, order)),
            ..self
        }
    }

    /// A depthwise `kernel`×`kernel` convolution over `channels`.
    pub fn depthwise(vp: &VarPath, channels: i64, kernel: i64, bias: bool) -> Result<Self> {
        Self::load(vp, [channels, channels], kernel, channels, bias)
    }

    pub fn output_channels(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let padding = [self.padding, self.padding];
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [1, 1],
            padding,
            [1, 1],
            self.groups,
        )
    }
}
