//! The gated depthwise-convolution feed-forward network (Restormer's `FeedForward`) that
//! OmniSR's and DITN's blocks use: a 1×1 convolution to twice the hidden width, a
//! depthwise 3×3 one, GELU of the first half times the second, a 1×1 convolution back.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

pub struct GatedDconvFeedForward {
    project_in: SameConv,
    depthwise: SameConv,
    project_out: SameConv,
}

impl GatedDconvFeedForward {
    /// The network under `vp` (`project_in`, `dwconv`, `project_out`) from `dim` channels
    /// through `hidden`, its biases read where `bias`.
    pub fn load(vp: &VarPath, dim: i64, hidden: i64, bias: bool) -> Result<Self> {
        Ok(Self {
            project_in: SameConv::load(&vp.pp("project_in"), [dim, 2 * hidden], 1, 1, bias)?,
            depthwise: SameConv::depthwise(&vp.pp("dwconv"), 2 * hidden, 3, bias)?,
            project_out: SameConv::load(&vp.pp("project_out"), [hidden, dim], 1, 1, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let hidden = self.depthwise.forward(&self.project_in.forward(x));
        let halves = hidden.chunk(2, 1);
        let mut gated = halves[0].gelu("none");
        let _ = gated.g_mul_(&halves[1]);
        self.project_out.forward(&gated)
    }
}
