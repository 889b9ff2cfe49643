//! A depthwise convolution of a rectangular kernel with its bias, padded to keep the
//! size: MoESR's inception bands, SeemoRe's striped convolutions.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::weights::VarPath;

/// A depthwise convolution of a `[rows, columns]` kernel, padded to keep the size.
pub struct BandConv {
    weight: Tensor,
    bias: Tensor,
    padding: [i64; 2],
    channels: i64,
}

impl BandConv {
    pub fn load(vp: &VarPath, channels: i64, [rows, columns]: [i64; 2]) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[channels, 1, rows, columns])?,
            bias: vp.get("bias", &[channels])?,
            padding: [rows / 2, columns / 2],
            channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [1, 1],
            self.padding,
            [1, 1],
            self.channels,
        )
    }
}
