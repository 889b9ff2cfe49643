//! ESRGAN's residual-in-residual dense block (`RRDB`), which RRDBNet and MMRealSR
//! chain: three residual dense blocks of five 3×3 convolutions over the concatenated
//! earlier outputs, each scaled by 0.2 and added to its input, and the three scaled by
//! 0.2 again and added to the block's input. Also the reconstruction after their trunk.

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::weights::VarPath;

/// ESRGAN's LeakyReLU slope.
pub const RRDB_SLOPE: f64 = 0.2;
/// The dense and RRDB residual scaling.
const RESIDUAL: f64 = 0.2;

/// A 3×3 convolution keeping the size, `name` under `vp`.
pub fn conv3(vp: &VarPath, name: &str, input: i64, output: i64) -> Result<Conv2d> {
    Conv2d::load(&vp.pp(name), input, output, 3, 1, 1)
}

/// A residual dense block: five convolutions over the concatenated earlier outputs.
pub struct DenseBlock {
    convs: Vec<Conv2d>,
    growth: i64,
}

impl DenseBlock {
    pub fn load(vp: &VarPath, features: i64, growth: i64) -> Result<Self> {
        let convs = (0..5)
            .map(|i| {
                let output = if i == 4 { features } else { growth };
                conv3(vp, &format!("conv{}", i + 1), features + i * growth, output)
            })
            .collect::<Result<_>>()?;
        Ok(Self { convs, growth })
    }

    /// The concatenations live in one buffer that each activation is written into once
    /// (the reference concatenates anew for every convolution: same values).
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let features = size[1];
        let width = features + 4 * self.growth;
        let buffer = Tensor::empty([size[0], width, size[2], size[3]], (x.kind(), x.device()));
        buffer.narrow(1, 0, features).copy_(x);
        for (i, conv) in self.convs[..4].iter().enumerate() {
            let start = features + i as i64 * self.growth;
            let y = conv.forward(&buffer.narrow(1, 0, start));
            let slot = buffer.narrow(1, start, self.growth);
            let _ = y.leaky_relu_backward_grad_input(&slot, &y, RRDB_SLOPE, false);
        }
        let mut y = self.convs[4].forward(&buffer);
        let _ = y.g_mul_scalar_(RESIDUAL);
        let _ = y.g_add_(x);
        y
    }
}

/// A residual-in-residual dense block's three dense blocks, `rdb1` to `rdb3` under `vp`.
pub fn load_rrdb_block(vp: &VarPath, features: i64, growth: i64) -> Result<[DenseBlock; 3]> {
    let dense = |r: i64| DenseBlock::load(&vp.pp(format!("rdb{r}")), features, growth);
    Ok([dense(1)?, dense(2)?, dense(3)?])
}

/// A residual-in-residual dense block: three dense blocks, their output scaled by 0.2
/// and added to the input.
pub fn rrdb_block(block: &[DenseBlock; 3], x: &Tensor) -> Tensor {
    let mut out = block.iter().fold(x.shallow_clone(), |y, d| d.forward(&y));
    let _ = out.g_mul_scalar_(RESIDUAL);
    let _ = out.g_add_(x);
    out
}

/// RRDBNet's reconstruction: nearest ×2 rounds (`conv_up1`, `conv_up2`, ...), each a
/// convolution and LeakyReLU, then `conv_hr` with LeakyReLU and `conv_last`.
pub struct Reconstruction {
    ups: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl Reconstruction {
    /// `rounds` ×2 rounds over `features` channels, to `channels` out.
    pub fn load(vp: &VarPath, features: i64, channels: i64, rounds: i64) -> Result<Self> {
        Ok(Self {
            ups: (1..=rounds)
                .map(|n| conv3(vp, &format!("conv_up{n}"), features, features))
                .collect::<Result<_>>()?,
            conv_hr: conv3(vp, "conv_hr", features, features)?,
            conv_last: conv3(vp, "conv_last", features, channels)?,
        })
    }

    pub fn forward(&self, features: Tensor) -> Tensor {
        let mut y = features;
        for up in &self.ups {
            let size = y.size();
            let upsampled = y.upsample_nearest2d([size[2] * 2, size[3] * 2], 2.0, 2.0);
            y = leaky_in_place(up.forward(&upsampled), RRDB_SLOPE);
        }
        self.conv_last
            .forward(&leaky_in_place(self.conv_hr.forward(&y), RRDB_SLOPE))
    }
}
