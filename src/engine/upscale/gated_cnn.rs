//! MambaOut's gated CNN block (`GatedCNNBlock`) as MoSR and MoESR build it: a channel
//! layer norm, a 3×3 convolution to twice the hidden width split into a gate, an
//! identity part and a depthwise-convolved part, the Mish-activated gate times the other
//! two, a 3×3 convolution back, Mish, then (MoESR) a learned per-channel scale, plus the
//! input (MoSR: less 0.5).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::band_conv::BandConv;
use crate::engine::upscale::channel_norm::ChannelNorm;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The inception depthwise convolution's branches: the fraction of the channels each
/// takes, its square kernel and its band kernel (`InceptionDWConv2d`'s defaults, which
/// MoESR keeps).
const BRANCH_RATIO: f64 = 0.125;
const SQUARE_KERNEL: i64 = 3;
const BAND_KERNEL: i64 = 11;

/// `InceptionDWConv2d`: the first channels unchanged, then three equal branches through
/// a square, a horizontal band and a vertical band depthwise convolution.
struct InceptionDepthwise {
    branches: [BandConv; 3],
    branch: i64,
}

impl InceptionDepthwise {
    fn load(vp: &VarPath, channels: i64) -> Result<Self> {
        let branch = (channels as f64 * BRANCH_RATIO) as i64;
        Ok(Self {
            branches: [
                BandConv::load(&vp.pp("dwconv_hw"), branch, [SQUARE_KERNEL; 2])?,
                BandConv::load(&vp.pp("dwconv_w"), branch, [1, BAND_KERNEL])?,
                BandConv::load(&vp.pp("dwconv_h"), branch, [BAND_KERNEL, 1])?,
            ],
            branch,
        })
    }

    /// `target` multiplied in place by the convolution of `x` (the reference's
    /// concatenation of the unchanged part and the branches, never built).
    fn multiply_into(&self, target: &Tensor, x: &Tensor) {
        let identity = x.size()[1] - 3 * self.branch;
        let _ = target
            .narrow(1, 0, identity)
            .g_mul_(&x.narrow(1, 0, identity));
        for (i, conv) in self.branches.iter().enumerate() {
            let start = identity + i as i64 * self.branch;
            let branch = conv.forward(&x.narrow(1, start, self.branch));
            let _ = target.narrow(1, start, self.branch).g_mul_(&branch);
        }
    }
}

/// The convolution of the block's third part.
enum TokenMixer {
    /// MoSR's: one square depthwise convolution.
    Depthwise(SameConv),
    /// MoESR's: the inception depthwise convolution.
    Inception(InceptionDepthwise),
}

impl TokenMixer {
    /// `target` multiplied in place by the mixer's output on `x`.
    fn multiply_into(&self, target: &Tensor, x: &Tensor) {
        match self {
            TokenMixer::Depthwise(conv) => {
                let _ = target.shallow_clone().g_mul_(&conv.forward(x));
            }
            TokenMixer::Inception(conv) => conv.multiply_into(target, x),
        }
    }
}

/// One `GatedCNNBlock`.
pub struct GatedCnnBlock {
    norm: ChannelNorm,
    fc1: Conv2d,
    mixer: TokenMixer,
    fc2: Conv2d,
    /// MoESR's learned per-channel scale of the block's output.
    gamma: Option<Tensor>,
    /// What the residual subtracts from the input (MoSR's 0.5).
    residual_offset: f64,
    hidden: i64,
    conv_channels: i64,
}

impl GatedCnnBlock {
    /// MoSR's block: `conv_channels` of the hidden ones through a `kernel`-sided
    /// depthwise convolution, the input less 0.5 added.
    pub fn mosr(
        vp: &VarPath,
        [dim, hidden]: [i64; 2],
        conv_channels: i64,
        kernel: i64,
        residual_offset: f64,
    ) -> Result<Self> {
        let conv = SameConv::depthwise(&vp.pp("conv"), conv_channels, kernel, true)?;
        Self::load(
            vp,
            [dim, hidden],
            conv_channels,
            TokenMixer::Depthwise(conv),
            None,
        )
        .map(|block| Self {
            residual_offset,
            ..block
        })
    }

    /// MoESR's block: as many channels as the features through the inception depthwise
    /// convolution, the output scaled by `gamma`.
    pub fn moesr(vp: &VarPath, [dim, hidden]: [i64; 2]) -> Result<Self> {
        let mixer = TokenMixer::Inception(InceptionDepthwise::load(&vp.pp("conv"), dim)?);
        let gamma = vp.get("gamma", &[1, dim, 1, 1])?;
        Self::load(vp, [dim, hidden], dim, mixer, Some(gamma))
    }

    fn load(
        vp: &VarPath,
        [dim, hidden]: [i64; 2],
        conv_channels: i64,
        mixer: TokenMixer,
        gamma: Option<Tensor>,
    ) -> Result<Self> {
        Ok(Self {
            norm: ChannelNorm::load(&vp.pp("norm"), dim)?,
            fc1: Conv2d::load(&vp.pp("fc1"), dim, 2 * hidden, 3, 1, 1)?,
            mixer,
            fc2: Conv2d::load(&vp.pp("fc2"), hidden, dim, 3, 1, 1)?,
            gamma,
            residual_offset: 0.0,
            hidden,
            conv_channels,
        })
    }

    /// The gate's product is written into the activated gate part by part, and the
    /// tail applied in place: the reference's values, without its concatenation and
    /// intermediate copies.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let projected = self.fc1.forward(&self.norm.forward(x));
        let (hidden, convolved) = (self.hidden, self.conv_channels);
        let identity = hidden - convolved;
        let gated = projected.narrow(1, 0, hidden).mish();
        let _ = gated
            .narrow(1, 0, identity)
            .g_mul_(&projected.narrow(1, hidden, identity));
        let mixed = projected.narrow(1, 2 * hidden - convolved, convolved);
        self.mixer
            .multiply_into(&gated.narrow(1, identity, convolved), &mixed);
        let mut out = self.fc2.forward(&gated);
        let _ = out.mish_();
        if let Some(gamma) = &self.gamma {
            let _ = out.g_mul_(gamma);
        }
        if self.residual_offset == 0.0 {
            let _ = out.g_add_(x);
        } else {
            let _ = out.g_add_(&(x - self.residual_offset));
        }
        out
    }
}
