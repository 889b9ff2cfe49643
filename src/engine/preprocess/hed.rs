//! controlnet_aux's HED edge detector (`ControlNetHED_Apache2`, the network of its
//! `ControlNetHED.pth`): the raw 0–255 pixels less a learnt per-channel offset, five VGG
//! blocks of 3×3 convolutions with ReLUs (each after the first behind a 2×2 max pool),
//! each block projected to one edge channel. The detector fits the five projections
//! back to the image with OpenCV's float bilinear resize, averages them, applies a
//! sigmoid and writes 8 bits (white edges on black, soft). Widths and layer counts are
//! read from the weights.

use std::path::Path;

use image::GrayImage;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::pixels::channels_first;
use crate::engine::preprocess::cv_resize::resize_plane_linear;
use crate::engine::weights::{numbered_children, read_shapes, VarPath, Weights};

/// The smallest side the published network (five blocks, four poolings) takes.
pub const MIN_SIDE: u32 = 16;

/// A block's convolutions and its projection.
struct Block {
    convs: Vec<(Tensor, Tensor)>,
    projection: (Tensor, Tensor),
}

impl Block {
    fn load(vp: &VarPath, input: i64, width: i64, layers: i64) -> Result<Self> {
        let convs = (0..layers)
            .map(|i| {
                let conv = vp.pp(format!("convs.{i}"));
                let into = if i == 0 { input } else { width };
                Ok((
                    conv.get("weight", &[width, into, 3, 3])?,
                    conv.get("bias", &[width])?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let projection = vp.pp("projection");
        Ok(Self {
            convs,
            projection: (
                projection.get("weight", &[1, width, 1, 1])?,
                projection.get("bias", &[1])?,
            ),
        })
    }

    /// The block's features and its edge projection.
    fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let mut h = x.shallow_clone();
        for (weight, bias) in &self.convs {
            h = h.conv2d(weight, Some(bias), [1, 1], [1, 1], [1, 1], 1);
            let _ = h.relu_();
        }
        let (weight, bias) = &self.projection;
        let edges = h.conv2d(weight, Some(bias), [1, 1], [0, 0], [1, 1], 1);
        (h, edges)
    }
}

/// The HED network.
pub struct Hed {
    norm: Tensor,
    blocks: Vec<Block>,
    device: Device,
    kind: Kind,
}

impl Hed {
    /// Loads the network from its state dict at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let names = || shapes.iter().map(|(n, _)| n.as_str());
        let shape = |key: &str| {
            shapes
                .iter()
                .find(|(name, _)| name == key)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| EngineError::MissingTensor {
                    path: path.to_path_buf(),
                    name: key.to_string(),
                })
        };
        let count = (1..)
            .take_while(|k| names().any(|n| n.starts_with(&format!("block{k}."))))
            .count();
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let vp = weights.root();
        let mut input = shape("norm")?.get(1).copied().unwrap_or(3);
        let channels = input;
        let mut blocks = Vec::with_capacity(count);
        for k in 1..=count {
            let width = shape(&format!("block{k}.convs.0.weight"))?[0];
            let layers = numbered_children(names(), &format!("block{k}.convs."));
            blocks.push(Block::load(
                &vp.pp(format!("block{k}")),
                input,
                width,
                layers,
            )?);
            input = width;
        }
        let network = Self {
            norm: vp.get("norm", &[1, channels, 1, 1])?,
            blocks,
            device,
            kind,
        };
        weights.check_all_used(|_| false)?;
        Ok(network)
    }

    /// Each block's edge projection [N, 1, h_k, w_k] (float32) of raw pixels [N, 3, H, W]
    /// in 0–255; `between` is asked before each block, and its error ends the pass.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Vec<Tensor>> {
        let _no_grad = tch::no_grad_guard();
        let mut h = pixels.to_device(self.device).to_kind(self.kind) - &self.norm;
        let mut projections = Vec::with_capacity(self.blocks.len());
        for (k, block) in self.blocks.iter().enumerate() {
            between()?;
            if k > 0 {
                h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            let (features, edges) = block.forward(&h);
            projections.push(edges.to_kind(Kind::Float));
            h = features;
        }
        Ok(projections)
    }

    /// Whether an input [N, C, H, W] keeps a pixel through every pooling.
    fn fits(&self, size: &[i64]) -> bool {
        let least = 1i64 << self.blocks.len().saturating_sub(1);
        size.len() == 4 && size[2] >= least && size[3] >= least
    }

    /// controlnet_aux's `HEDdetector` map of an RGB image at the detection size: each
    /// projection fitted back with OpenCV's float `INTER_LINEAR`, their float32 mean, a
    /// float64 sigmoid, times 255 truncated to 8 bits.
    pub fn detect(&self, image: &image::RgbImage) -> Result<GrayImage> {
        self.detect_levels(image, 0, &mut || Ok(()))
    }

    /// [`Self::detect`], the edges quantised in `safe_steps` steps (0: not at all);
    /// `between` is asked before each block.
    pub fn detect_levels(
        &self,
        image: &image::RgbImage,
        safe_steps: u32,
        between: &mut Between<'_>,
    ) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let (w, h) = (width as usize, height as usize);
        let pixels = channels_first(image).to_kind(Kind::Float);
        if !self.fits(&pixels.size()) {
            let least = 1u32 << self.blocks.len().saturating_sub(1);
            return Err(EngineError::InvalidRequest(format!(
                "HED needs sides of at least {least} pixels, not {width}x{height}"
            )));
        }
        let mut sum = vec![0f32; w * h];
        let projections = self.forward(&pixels, between)?;
        for edges in &projections {
            let size = edges.size();
            let (eh, ew) = (size[2] as usize, size[3] as usize);
            let plane = Vec::<f32>::try_from(edges.to_device(Device::Cpu).contiguous().view(-1))?;
            let fitted = if (ew, eh) == (w, h) {
                plane
            } else {
                resize_plane_linear(&plane, (ew, eh), w, h)
            };
            sum.iter_mut().zip(&fitted).for_each(|(s, v)| *s += v);
        }
        let count = projections.len() as f32;
        let map = sum
            .into_iter()
            .map(|s| edge_byte(s / count, safe_steps))
            .collect();
        GrayImage::from_raw(width, height, map)
            .ok_or_else(|| EngineError::Internal("an edge map of the wrong size".into()))
    }
}

/// controlnet_aux's soft edge of the side outputs' mean logit: a float64 sigmoid,
/// quantised in `safe_steps` steps (0: not at all), to 8 bits.
pub fn edge_byte(mean: f32, safe_steps: u32) -> u8 {
    let edge = 1.0 / (1.0 + (-f64::from(mean)).exp());
    if safe_steps > 0 {
        safe_level(edge as f32, safe_steps)
    } else {
        (edge * 255.0).clamp(0.0, 255.0) as u8
    }
}

/// controlnet_aux's `safe_step(edge, steps)` of an edge probability, to 8 bits: the
/// float32 edge times `steps + 1`, truncated, divided by `steps`, times 255 clipped and
/// truncated (two steps: 0, 127 or 255).
pub fn safe_level(edge: f32, steps: u32) -> u8 {
    let steps = steps as f32;
    let level = (edge * (steps + 1.0)) as i32 as f32 / steps;
    (level * 255.0).clamp(0.0, 255.0) as u8
}
