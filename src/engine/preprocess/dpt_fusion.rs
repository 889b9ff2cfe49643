//! DPT's fusion stage (transformers' `DPTFeatureFusionStage`): from the coarsest level up,
//! each level brought to the fused map's size where they differ, through a
//! pre-activation residual unit into it, through a second one, doubled and projected.
//! Its batch norms, where the config asks for them, are folded into the convolutions.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Conv2d;
use crate::engine::preprocess::efficientnet::{FoldedConv, ShapeMap};
use crate::engine::preprocess::reassemble::resized_like;
use crate::engine::weights::VarPath;

/// BatchNorm2d's epsilon in the fusion units.
const BN_EPS: f64 = 1e-5;

/// A pre-activation residual unit, batch norms (if any) folded into its convolutions.
struct Residual {
    conv1: FoldedOrPlain,
    conv2: FoldedOrPlain,
}

enum FoldedOrPlain {
    Folded(FoldedConv),
    Plain(Tensor, Option<Tensor>),
}

impl FoldedOrPlain {
    fn load(vp: &VarPath, shapes: &ShapeMap, conv: &str, norm: Option<&str>) -> Result<Self> {
        let width = shapes
            .get(&format!("{}.{conv}.weight", vp.prefix()))
            .map(|s| s[0])
            .ok_or_else(|| EngineError::Internal(format!("no `{}.{conv}.weight`", vp.prefix())))?;
        match norm {
            Some(norm) => Ok(Self::Folded(FoldedConv::load(
                vp, shapes, conv, norm, 1, BN_EPS,
            )?)),
            None => {
                let weight = vp.get(&format!("{conv}.weight"), &[width, width, 3, 3])?;
                let bias = if vp.contains(&format!("{conv}.bias")) {
                    Some(vp.get(&format!("{conv}.bias"), &[width])?)
                } else {
                    None
                };
                Ok(Self::Plain(weight, bias))
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Folded(conv) => conv.forward(x),
            Self::Plain(weight, bias) => x.conv2d(weight, bias.as_ref(), [1, 1], [1, 1], [1, 1], 1),
        }
    }
}

impl Residual {
    fn load(vp: &VarPath, shapes: &ShapeMap, norms: bool) -> Result<Self> {
        let (n1, n2) = if norms {
            (Some("batch_norm1"), Some("batch_norm2"))
        } else {
            (None, None)
        };
        Ok(Self {
            conv1: FoldedOrPlain::load(vp, shapes, "convolution1", n1)?,
            conv2: FoldedOrPlain::load(vp, shapes, "convolution2", n2)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&x.relu()).relu();
        self.conv2.forward(&h) + x
    }
}

struct Fusion {
    projection: Conv2d,
    residual1: Residual,
    residual2: Residual,
}

impl Fusion {
    fn load(layer: &VarPath, fused: i64, norms: bool, shapes: &ShapeMap) -> Result<Self> {
        Ok(Fusion {
            projection: Conv2d::load(&layer.pp("projection"), fused, fused, 1, 1, 0)?,
            residual1: Residual::load(&layer.pp("residual_layer1"), shapes, norms)?,
            residual2: Residual::load(&layer.pp("residual_layer2"), shapes, norms)?,
        })
    }
}

/// Doubled with bilinear interpolation, corners aligned.
pub fn double(x: &Tensor) -> Tensor {
    let s = x.size();
    x.upsample_bilinear2d([s[2] * 2, s[3] * 2], true, None, None)
}

/// The fusion stage under `neck.fusion_stage`.
pub struct FusionStage {
    layers: Vec<Fusion>,
}

impl FusionStage {
    /// Loads `levels` layers of `fused` channels, with batch norms where `norms`.
    pub fn load(
        neck: &VarPath,
        levels: usize,
        (fused, norms): (i64, bool),
        shapes: &ShapeMap,
    ) -> Result<Self> {
        let layers = (0..levels)
            .map(|i| {
                Fusion::load(
                    &neck.pp(format!("fusion_stage.layers.{i}")),
                    fused,
                    norms,
                    shapes,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// The fusion stage: from the coarsest level up, each level (resized to the fused
    /// map when their sizes differ) through a residual unit into it, then doubled.
    pub fn forward(&self, features: &[Tensor]) -> Vec<Tensor> {
        let mut fused: Vec<Tensor> = Vec::with_capacity(features.len());
        for (hidden, layer) in features.iter().rev().zip(&self.layers) {
            let x = match fused.last() {
                None => hidden.shallow_clone(),
                Some(previous) => {
                    previous + layer.residual1.forward(&resized_like(hidden, previous))
                }
            };
            let x = double(&layer.residual2.forward(&x));
            fused.push(layer.projection.forward(&x));
        }
        fused
    }
}
