//! The channel layer norm RealPLKSR and SAFMN define (`LayerNorm` with
//! `data_format="channels_first"`): each pixel's channels normalised over dim 1 with the
//! biased variance, epsilon 1e-6 (Restormer's `WithBias_LayerNorm` in CRAFT: 1e-5).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::weights::VarPath;

/// The references' epsilon.
const EPS: f64 = 1e-6;

/// A channel layer norm with its per-channel scale and shift.
pub struct ChannelNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl ChannelNorm {
    /// The norm under `vp` over `channels`.
    pub fn load(vp: &VarPath, channels: i64) -> Result<Self> {
        Self::with_eps(vp, channels, EPS)
    }

    /// The norm under `vp` over `channels`, `eps` added to the variance.
    pub fn with_eps(vp: &VarPath, channels: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[channels])?.view([1, -1, 1, 1]),
            bias: vp.get("bias", &[channels])?.view([1, -1, 1, 1]),
            eps,
        })
    }

    /// Normalises an NCHW tensor over its channels.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let centred = x - x.mean_dim(1, true, None);
        let variance = centred.square().mean_dim(1, true, None);
        centred / (variance + self.eps).sqrt() * &self.weight + &self.bias
    }
}
