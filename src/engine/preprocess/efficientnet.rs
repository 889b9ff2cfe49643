//! geffnet's TensorFlow-ported EfficientNet (`tf_efficientnet_b*`), the encoder of
//! controlnet_aux's NormalBAE network: a 3×3 stride-2 stem, seven stages of depthwise-
//! separable (the first) and inverted-residual blocks with squeeze-and-excitation and
//! swish, and a 1×1 head convolution, every convolution padded as TensorFlow's "same"
//! does (zeros split low side first, by the input's size where the stride is 2), batch
//! norms (ε 1e-3) folded into the convolutions. Widths, depths and kernel sizes are read
//! from the weights; the strides are the EfficientNet family's.

use std::collections::HashMap;

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::weights::VarPath;

/// Each stage's first stride (the same for B0 to B8).
const STAGE_STRIDES: [i64; 7] = [1, 2, 2, 2, 1, 2, 1];
/// TensorFlow's batch norm epsilon, which the tf_ variants keep.
const BN_EPS: f64 = 1e-3;

/// Stored tensor shapes by name (the network's own names).
pub type ShapeMap = HashMap<String, Vec<i64>>;

/// A convolution with its batch norm folded in.
pub struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    groups: i64,
}

impl FoldedConv {
    /// Loads `{conv}.weight` (no bias) and folds the batch norm at `bn` into it.
    pub fn load(
        vp: &VarPath,
        shapes: &ShapeMap,
        conv: &str,
        bn: &str,
        stride: i64,
        eps: f64,
    ) -> Result<Self> {
        let shape = shape_of(vp, shapes, &format!("{conv}.weight"))?;
        let out = shape[0];
        let weight = vp.get(&format!("{conv}.weight"), &shape)?;
        let conv_bias = if vp.contains(&format!("{conv}.bias")) {
            Some(vp.get(&format!("{conv}.bias"), &[out])?)
        } else {
            None
        };
        let (weight, bias) = fold_batch_norm(&vp.pp(bn), weight, conv_bias, eps)?;
        let groups = if shape[1] == 1 && out > 1 { out } else { 1 };
        Ok(Self {
            weight,
            bias,
            stride,
            groups,
        })
    }

    /// The convolution with TensorFlow's "same" padding.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        same_conv(x, &self.weight, Some(&self.bias), self.stride, self.groups)
    }

    /// Its output channels.
    pub fn channels(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// A convolution's `weight` and `bias` with the inference batch norm at `norm` folded
/// in: the weight scaled by gamma / sqrt(var + eps) per output channel, the bias moved
/// by the mean and shifted by beta.
pub fn fold_batch_norm(
    norm: &VarPath,
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let out = weight.size()[0];
    let gamma = norm.get("weight", &[out])?;
    let beta = norm.get("bias", &[out])?;
    let mean = norm.get("running_mean", &[out])?;
    let var = norm.get("running_var", &[out])?;
    let scale = gamma / (var + eps).sqrt();
    let shifted = match bias {
        Some(b) => b - mean,
        None => -mean,
    };
    Ok((weight * scale.view([out, 1, 1, 1]), beta + shifted * scale))
}

/// The stored shape of `vp.name`, or a missing-tensor error naming it.
pub fn shape_of(vp: &VarPath, shapes: &ShapeMap, name: &str) -> Result<Vec<i64>> {
    let key = if vp.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vp.prefix())
    };
    shapes
        .get(&key)
        .cloned()
        .ok_or_else(|| EngineError::Internal(format!("the weights have no `{key}`")))
}

/// A convolution padded as TensorFlow's "same": output size ceil(input / stride), the
/// zeros split with the smaller half before.
fn same_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: i64,
    groups: i64,
) -> Tensor {
    let size = x.size();
    let kernel = weight.size();
    let pad =
        |input: i64, k: i64| (((input + stride - 1) / stride - 1) * stride + k - input).max(0);
    let (ph, pw) = (pad(size[2], kernel[2]), pad(size[3], kernel[3]));
    let padded = if ph > 0 || pw > 0 {
        x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
    } else {
        x.shallow_clone()
    };
    padded.conv2d(weight, bias, [stride, stride], [0, 0], [1, 1], groups)
}

/// Squeeze-and-excitation: the channels' means through a swish bottleneck gate them.
struct SqueezeExcite {
    reduce: (Tensor, Tensor),
    expand: (Tensor, Tensor),
}

impl SqueezeExcite {
    fn load(vp: &VarPath, shapes: &ShapeMap) -> Result<Self> {
        let conv = |name: &str| -> Result<(Tensor, Tensor)> {
            let shape = shape_of(vp, shapes, &format!("{name}.weight"))?;
            Ok((
                vp.get(&format!("{name}.weight"), &shape)?,
                vp.get(&format!("{name}.bias"), &shape[..1])?,
            ))
        };
        Ok(Self {
            reduce: conv("conv_reduce")?,
            expand: conv("conv_expand")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let squeezed = x.mean_dim([2i64, 3].as_slice(), true, None);
        let reduced = squeezed
            .conv2d(
                &self.reduce.0,
                Some(&self.reduce.1),
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )
            .silu();
        let gate = reduced.conv2d(
            &self.expand.0,
            Some(&self.expand.1),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        x * gate.sigmoid()
    }
}

/// One block: depthwise separable (depthwise, SE, pointwise) or inverted residual
/// (pointwise expansion, depthwise, SE, pointwise projection).
struct Block {
    expand: Option<FoldedConv>,
    depthwise: FoldedConv,
    excite: SqueezeExcite,
    project: FoldedConv,
    residual: bool,
}

impl Block {
    fn load(vp: &VarPath, shapes: &ShapeMap, stride: i64) -> Result<Self> {
        let inverted = shapes.contains_key(&format!("{}.conv_pwl.weight", vp.prefix()));
        let (expand, depthwise, project) = if inverted {
            (
                Some(FoldedConv::load(vp, shapes, "conv_pw", "bn1", 1, BN_EPS)?),
                FoldedConv::load(vp, shapes, "conv_dw", "bn2", stride, BN_EPS)?,
                FoldedConv::load(vp, shapes, "conv_pwl", "bn3", 1, BN_EPS)?,
            )
        } else {
            (
                None,
                FoldedConv::load(vp, shapes, "conv_dw", "bn1", stride, BN_EPS)?,
                FoldedConv::load(vp, shapes, "conv_pw", "bn2", 1, BN_EPS)?,
            )
        };
        let input = match &expand {
            Some(conv) => conv.weight.size()[1],
            None => depthwise.channels(),
        };
        let residual = stride == 1 && input == project.channels();
        Ok(Self {
            expand,
            depthwise,
            excite: SqueezeExcite::load(&vp.pp("se"), shapes)?,
            project,
            residual,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = match &self.expand {
            Some(conv) => conv.forward(x).silu(),
            None => x.shallow_clone(),
        };
        h = self.depthwise.forward(&h).silu();
        h = self.excite.forward(&h);
        h = self.project.forward(&h);
        if self.residual {
            h + x
        } else {
            h
        }
    }
}

/// The encoder: stem, stages, head convolution.
pub struct EfficientNet {
    stem: FoldedConv,
    stages: Vec<Vec<Block>>,
    head: Tensor,
}

impl EfficientNet {
    /// Loads the network under `vp` (geffnet's names: `conv_stem`, `bn1`, `blocks.S.B`,
    /// `conv_head`); `bn2` after the head is the classifier's and not loaded.
    pub fn load(vp: &VarPath, shapes: &ShapeMap) -> Result<Self> {
        let stem = FoldedConv::load(vp, shapes, "conv_stem", "bn1", 2, BN_EPS)?;
        let blocks = vp.pp("blocks");
        let count = |prefix: String| {
            (0..)
                .take_while(|i| {
                    shapes
                        .keys()
                        .any(|k| k.starts_with(&format!("{prefix}.{i}.")))
                })
                .count()
        };
        let stage_count = count(blocks.prefix().to_string());
        if stage_count != STAGE_STRIDES.len() {
            return Err(EngineError::Internal(format!(
                "an EfficientNet of {stage_count} stages (expected {})",
                STAGE_STRIDES.len()
            )));
        }
        let mut stages = Vec::with_capacity(stage_count);
        for (s, first_stride) in STAGE_STRIDES.iter().enumerate() {
            let stage = blocks.pp(s.to_string());
            let depth = count(stage.prefix().to_string());
            let stage_blocks = (0..depth)
                .map(|b| {
                    let stride = if b == 0 { *first_stride } else { 1 };
                    Block::load(&stage.pp(b.to_string()), shapes, stride)
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push(stage_blocks);
        }
        let head_shape = shape_of(vp, shapes, "conv_head.weight")?;
        Ok(Self {
            stem,
            stages,
            head: vp.get("conv_head.weight", &head_shape)?,
        })
    }

    /// Each stage's output and the head convolution's (before its batch norm);
    /// `between` is asked before each block, and its error ends the pass.
    pub fn forward(
        &self,
        pixels: &Tensor,
        between: &mut Between<'_>,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let mut x = self.stem.forward(pixels).silu();
        let mut outputs = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            for block in stage {
                between()?;
                x = block.forward(&x);
            }
            outputs.push(x.shallow_clone());
        }
        let head = same_conv(&x, &self.head, None, 1, 1);
        Ok((outputs, head))
    }
}
