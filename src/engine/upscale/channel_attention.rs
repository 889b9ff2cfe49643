//! Channel attention (squeeze and excitation) as RCAN's `CALayer`, HAT's
//! `ChannelAttention` and Real-CUGAN's `SEBlock` compute it.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::weights::VarPath;

/// Each channel weighted by a sigmoid of the channels' means through two 1×1
/// convolutions (to a narrower width, ReLU, back).
pub struct ChannelAttention {
    squeeze: Conv2d,
    excite: Conv2d,
}

impl ChannelAttention {
    /// The convolutions at `squeeze` (`width` to `squeezed` channels) and `excite` (back).
    pub fn load(squeeze: &VarPath, excite: &VarPath, width: i64, squeezed: i64) -> Result<Self> {
        Ok(Self {
            squeeze: Conv2d::load(squeeze, width, squeezed, 1, 1, 0)?,
            excite: Conv2d::load(excite, squeezed, width, 1, 1, 0)?,
        })
    }

    /// `x` [B, C, H, W] weighted per channel, in place.
    pub fn forward(&self, mut x: Tensor) -> Tensor {
        let means = x.mean_dim([2i64, 3].as_slice(), true, None);
        let weights = self
            .excite
            .forward(&self.squeeze.forward(&means).relu())
            .sigmoid();
        let _ = x.g_mul_(&weights);
        x
    }
}
