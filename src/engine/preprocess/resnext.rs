//! The ResNeXt encoder LeReS depth runs (torchvision's ResNet layout as controlnet_aux's
//! `Resnext_torch` writes it): a 7×7 stride-2 stem and a 3×3 max pool, then four stages of
//! bottlenecks (1×1, a grouped 3×3 that carries the stage's stride, 1×1) with projected
//! shortcuts where the shape changes; the four stages' outputs are the features. Every
//! batch norm is folded into its convolution. Depths, widths and groups are read from
//! the file, so ResNeXt-101 32×8d (LeReS's `res101`) and narrower ones load alike.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::efficientnet::{fold_batch_norm, shape_of, ShapeMap};
use crate::engine::weights::{numbered_children, VarPath};

/// BatchNorm2d's epsilon.
const BN_EPS: f64 = 1e-5;
/// The stages' strides: the first keeps the pooled resolution, the others halve it.
const STAGE_STRIDES: [i64; 4] = [1, 2, 2, 2];

/// A convolution without bias and its batch norm, folded.
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    groups: i64,
}

impl ConvBn {
    /// `{conv}.weight` taking `input` channels (a `grouped` one in the groups its stored
    /// input width divides them into) and the batch norm `{bn}`: a file of another width
    /// is refused at load, naming the tensor.
    fn load(
        vp: &VarPath,
        shapes: &ShapeMap,
        (conv, bn): (&str, &str),
        (input, stride): (i64, i64),
        grouped: bool,
    ) -> Result<Self> {
        let shape = shape_of(vp, shapes, &format!("{conv}.weight"))?;
        let [out, per_group, kernel, _] = shape[..] else {
            return Err(EngineError::InvalidRequest(format!(
                "`{}.{conv}.weight` is {shape:?}, not a convolution",
                vp.prefix()
            )));
        };
        let groups = if grouped && per_group > 0 && input % per_group == 0 {
            input / per_group
        } else {
            1
        };
        let weight = vp.get(
            &format!("{conv}.weight"),
            &[out, input / groups, kernel, kernel],
        )?;
        let (weight, bias) = fold_batch_norm(&vp.pp(bn), weight, None, BN_EPS)?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: kernel / 2,
            groups,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            self.groups,
        )
    }

    fn outputs(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// A bottleneck block: 1×1, grouped 3×3 (strided), 1×1, plus its shortcut.
struct Bottleneck {
    reduce: ConvBn,
    grouped: ConvBn,
    expand: ConvBn,
    shortcut: Option<ConvBn>,
}

impl Bottleneck {
    fn load(vp: &VarPath, shapes: &ShapeMap, input: i64, stride: i64) -> Result<Self> {
        let reduce = ConvBn::load(vp, shapes, ("conv1", "bn1"), (input, 1), false)?;
        let width = (reduce.outputs(), stride);
        let grouped = ConvBn::load(vp, shapes, ("conv2", "bn2"), width, true)?;
        let expand = ConvBn::load(vp, shapes, ("conv3", "bn3"), (grouped.outputs(), 1), false)?;
        let shortcut = match shapes.contains_key(&format!("{}.downsample.0.weight", vp.prefix())) {
            true => {
                let projection = ("downsample.0", "downsample.1");
                Some(ConvBn::load(
                    vp,
                    shapes,
                    projection,
                    (input, stride),
                    false,
                )?)
            }
            false if stride != 1 || input != expand.outputs() => {
                return Err(EngineError::InvalidRequest(format!(
                    "`{}` changes its input's shape and has no `downsample`",
                    vp.prefix()
                )))
            }
            false => None,
        };
        Ok(Self {
            reduce,
            grouped,
            expand,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let out = self.reduce.forward(x).relu();
        let out = self.grouped.forward(&out).relu();
        let out = self.expand.forward(&out);
        let identity = match &self.shortcut {
            Some(projection) => projection.forward(x),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// The encoder: the stem, then four stages.
pub struct ResNeXt {
    stem: ConvBn,
    stages: Vec<Vec<Bottleneck>>,
}

impl ResNeXt {
    /// Loads the encoder under `vp` (`conv1`, `bn1`, `layer1` … `layer4`).
    pub fn load(vp: &VarPath, shapes: &ShapeMap) -> Result<Self> {
        let stem = ConvBn::load(vp, shapes, ("conv1", "bn1"), (3, 2), false)?;
        let mut width = stem.outputs();
        let mut stages = Vec::new();
        for (i, stride) in STAGE_STRIDES.into_iter().enumerate() {
            let stage = vp.pp(format!("layer{}", i + 1));
            let prefix = format!("{}.", stage.prefix());
            let count = numbered_children(shapes.keys().map(String::as_str), &prefix);
            if count == 0 {
                return Err(EngineError::InvalidRequest(format!(
                    "`{}` has no blocks",
                    stage.prefix()
                )));
            }
            let mut blocks = Vec::new();
            for b in 0..count {
                let block_stride = if b == 0 { stride } else { 1 };
                let block = Bottleneck::load(&stage.pp(b), shapes, width, block_stride)?;
                width = block.expand.outputs();
                blocks.push(block);
            }
            stages.push(blocks);
        }
        Ok(Self { stem, stages })
    }

    /// The four stages' outputs (strides 4, 8, 16 and 32); `between` is asked before
    /// each block, and its error ends the pass.
    pub fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Vec<Tensor>> {
        let x = self.stem.forward(x).relu();
        let mut x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut features = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                between()?;
                x = block.forward(&x);
            }
            features.push(x.shallow_clone());
        }
        Ok(features)
    }

    /// The channels of each stage's output.
    pub fn widths(&self) -> Vec<i64> {
        self.stages
            .iter()
            .filter_map(|stage| stage.last().map(|b| b.expand.outputs()))
            .collect()
    }
}
