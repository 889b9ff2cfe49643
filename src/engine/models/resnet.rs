//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` from diffusers
//! (`models/resnet.py`, `models/downsampling.py`, `models/upsampling.py`).

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::models::bands;
use crate::engine::models::nn::{Conv2d, GroupNorm, Linear};
use crate::engine::profile;
use crate::engine::weights::VarPath;

/// A residual block with an optional time-embedding projection.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

/// Shape parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels.
    pub out_channels: i64,
    /// Width of the time embedding, or `None` for blocks without one (the VAE).
    pub temb_channels: Option<i64>,
    /// Group norm groups.
    pub groups: i64,
    /// Group norm epsilon.
    pub eps: f64,
}

impl ResnetBlock2D {
    /// Loads the block at `vp`.
    pub fn load(vp: &VarPath, c: ResnetConfig) -> Result<Self> {
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(Conv2d::load(
                &vp.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(Linear::load(
                &vp.pp("time_emb_proj"),
                t,
                c.out_channels,
                true,
            )?),
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::load(&vp.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: Conv2d::load(&vp.pp("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(&vp.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: Conv2d::load(&vp.pp("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `ResnetBlock2D.forward` with `time_embedding_norm="default"`, output scale 1.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let _stage = profile::span("resnet");
        // In place where a fresh tensor is overwritten, and the first convolution's output
        // dropped before the shortcut runs, so that fewer full-size activations are alive
        // at once (the same values).
        let h = {
            let mut h = self.conv1.forward(&self.norm1.forward(x).silu_());
            if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
                h += proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
            }
            self.conv2.forward(&self.norm2.forward(&h).silu_())
        };
        self.add_input(x, h)
    }
}

impl ResnetBlock2D {
    /// The block's output: `h` plus its input `x` (through the shortcut convolution when
    /// the channels change).
    fn add_input(&self, x: &Tensor, mut h: Tensor) -> Tensor {
        match &self.conv_shortcut {
            Some(shortcut) => {
                let mut out = shortcut.forward(x);
                out += &h;
                out
            }
            None => {
                h += x;
                h
            }
        }
    }

    /// [`Self::forward`] without a time embedding (the VAE's blocks), its group norms and
    /// 3×3 convolutions run `rows` rows at a time (see [`crate::engine::models::bands`]).
    pub fn forward_in_bands(&self, x: &Tensor, rows: i64) -> Tensor {
        let _stage = profile::span("resnet");
        let first = bands::norm_silu_conv(&self.norm1, &self.conv1, x, rows);
        let h = bands::norm_silu_conv(&self.norm2, &self.conv2, &first, rows);
        drop(first);
        self.add_input(x, h)
    }
}

/// A strided 3×3 convolution that halves the spatial size.
pub struct Downsample2D {
    conv: Conv2d,
    /// With padding 0 (the VAE encoder), diffusers pads right and bottom by one first.
    pad_asymmetric: bool,
}

impl Downsample2D {
    /// Loads `<vp>.conv` with the given convolution padding.
    pub fn load(vp: &VarPath, channels: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vp.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_asymmetric: padding == 0,
        })
    }

    /// Halves height and width.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let _stage = profile::span("downsample");
        if self.pad_asymmetric {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling followed by a 3×3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `<vp>.conv`.
    pub fn load(vp: &VarPath, channels: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vp.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Doubles height and width, or resizes to `size` (diffusers' `upsample_size`, used
    /// when the latent is not divisible by the UNet's overall downsampling factor).
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let _stage = profile::span("upsample");
        let up = match size {
            Some((h, w)) => x.upsample_nearest2d([h, w], None, None),
            None => {
                let s = x.size();
                x.upsample_nearest2d([s[2] * 2, s[3] * 2], 2.0, 2.0)
            }
        };
        self.conv.forward(&up)
    }

    /// [`Self::forward`] doubling the size, `rows` output rows at a time.
    pub fn forward_in_bands(&self, x: &Tensor, rows: i64) -> Tensor {
        let _stage = profile::span("upsample");
        bands::upsample_conv(&self.conv, x, rows)
    }
}
