//! controlnet_aux's anime line-art detector (`lineart_anime.UnetGenerator`, the network
//! of its `netG.pth`): a pix2pix U-Net of nested skip-connection blocks, each a 4×4
//! stride-2 convolution down and a 4×4 stride-2 transposed convolution up around the
//! next block, instance norms without affine parameters, LeakyReLU(0.2) down and ReLU up,
//! tanh out. The depth, widths and channels are read from the weights.

use std::path::Path;

use image::{GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::pixels::channels_first;
use crate::engine::preprocess::cv_resize::{resize, resize_plane_cubic, Interpolation};
use crate::engine::weights::{read_shapes, Weights};

/// The multiple controlnet_aux resizes the detector's input to.
const NETWORK_SIDE: u32 = 256;

/// torch.nn.InstanceNorm2d's epsilon.
const EPS: f64 = 1e-5;
/// The slope of the downward LeakyReLUs.
const SLOPE: f64 = 0.2;

/// One 4×4 stride-2 (transposed) convolution.
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    fn down(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, Some(&self.bias), [2, 2], [1, 1], [1, 1], 1)
    }

    fn up(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(
            &self.weight,
            Some(&self.bias),
            [2, 2],
            [1, 1],
            [0, 0],
            1,
            [1, 1],
        )
    }
}

fn instance_norm(x: &Tensor) -> Tensor {
    x.instance_norm::<&Tensor>(None, None, None, None, true, 0.1, EPS, false)
}

/// A block's convolutions; block 0 is the outermost.
struct Block {
    down: Conv,
    up: Conv,
}

/// The anime line-art U-Net.
pub struct LineartAnimeUnet {
    blocks: Vec<Block>,
    device: Device,
    kind: Kind,
}

/// The key prefix of block `depth`: the outermost block's Sequential holds its submodule
/// at index 1, every other block's at index 3.
fn prefix(depth: usize) -> String {
    let mut p = "model.model.".to_string();
    if depth > 0 {
        p.push_str("1.model.");
        for _ in 1..depth {
            p.push_str("3.model.");
        }
    }
    p
}

impl LineartAnimeUnet {
    /// Loads the U-Net from a safetensors file of its state dict (`module.` prefixes, as
    /// some published files have, removed).
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let shape = |key: &str| {
            let found = shapes
                .iter()
                .find(|(name, _)| name.trim_start_matches("module.") == key);
            found
                .map(|(_, s)| s.clone())
                .ok_or_else(|| EngineError::MissingTensor {
                    path: path.to_path_buf(),
                    name: key.to_string(),
                })
        };
        // Blocks until one has no further submodule; the innermost holds its
        // convolutions at 1 and 3.
        let mut depth = 1;
        while shape(&format!("{}3.model.1.weight", prefix(depth))).is_ok() {
            depth += 1;
        }
        let depth = depth + 1;
        let rename = |stored: &str| {
            let name = stored.trim_start_matches("module.").to_string();
            vec![(name, crate::engine::weights::Transform::Identity)]
        };
        let weights = Weights::open_renamed(&[path.to_path_buf()], device, kind, &rename)?;
        let vp = weights.root();
        let mut blocks = Vec::with_capacity(depth);
        for d in 0..depth {
            let p = prefix(d);
            let (down, up) = match d {
                0 => (format!("{p}0"), format!("{p}3")),
                d if d == depth - 1 => (format!("{p}1"), format!("{p}3")),
                _ => (format!("{p}1"), format!("{p}5")),
            };
            let (down_shape, up_shape) = (
                shape(&format!("{down}.weight"))?,
                shape(&format!("{up}.weight"))?,
            );
            let conv = |name: &str, s: &[i64], bias: i64| -> Result<Conv> {
                let at = vp.pp(name);
                Ok(Conv {
                    weight: at.get("weight", s)?,
                    bias: at.get("bias", &[bias])?,
                })
            };
            blocks.push(Block {
                down: conv(&down, &down_shape, down_shape[0])?,
                up: conv(&up, &up_shape, up_shape[1])?,
            });
        }
        weights.check_all_used(|_| false)?;
        Ok(Self {
            blocks,
            device,
            kind,
        })
    }

    /// How many times the network halves the image: its sides must be multiples of
    /// 2^depth.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Block `d` and everything inside it on `x`, with its skip concatenation. The
    /// reference's downward LeakyReLU runs in place on the block's input before the
    /// concatenation reads it, so the skip carries LeakyReLU(x), not x (the same after
    /// the parent's ReLU).
    fn block(&self, d: usize, x: Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        between()?;
        let block = &self.blocks[d];
        let innermost = d == self.blocks.len() - 1;
        // In place, as the reference: torch's LeakyReLU kernel through its backward with
        // the input as the gradient (tch's `leaky_relu` takes no slope).
        let _ = x.leaky_relu_backward_grad_input(&x, &x, SLOPE, false);
        let down = block.down.down(&x);
        let mut inner = if innermost {
            down
        } else {
            self.block(d + 1, instance_norm(&down), between)?
        };
        let _ = inner.relu_();
        let up = instance_norm(&block.up.up(&inner));
        Ok(Tensor::cat(&[&x, &up], 1))
    }

    /// The network on an NCHW batch in [-1, 1] whose sides are multiples of 2^depth:
    /// [N, out, H, W] in (-1, 1), float32; `between` is asked before each level, and
    /// its error ends the pass.
    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let x = image.to_device(self.device).to_kind(self.kind);
        let outer = &self.blocks[0];
        let down = outer.down.down(&x);
        let mut inner = if self.blocks.len() > 1 {
            self.block(1, down, between)?
        } else {
            down
        };
        let _ = inner.relu_();
        Ok(outer
            .up
            .up(&inner)
            .tanh()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu))
    }

    /// controlnet_aux's `LineartAnimeDetector` on an RGB image at the detection size:
    /// resized with OpenCV's bicubic to the next multiples of 256 (or of the network's
    /// own stride, if deeper), pixels to [-1, 1], the first output channel back to [0,
    /// 255], that plane resized back with bicubic, truncated to 8 bits and inverted.
    pub fn detect(&self, image: &RgbImage) -> Result<GrayImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`Self::detect`] with `between` asked before each of the U-Net's levels.
    pub fn detect_between(&self, image: &RgbImage, between: &mut Between<'_>) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let stride = 1u32.checked_shl(self.depth() as u32).ok_or_else(|| {
            EngineError::Internal(format!("a U-Net {} levels deep", self.depth()))
        })?;
        let side = NETWORK_SIDE.max(stride);
        let (wn, hn) = (width.div_ceil(side) * side, height.div_ceil(side) * side);
        let sized = if (wn, hn) == (width, height) {
            image.clone()
        } else {
            resize(image, wn, hn, Interpolation::Cubic)
        };
        let input = channels_first(&sized).to_kind(Kind::Float) / 127.5 - 1.0;
        let line = self.forward(&input, between)?.get(0).get(0) * 127.5 + 127.5;
        let line = Vec::<f32>::try_from(line.to_kind(Kind::Float).contiguous().view(-1))?;
        let fitted = if (wn, hn) == (width, height) {
            line
        } else {
            let (w, h) = (width as usize, height as usize);
            resize_plane_cubic(&line, (wn as usize, hn as usize), w, h)
        };
        // numpy's clip, then astype(uint8): truncation.
        let inverted = fitted
            .into_iter()
            .map(|v| 255 - v.clamp(0.0, 255.0) as u8)
            .collect();
        GrayImage::from_raw(width, height, inverted)
            .ok_or_else(|| EngineError::Internal("a line map of the wrong size".into()))
    }
}
