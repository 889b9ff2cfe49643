//! transformers' BiT backbone as DPT-Hybrid runs it (`BitBackbone` with
//! `layer_type="bottleneck"` and TensorFlow's "SAME" padding, as Intel/dpt-hybrid-midas
//! configures it): a weight-standardised 7×7 stem of stride 2 with group norm and ReLU,
//! a 3×3 max pool of stride 2 over zero padding, then three stages of bottleneck
//! residual units (1×1, 3×3 carrying the stage's stride, 1×1, each convolution
//! weight-standardised and group-normalised; the first unit's shortcut a strided 1×1
//! projection). Its three stage outputs are DPT-Hybrid's features.

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::GroupNorm;
use crate::engine::preprocess::efficientnet::ShapeMap;
use crate::engine::weights::VarPath;

/// BitConfig's values DPT-Hybrid depends on, with DPTConfig's defaults for its backbone.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BitConfig {
    layer_type: String,
    global_padding: Option<String>,
    num_groups: i64,
    embedding_dynamic_padding: bool,
    hidden_act: String,
    depths: Vec<i64>,
}

impl Default for BitConfig {
    fn default() -> Self {
        Self {
            layer_type: "bottleneck".into(),
            global_padding: Some("SAME".into()),
            num_groups: 32,
            embedding_dynamic_padding: true,
            hidden_act: "relu".into(),
            depths: vec![3, 4, 9],
        }
    }
}

impl BitConfig {
    /// Why sdxld cannot run it, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        let same = self
            .global_padding
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("same"));
        if self.layer_type != "bottleneck" {
            Some(format!(
                "a BiT backbone of layer_type `{}`",
                self.layer_type
            ))
        } else if !same {
            Some("a BiT backbone without SAME padding".into())
        } else if self.hidden_act != "relu" {
            Some(format!("a BiT backbone with `{}`", self.hidden_act))
        } else if self.depths.len() != 3 || self.depths.iter().any(|&d| d < 1) {
            Some(format!("a BiT backbone of depths {:?}", self.depths))
        } else {
            None
        }
    }
}

/// The epsilon of BiT's weight standardisation.
const STANDARDISE_EPS: f64 = 1e-8;
/// The epsilon of its group norms.
const GROUP_NORM_EPS: f64 = 1e-5;

/// TensorFlow's "SAME" padding of a `kernel` sliding by `stride` over `side` pixels:
/// (before, after), the odd pixel after.
fn same_padding(side: i64, kernel: i64, stride: i64) -> (i64, i64) {
    let total = (((side + stride - 1) / stride - 1) * stride + kernel - side).max(0);
    (total / 2, total - total / 2)
}

/// Pads the last two dimensions of `x` with zeros as "SAME" asks of `kernel`, `stride`.
fn pad_same(x: &Tensor, kernel: i64, stride: i64) -> Tensor {
    let s = x.size();
    let (top, bottom) = same_padding(s[2], kernel, stride);
    let (left, right) = same_padding(s[3], kernel, stride);
    if top + bottom + left + right == 0 {
        return x.shallow_clone();
    }
    x.constant_pad_nd([left, right, top, bottom])
}

/// A weight-standardised convolution without bias: each output channel's weights
/// normalised to zero mean and unit (biased) variance once, at load.
struct StandardisedConv {
    weight: Tensor,
    kernel: i64,
    stride: i64,
}

impl StandardisedConv {
    fn load(vp: &VarPath, shapes: &ShapeMap, name: &str, stride: i64) -> Result<Self> {
        let key = format!("{}.{name}.weight", vp.prefix());
        let shape = shapes
            .get(&key)
            .filter(|s| s.len() == 4 && s[2] == s[3])
            .ok_or_else(|| EngineError::Internal(format!("no square kernel `{key}`")))?;
        let stored = vp.get(&format!("{name}.weight"), shape)?;
        let flat = stored.to_kind(Kind::Float).reshape([shape[0], -1]);
        let centred = &flat - flat.mean_dim(1, true, None);
        let variance = centred.square().mean_dim(1, true, None);
        let weight = (centred / (variance + STANDARDISE_EPS).sqrt())
            .reshape(shape.as_slice())
            .to_kind(stored.kind());
        Ok(Self {
            weight,
            kernel: shape[2],
            stride,
        })
    }

    fn out(&self) -> i64 {
        self.weight.size()[0]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // Stride 1 with an odd kernel pads statically, as much on each side.
        if self.stride == 1 && self.kernel % 2 == 1 {
            let p = self.kernel / 2;
            return x.conv2d::<&Tensor>(&self.weight, None, [1, 1], [p, p], [1, 1], 1);
        }
        let x = pad_same(x, self.kernel, self.stride);
        let s = self.stride;
        x.conv2d::<&Tensor>(&self.weight, None, [s, s], [0, 0], [1, 1], 1)
    }
}

/// A convolution and its group norm.
struct ConvNorm {
    conv: StandardisedConv,
    norm: GroupNorm,
}

impl ConvNorm {
    fn load(
        vp: &VarPath,
        shapes: &ShapeMap,
        names: (&str, &str),
        (stride, groups): (i64, i64),
    ) -> Result<Self> {
        let conv = StandardisedConv::load(vp, shapes, names.0, stride)?;
        let width = conv.out();
        if width % groups != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "{}.{}: {width} channels do not split into {groups} groups",
                vp.prefix(),
                names.0
            )));
        }
        let norm = GroupNorm::load(&vp.pp(names.1), groups, width, GROUP_NORM_EPS)?;
        Ok(Self { conv, norm })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.norm.forward(&self.conv.forward(x))
    }
}

/// A bottleneck residual unit (`BitBottleneckLayer`).
struct Bottleneck {
    shortcut: Option<ConvNorm>,
    reduce: ConvNorm,
    spatial: ConvNorm,
    expand: ConvNorm,
}

impl Bottleneck {
    fn load(vp: &VarPath, shapes: &ShapeMap, stride: i64, groups: i64) -> Result<Self> {
        let shortcut = if vp.contains("downsample.conv.weight") {
            let down = vp.pp("downsample");
            Some(ConvNorm::load(
                &down,
                shapes,
                ("conv", "norm"),
                (stride, groups),
            )?)
        } else {
            None
        };
        Ok(Self {
            shortcut,
            reduce: ConvNorm::load(vp, shapes, ("conv1", "norm1"), (1, groups))?,
            spatial: ConvNorm::load(vp, shapes, ("conv2", "norm2"), (stride, groups))?,
            expand: ConvNorm::load(vp, shapes, ("conv3", "norm3"), (1, groups))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let shortcut = match &self.shortcut {
            Some(projection) => projection.forward(x),
            None => x.shallow_clone(),
        };
        let h = self.reduce.forward(x).relu();
        let h = self.spatial.forward(&h).relu();
        (self.expand.forward(&h) + shortcut).relu()
    }
}

/// The BiT backbone under `vp` (`...backbone.bit`).
pub struct Bit {
    stem: ConvNorm,
    pool_padding: bool,
    stages: Vec<Vec<Bottleneck>>,
}

impl Bit {
    /// Loads it; the first unit of each stage carries the stage's stride (1, then 2) and
    /// a projection shortcut, as BitEncoder builds them.
    pub fn load(vp: &VarPath, shapes: &ShapeMap, config: &BitConfig) -> Result<Self> {
        let groups = config.num_groups.max(1);
        let stem = ConvNorm::load(
            &vp.pp("embedder"),
            shapes,
            ("convolution", "norm"),
            (2, groups),
        )?;
        let stages = config
            .depths
            .iter()
            .enumerate()
            .map(|(s, &depth)| {
                (0..depth)
                    .map(|l| {
                        let unit = vp.pp(format!("encoder.stages.{s}.layers.{l}"));
                        let stride = if s > 0 && l == 0 { 2 } else { 1 };
                        let block = Bottleneck::load(&unit, shapes, stride, groups)?;
                        if (l == 0) != block.shortcut.is_some() {
                            return Err(EngineError::InvalidRequest(format!(
                                "{}: a projection shortcut belongs to a stage's first unit only",
                                unit.prefix()
                            )));
                        }
                        Ok(block)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            stem,
            pool_padding: config.embedding_dynamic_padding,
            stages,
        })
    }

    /// The channels of each stage's output.
    pub fn stage_channels(&self) -> Vec<i64> {
        self.stages
            .iter()
            .map(|stage| stage.last().map_or(0, |unit| unit.expand.conv.out()))
            .collect()
    }

    /// The channels of the last stage's output.
    pub fn out_channels(&self) -> i64 {
        self.stage_channels().last().copied().unwrap_or(0)
    }

    /// The outputs of the stages before the last, and the last stage's, for pixels
    /// [N, 3, H, W].
    pub fn forward(&self, pixels: &Tensor) -> (Vec<Tensor>, Tensor) {
        let x = self.stem.forward(pixels).relu();
        // Zeros pad the pool, as BitMaxPool2d's dynamic padding does (after a ReLU,
        // never above a window's maximum).
        let x = if self.pool_padding {
            pad_same(&x, 3, 2)
        } else {
            x
        };
        let mut x = x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false);
        let mut earlier = Vec::with_capacity(self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            if i > 0 {
                earlier.push(x.shallow_clone());
            }
            for unit in stage {
                x = unit.forward(&x);
            }
        }
        (earlier, x)
    }
}

#[cfg(test)]
mod tests {
    use super::same_padding;

    #[test]
    fn same_padding_is_tensorflows() {
        // 7×7 stride 2 on 64: 32 outputs need 69 pixels, 5 of padding, 2 before.
        assert_eq!(same_padding(64, 7, 2), (2, 3));
        assert_eq!(same_padding(65, 7, 2), (3, 3));
        assert_eq!(same_padding(32, 3, 2), (0, 1));
        assert_eq!(same_padding(16, 1, 2), (0, 0));
        assert_eq!(same_padding(5, 3, 1), (1, 1));
    }
}
