//! A depthwise convolution with bias (one group per channel), padded to keep the size:
//! SAFMN's modulation levels and MoSR's gated blocks.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::weights::VarPath;

/// `nn.Conv2d(c, c, k, 1, k // 2, groups=c)`.
pub struct Depthwise {
    weight: Tensor,
    bias: Tensor,
    channels: i64,
    padding: i64,
}

impl Depthwise {
    /// The `kernel`×`kernel` convolution under `vp` over `channels`.
    pub fn load(vp: &VarPath, channels: i64, kernel: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[channels, 1, kernel, kernel])?,
            bias: vp.get("bias", &[channels])?,
            channels,
            padding: kernel / 2,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let padding = [self.padding, self.padding];
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [1, 1],
            padding,
            [1, 1],
            self.channels,
        )
    }
}
