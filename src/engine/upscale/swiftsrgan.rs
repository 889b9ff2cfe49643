//! Swift-SRGAN, as spandrel runs it (`SwiftSRGAN/__arch/SwiftSRGAN.py`, in eval mode):
//! depthwise-separable convolutions (a depthwise k×k, a pointwise 1×1; where a batch norm
//! follows, without biases and the norm folded into the pointwise one), PReLU; a 9×9
//! first layer, residual blocks of two 3×3 layers, one more plus the first layer's output,
//! ×2 pixel-shuffle rounds, a 9×9 last layer mapped from tanh's range into [0, 1].

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// The first and last layers' kernel side.
const OUTER_KERNEL: i64 = 9;

/// `SeperableConv2d`, its batch norm folded in where there is one.
struct Separable {
    depthwise: SameConv,
    pointwise: SameConv,
}

impl Separable {
    /// The layer under `vp` from `input` to `output` channels; `norm` the batch norm after
    /// it (then neither convolution has a bias).
    fn load(
        vp: &VarPath,
        [input, output]: [i64; 2],
        kernel: i64,
        norm: Option<&VarPath>,
    ) -> Result<Self> {
        let depthwise = SameConv::depthwise(&vp.pp("depthwise"), input, kernel, norm.is_none())?;
        let pointwise = vp.pp("pointwise");
        let pointwise = match norm {
            Some(norm) => SameConv::folded(&pointwise, [input, output], 1, 1, false, norm)?,
            None => SameConv::load(&pointwise, [input, output], 1, 1, true)?,
        };
        Ok(Self {
            depthwise,
            pointwise,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.pointwise.forward(&self.depthwise.forward(x))
    }
}

/// `ConvBlock`: the separable layer (under `cnn`), its batch norm (`bn`) where it has one,
/// PReLU (`act`) where it is activated.
struct ConvBlock {
    conv: Separable,
    slopes: Option<Tensor>,
}

impl ConvBlock {
    fn load(vp: &VarPath, widths: [i64; 2], kernel: i64, normed: bool, act: bool) -> Result<Self> {
        let norm = vp.pp("bn");
        Ok(Self {
            conv: Separable::load(&vp.pp("cnn"), widths, kernel, normed.then_some(&norm))?,
            slopes: act
                .then(|| vp.pp("act").get("weight", &[widths[1]]))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.conv.forward(x);
        match &self.slopes {
            Some(slopes) => y.prelu(slopes),
            None => y,
        }
    }
}

/// `ResidualBlock`: an activated and a plain block, plus the input.
struct Residual([ConvBlock; 2]);

/// A ×2 round: the separable layer to four times the width, the shuffle, PReLU.
struct Upsampling {
    conv: Separable,
    slopes: Tensor,
}

/// Swift-SRGAN's generator.
pub struct SwiftSrgan {
    initial: ConvBlock,
    residual: Vec<Residual>,
    convblock: ConvBlock,
    upsamplings: Vec<Upsampling>,
    last: Separable,
}

impl SwiftSrgan {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::SwiftSrgan {
            channels,
            features: f,
            blocks,
            upsamplings,
        } = architecture
        else {
            unreachable!("a Swift-SRGAN architecture");
        };
        let residual = (0..blocks)
            .map(|b| {
                let block = vp.pp("residual").pp(b);
                Ok(Residual([
                    ConvBlock::load(&block.pp("block1"), [f, f], 3, true, true)?,
                    ConvBlock::load(&block.pp("block2"), [f, f], 3, true, false)?,
                ]))
            })
            .collect::<Result<_>>()?;
        let upsamplings = (0..upsamplings)
            .map(|u| {
                let round = vp.pp("upsampler").pp(u);
                Ok(Upsampling {
                    conv: Separable::load(&round.pp("conv"), [f, 4 * f], 3, None)?,
                    slopes: round.pp("act").get("weight", &[f])?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            initial: ConvBlock::load(&vp.pp("initial"), [channels, f], OUTER_KERNEL, false, true)?,
            residual,
            convblock: ConvBlock::load(&vp.pp("convblock"), [f, f], 3, true, false)?,
            upsamplings,
            last: Separable::load(&vp.pp("final_conv"), [f, channels], OUTER_KERNEL, None)?,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let initial = self.initial.forward(image);
        let x = in_turn(
            initial.shallow_clone(),
            &self.residual,
            between,
            |Residual([first, second]), x| second.forward(&first.forward(x)) + x,
        )?;
        let x = self.convblock.forward(&x) + initial;
        let x = self.upsamplings.iter().fold(x, |x, round| {
            round.conv.forward(&x).pixel_shuffle(2).prelu(&round.slopes)
        });
        Ok((self.last.forward(&x).tanh() + 1.0) / 2.0)
    }
}
