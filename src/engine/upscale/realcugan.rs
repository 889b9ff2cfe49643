//! Real-CUGAN, as spandrel runs it (`RealCUGAN/__arch/upcunet_v3.py`, alpha 1): the
//! image reflection-padded (the margins the unpadded convolutions eat, and to whole
//! multiples), a first U-Net that enlarges it, a second that refines the first's output,
//! their sum; x4 and the fast x2 network end with a convolution, a pixel shuffle and the
//! nearest-enlarged input; "pro" models work on the image mapped to 0.15–0.85.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::Conv2d;
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::channel_attention::ChannelAttention;
use crate::engine::upscale::layout::Architecture;
use crate::engine::weights::VarPath;

/// The LeakyReLU slope throughout.
const SLOPE: f64 = 0.1;
/// What the second U-Net's output lacks of the first's on each side.
const CASCADE_CROP: i64 = 20;
/// "pro" models' input range: `x * 0.7 + 0.15`.
const PRO_SCALE: f64 = 0.7;
const PRO_OFFSET: f64 = 0.15;

/// `x` less `n` pixels on every side (the reference's negative padding).
fn crop(x: &Tensor, n: i64) -> Tensor {
    let size = x.size();
    x.narrow(2, n, size[2] - 2 * n)
        .narrow(3, n, size[3] - 2 * n)
}

/// A transposed convolution.
struct Deconv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Deconv {
    fn load(
        vp: &VarPath,
        input: i64,
        output: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[input, output, kernel, kernel])?,
            bias: vp.get("bias", &[output])?,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (s, p) = (self.stride, self.padding);
        x.conv_transpose2d(
            &self.weight,
            Some(&self.bias),
            [s, s],
            [p, p],
            [0, 0],
            1,
            [1, 1],
        )
    }
}

/// Two unpadded 3×3 convolutions with LeakyReLU, squeeze and excitation where there is.
struct UnetConv {
    first: Conv2d,
    second: Conv2d,
    excite: Option<ChannelAttention>,
}

impl UnetConv {
    fn load(vp: &VarPath, input: i64, middle: i64, output: i64) -> Result<Self> {
        let se = vp.pp("seblock");
        let excite = match se.contains("conv1.weight") {
            true => Some(ChannelAttention::load(
                &se.pp("conv1"),
                &se.pp("conv2"),
                output,
                output / 8,
            )?),
            false => None,
        };
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv").pp(0), input, middle, 3, 1, 0)?,
            second: Conv2d::load(&vp.pp("conv").pp(2), middle, output, 3, 1, 0)?,
            excite,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = leaky_in_place(self.first.forward(x), SLOPE);
        let y = leaky_in_place(self.second.forward(&y), SLOPE);
        match &self.excite {
            Some(attention) => attention.forward(y),
            None => y,
        }
    }
}

/// The last layer of a U-Net: an enlarging transposed convolution or a convolution.
enum Bottom {
    Deconv(Deconv),
    Conv(Conv2d),
}

impl Bottom {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Bottom::Deconv(deconv) => deconv.forward(x),
            Bottom::Conv(conv) => conv.forward(x),
        }
    }
}

/// The first U-Net (`UNet1`, `UNet1x3`): one level down, enlarging at the bottom.
struct Unet1 {
    conv1: UnetConv,
    down: Conv2d,
    conv2: UnetConv,
    up: Deconv,
    conv3: Conv2d,
    bottom: Bottom,
}

impl Unet1 {
    fn load(vp: &VarPath, input: i64, output: i64, scale: i64) -> Result<Self> {
        // ×2 by a 4×4 stride-2 deconvolution (padding 3), ×3 by a 5×5 stride-3 one
        // (padding 2).
        let (kernel, padding) = if scale == 3 { (5, 2) } else { (4, 3) };
        Ok(Self {
            conv1: UnetConv::load(&vp.pp("conv1"), input, 32, 64)?,
            down: Conv2d::load(&vp.pp("conv1_down"), 64, 64, 2, 2, 0)?,
            conv2: UnetConv::load(&vp.pp("conv2"), 64, 128, 64)?,
            up: Deconv::load(&vp.pp("conv2_up"), 64, 64, 2, 2, 0)?,
            conv3: Conv2d::load(&vp.pp("conv3"), 64, 64, 3, 1, 0)?,
            bottom: Bottom::Deconv(Deconv::load(
                &vp.pp("conv_bottom"),
                64,
                output,
                kernel,
                scale.min(3),
                padding,
            )?),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x1 = self.conv1.forward(x);
        let x2 = leaky_in_place(self.down.forward(&x1), SLOPE);
        let x2 = leaky_in_place(self.up.forward(&self.conv2.forward(&x2)), SLOPE);
        let x3 = leaky_in_place(self.conv3.forward(&(crop(&x1, 4) + x2)), SLOPE);
        self.bottom.forward(&x3)
    }
}

/// The second U-Net (`UNet2`): two levels down, no enlargement.
struct Unet2 {
    conv1: UnetConv,
    down1: Conv2d,
    conv2: UnetConv,
    down2: Conv2d,
    conv3: UnetConv,
    up3: Deconv,
    conv4: UnetConv,
    up4: Deconv,
    conv5: Conv2d,
    bottom: Bottom,
}

impl Unet2 {
    fn load(vp: &VarPath, input: i64, output: i64) -> Result<Self> {
        Ok(Self {
            conv1: UnetConv::load(&vp.pp("conv1"), input, 32, 64)?,
            down1: Conv2d::load(&vp.pp("conv1_down"), 64, 64, 2, 2, 0)?,
            conv2: UnetConv::load(&vp.pp("conv2"), 64, 64, 128)?,
            down2: Conv2d::load(&vp.pp("conv2_down"), 128, 128, 2, 2, 0)?,
            conv3: UnetConv::load(&vp.pp("conv3"), 128, 256, 128)?,
            up3: Deconv::load(&vp.pp("conv3_up"), 128, 128, 2, 2, 0)?,
            conv4: UnetConv::load(&vp.pp("conv4"), 128, 64, 64)?,
            up4: Deconv::load(&vp.pp("conv4_up"), 64, 64, 2, 2, 0)?,
            conv5: Conv2d::load(&vp.pp("conv5"), 64, 64, 3, 1, 0)?,
            bottom: Bottom::Conv(Conv2d::load(&vp.pp("conv_bottom"), 64, output, 3, 1, 0)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x1 = self.conv1.forward(x);
        let x2 = leaky_in_place(self.down1.forward(&x1), SLOPE);
        let x2 = self.conv2.forward(&x2);
        let x3 = leaky_in_place(self.down2.forward(&x2), SLOPE);
        let x3 = leaky_in_place(self.up3.forward(&self.conv3.forward(&x3)), SLOPE);
        let x4 = self.conv4.forward(&(crop(&x2, 4) + x3));
        let x4 = leaky_in_place(self.up4.forward(&x4), SLOPE);
        let x5 = leaky_in_place(self.conv5.forward(&(crop(&x1, 16) + x4)), SLOPE);
        self.bottom.forward(&x5)
    }
}

/// Real-CUGAN (`UpCunet2x`, `UpCunet3x`, `UpCunet4x`, `UpCunet2x_fast`).
pub struct RealCugan {
    unet1: Unet1,
    unet2: Unet2,
    /// x4 and fast x2: the convolution before the pixel shuffle.
    last: Option<Conv2d>,
    scale: i64,
    fast: bool,
    pro: bool,
}

impl RealCugan {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::RealCugan {
            channels,
            scale,
            fast,
            pro,
        } = architecture
        else {
            unreachable!("a Real-CUGAN architecture");
        };
        let shuffled = scale == 4 || fast;
        let input = if fast { 4 * channels } else { channels };
        let inner = if shuffled { 64 } else { channels };
        Ok(Self {
            unet1: Unet1::load(
                &vp.pp("unet1"),
                input,
                inner,
                if shuffled { 2 } else { scale },
            )?,
            unet2: Unet2::load(&vp.pp("unet2"), inner, inner)?,
            last: shuffled
                .then(|| Conv2d::load(&vp.pp("conv_final"), 64, 4 * channels, 3, 1, 0))
                .transpose()?,
            scale,
            fast,
            pro,
        })
    }

    /// The reflection padding on each side and the multiple the sides are padded to.
    fn padding(&self) -> (i64, i64) {
        match (self.scale, self.fast) {
            (_, true) => (38, 2),
            (3, _) => (14, 4),
            (4, _) => (19, 2),
            _ => (18, 2),
        }
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (h0, w0) = (size[2], size[3]);
        let x = match self.pro {
            true => image * PRO_SCALE + PRO_OFFSET,
            false => image.shallow_clone(),
        };
        let (pad, multiple) = self.padding();
        let whole = |n: i64| ((n - 1) / multiple + 1) * multiple;
        let padded = x.reflection_pad2d([pad, pad + whole(w0) - w0, pad, pad + whole(h0) - h0]);
        let padded = match self.fast {
            true => padded.pixel_unshuffle(2),
            false => padded,
        };
        between()?;
        let first = self.unet1.forward(&padded);
        between()?;
        let y = self.unet2.forward(&first) + crop(&first, CASCADE_CROP);
        let (height, width) = (h0 * self.scale, w0 * self.scale);
        let y = match &self.last {
            Some(last) => {
                let y = crop(&last.forward(&y), 1).pixel_shuffle(2);
                let enlarged = x.upsample_nearest2d([height, width], None, None);
                y.narrow(2, 0, height).narrow(3, 0, width) + enlarged
            }
            None => y.narrow(2, 0, height).narrow(3, 0, width),
        };
        Ok(match self.pro {
            true => (y - PRO_OFFSET) / PRO_SCALE,
            false => y,
        })
    }
}
