//! controlnet_aux's line-art detector (`lineart.Generator`, the network of its
//! `sk_model.pth` realistic and `sk_model2.pth` coarse weights): a reflection-padded 7×7
//! convolution, two stride-2 downsamplings, residual blocks, two transposed-convolution
//! upsamplings and a 7×7 convolution to one sigmoid channel, every convolution but the
//! last followed by an instance norm without affine parameters and a ReLU. The widths
//! and the number of residual blocks are read from the weights.

use std::path::Path;

use image::{GrayImage, Luma, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::pixels::unit_range;
use crate::engine::preprocess::cv_resize::{resize, Interpolation};
use crate::engine::weights::{numbered_children, read_shapes, VarPath, Weights};

/// torch.nn.InstanceNorm2d's epsilon.
const EPS: f64 = 1e-5;

/// The shortest side the network takes: the residual blocks' reflection padding of 1
/// needs 2 pixels after the two stride-2 downsamplings (⌈⌈5/2⌉/2⌉ = 2).
pub const MIN_SIDE: u32 = 5;

/// A convolution's weight and bias, applied with its own stride and padding.
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    fn load(vp: &VarPath, input: i64, output: i64, kernel: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[output, input, kernel, kernel])?,
            bias: vp.get("bias", &[output])?,
        })
    }

    /// A transposed convolution's weight ([in, out, k, k]) and bias.
    fn load_transposed(vp: &VarPath, input: i64, output: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[input, output, 3, 3])?,
            bias: vp.get("bias", &[output])?,
        })
    }

    fn forward(&self, x: &Tensor, stride: i64, padding: i64) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [stride, stride],
            [padding, padding],
            [1, 1],
            1,
        )
    }

    /// Stride 2, padding 1, output padding 1: twice the size.
    fn forward_transposed(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(
            &self.weight,
            Some(&self.bias),
            [2, 2],
            [1, 1],
            [1, 1],
            1,
            [1, 1],
        )
    }
}

/// Instance norm (no affine parameters, statistics of the input) then ReLU.
fn norm_relu(x: &Tensor) -> Tensor {
    let mut y = x.instance_norm::<&Tensor>(None, None, None, None, true, 0.1, EPS, false);
    let _ = y.relu_();
    y
}

/// `ReflectionPad2d(pad)`.
fn reflect(x: &Tensor, pad: i64) -> Tensor {
    x.reflection_pad2d([pad, pad, pad, pad])
}

/// The line-art generator.
pub struct LineartGenerator {
    first: Conv,
    down: [Conv; 2],
    residual: Vec<[Conv; 2]>,
    up: [Conv; 2],
    last: Conv,
    device: Device,
    kind: Kind,
}

impl LineartGenerator {
    /// Loads controlnet_aux's generator from a safetensors file of its state dict
    /// (`sdxld convert` turns the published `.pth` files into one).
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let shape = |key: &str| {
            let found = shapes.iter().find(|(name, _)| name == key);
            found
                .map(|(_, s)| s.clone())
                .ok_or_else(|| EngineError::MissingTensor {
                    path: path.to_path_buf(),
                    name: key.to_string(),
                })
        };
        let first = shape("model0.1.weight")?;
        let (width, input) = (first[0], first[1]);
        let blocks = numbered_children(shapes.iter().map(|(n, _)| n.as_str()), "model2.");
        let output = shape("model4.1.weight")?[0];
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let vp = weights.root();
        let residual = (0..blocks)
            .map(|i| {
                let block = vp.pp(format!("model2.{i}.conv_block"));
                let (w4, ks) = (width * 4, 3);
                Ok([
                    Conv::load(&block.pp(1), w4, w4, ks)?,
                    Conv::load(&block.pp(5), w4, w4, ks)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let network = Self {
            first: Conv::load(&vp.pp("model0.1"), input, width, 7)?,
            down: [
                Conv::load(&vp.pp("model1.0"), width, width * 2, 3)?,
                Conv::load(&vp.pp("model1.3"), width * 2, width * 4, 3)?,
            ],
            residual,
            up: [
                Conv::load_transposed(&vp.pp("model3.0"), width * 4, width * 2)?,
                Conv::load_transposed(&vp.pp("model3.3"), width * 2, width)?,
            ],
            last: Conv::load(&vp.pp("model4.1"), width, output, 7)?,
            device,
            kind,
        };
        weights.check_all_used(|_| false)?;
        Ok(network)
    }

    /// The network on an NCHW batch in [0, 1]: [N, 1, H', W'] in (0, 1), float32 (H'
    /// and W' as the two stride-2 stages and their transposes make them); `between` is
    /// asked before each stage and residual block, and its error ends the pass.
    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let x = image.to_device(self.device).to_kind(self.kind);
        let mut x = norm_relu(&self.first.forward(&reflect(&x, 3), 1, 0));
        for conv in &self.down {
            between()?;
            x = norm_relu(&conv.forward(&x, 2, 1));
        }
        for [a, b] in &self.residual {
            between()?;
            let y = norm_relu(&a.forward(&reflect(&x, 1), 1, 0));
            let y = b
                .forward(&reflect(&y, 1), 1, 0)
                .instance_norm::<&Tensor>(None, None, None, None, true, 0.1, EPS, false);
            x += y;
        }
        for conv in &self.up {
            between()?;
            x = norm_relu(&conv.forward_transposed(&x));
        }
        between()?;
        Ok(self
            .last
            .forward(&reflect(&x, 3), 1, 0)
            .sigmoid()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu))
    }

    /// controlnet_aux's `LineartDetector` on an RGB image at the detection size: the
    /// network's first channel times 255, clipped and truncated to 8 bits, fitted back to
    /// the image's size with OpenCV's `INTER_LINEAR` where the network's strides changed
    /// it, inverted (dark lines on white, as the line-art ControlNets take them).
    pub fn detect(&self, image: &RgbImage) -> Result<GrayImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`LineartGenerator::detect`] with `between` asked between the network's blocks.
    pub fn detect_between(&self, image: &RgbImage, between: &mut Between<'_>) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        if width.min(height) < MIN_SIDE {
            return Err(EngineError::InvalidRequest(format!(
                "the line-art network needs sides of at least {MIN_SIDE} pixels, not {width}x{height}"
            )));
        }
        let line = self.forward(&unit_range(image), between)?.get(0).get(0);
        let size = line.size();
        let bytes = (line * 255.0).clamp(0.0, 255.0).to_kind(Kind::Uint8);
        let raw = Vec::<u8>::try_from(bytes.contiguous().view(-1))?;
        let map = GrayImage::from_raw(size[1] as u32, size[0] as u32, raw)
            .ok_or_else(|| EngineError::Internal("a line map of the wrong size".into()))?;
        let mut map = if map.dimensions() == (width, height) {
            map
        } else {
            let rgb = super::gray_to_rgb(map);
            let fitted = resize(&rgb, width, height, Interpolation::Linear);
            GrayImage::from_fn(width, height, |x, y| Luma([fitted.get_pixel(x, y)[0]]))
        };
        map.iter_mut().for_each(|v| *v = 255 - *v);
        Ok(map)
    }
}
