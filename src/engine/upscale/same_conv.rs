//! A stride-1 convolution padded to keep the size, in groups, with or without bias: the
//! layers OmniSR builds with `bias=False` or as depthwise ones.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::weights::VarPath;

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

    /// A depthwise `kernel`×`kernel` convolution over `channels`.
    pub fn depthwise(vp: &VarPath, channels: i64, kernel: i64, bias: bool) -> Result<Self> {
        Self::load(vp, [channels, channels], kernel, channels, bias)
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
