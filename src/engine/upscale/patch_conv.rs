//! The ×2 resampling convolutions of the U-Nets (SCUNet, DRUNet, FBCNN, NAFNet): a 2×2
//! convolution of stride 2 down, a 2×2 transposed convolution of stride 2 up, neither
//! padded, with or without bias.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::weights::VarPath;

/// The side and stride of the patches.
const SIDE: i64 = 2;

/// `nn.Conv2d(input, output, 2, 2)` or `nn.ConvTranspose2d(input, output, 2, 2)`.
pub struct PatchConv {
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
}

impl PatchConv {
    /// The downsampling convolution under `vp`, its bias read where `bias`.
    pub fn down(vp: &VarPath, [input, output]: [i64; 2], bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[output, input, SIDE, SIDE])?,
            bias: bias.then(|| vp.get("bias", &[output])).transpose()?,
            transposed: false,
        })
    }

    /// The upsampling transposed convolution under `vp` (its weight stored [input,
    /// output, 2, 2]), its bias read where `bias`.
    pub fn up(vp: &VarPath, [input, output]: [i64; 2], bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[input, output, SIDE, SIDE])?,
            bias: bias.then(|| vp.get("bias", &[output])).transpose()?,
            transposed: true,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (stride, none) = ([SIDE; 2], [0; 2]);
        match self.transposed {
            false => x.conv2d(&self.weight, self.bias.as_ref(), stride, none, [1, 1], 1),
            true => {
                let bias = self.bias.as_ref();
                x.conv_transpose2d(&self.weight, bias, stride, none, none, 1, [1, 1])
            }
        }
    }
}
