//! MMRealSR (metric-learning modulated real-world SR), as spandrel runs it
//! (`MMRealSR/__arch/mmrealsr_arch.py`, `MMRRDBNet_test`): a degradation estimator
//! predicts each degradation's degree (blur, noise) from the whole input, a layer
//! embeds the degrees, and ESRGAN's RRDBNet runs with every residual-in-residual block's
//! output modulated by the embedding (`(1 + γ)·x + β`, γ and β from each block's own
//! MLP); then RRDBNet's two nearest ×2 rounds.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, Linear};
use crate::engine::upscale::dense_block::{
    conv3, load_rrdb_block, rrdb_block, DenseBlock, Reconstruction,
};
use crate::engine::upscale::layout::Architecture;
use crate::engine::weights::VarPath;

/// The degrees' embedding width (`degradation_dim`, fixed in the reference).
const EMBEDDING: i64 = 512;
/// The estimator's hidden width before each degree (fixed in the reference).
const DEGREE_HIDDEN: i64 = 512;
/// RRDBNet's nearest ×2 rounds.
const ROUNDS: i64 = 2;

/// One layer of an estimator branch's body: a residual block without batch norm (two
/// 3×3 convolutions around a ReLU) or a stride-2 3×3 convolution, as spandrel reads
/// every plain convolution of the body.
enum EstimatorLayer {
    Residual([Conv2d; 2]),
    Down(Conv2d),
}

impl EstimatorLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            EstimatorLayer::Residual([conv1, conv2]) => conv2.forward(&conv1.forward(x).relu()) + x,
            EstimatorLayer::Down(conv) => conv.forward(x),
        }
    }
}

/// The body's layers as read from the first branch (`de_net.body.0`; the layout has
/// checked its stages): a residual block's width, or a strided convolution's input and
/// output widths.
enum Planned {
    Residual(i64),
    Down([i64; 2]),
}

fn body_plan(first_branch: &VarPath) -> Vec<Planned> {
    let width = |shape: Vec<i64>| shape.first().copied().unwrap_or(0);
    let mut plan = Vec::new();
    let mut last = 0;
    for i in 0.. {
        let layer = first_branch.pp(i);
        if let Some(shape) = layer.shape("conv1.weight") {
            last = width(shape);
            plan.push(Planned::Residual(last));
        } else if let Some(shape) = layer.shape("weight") {
            let output = width(shape);
            plan.push(Planned::Down([last, output]));
            last = output;
        } else {
            break;
        }
    }
    plan
}

/// One degradation's branch of the estimator: a first convolution, the body, a global
/// average, a two-layer MLP to the sigmoid degree.
struct EstimatorBranch {
    first: Conv2d,
    body: Vec<EstimatorLayer>,
    hidden: Linear,
    degree: Linear,
}

impl EstimatorBranch {
    fn load(estimator: &VarPath, branch: i64, channels: i64, plan: &[Planned]) -> Result<Self> {
        let body_path = estimator.pp("body").pp(branch);
        let mut last = 0;
        let body = plan
            .iter()
            .enumerate()
            .map(|(i, planned)| {
                let layer = body_path.pp(i);
                Ok(match *planned {
                    Planned::Residual(width) => {
                        last = width;
                        EstimatorLayer::Residual([
                            conv3(&layer, "conv1", width, width)?,
                            conv3(&layer, "conv2", width, width)?,
                        ])
                    }
                    Planned::Down([input, output]) => {
                        last = output;
                        EstimatorLayer::Down(Conv2d::load(&layer, input, output, 3, 2, 1)?)
                    }
                })
            })
            .collect::<Result<_>>()?;
        let first_width = match plan.first() {
            Some(Planned::Residual(width)) => *width,
            _ => 0,
        };
        let fc = estimator.pp("fc_degree").pp(branch);
        Ok(Self {
            first: Conv2d::load(
                &estimator.pp("conv_first").pp(branch),
                channels,
                first_width,
                3,
                1,
                1,
            )?,
            body,
            hidden: Linear::load(&fc.pp(0), last, DEGREE_HIDDEN, true)?,
            degree: Linear::load(&fc.pp(2), DEGREE_HIDDEN, 1, true)?,
        })
    }

    /// The degree [B] of a [B, C, H, W] image.
    fn forward(&self, image: &Tensor) -> Tensor {
        let features = self
            .body
            .iter()
            .fold(self.first.forward(image), |x, layer| layer.forward(&x));
        let pooled = features.mean_dim([2i64, 3].as_slice(), false, None);
        self.degree
            .forward(&self.hidden.forward(&pooled).relu())
            .sigmoid()
            .squeeze_dim(-1)
    }
}

/// A block's affine modulation (`AffineModulate`): γ and β from the embedding through a
/// three-layer MLP.
struct Modulation {
    layers: [Linear; 3],
}

impl Modulation {
    fn load(vp: &VarPath, features: i64) -> Result<Self> {
        let hidden = (EMBEDDING + 2 * features) / 2;
        let fc = vp.pp("fc");
        Ok(Self {
            layers: [
                Linear::load(&fc.pp(0), EMBEDDING, hidden, true)?,
                Linear::load(&fc.pp(2), hidden, hidden, true)?,
                Linear::load(&fc.pp(4), hidden, 2 * features, true)?,
            ],
        })
    }

    /// `(1 + γ)·x + β` for [B, C, H, W] `x` and the [B, 512] `embedding`.
    fn forward(&self, x: &Tensor, embedding: &Tensor) -> Tensor {
        let [first, second, third] = &self.layers;
        let hidden = second.forward(&first.forward(embedding).relu()).relu();
        let parts = third
            .forward(&hidden)
            .unsqueeze(-1)
            .unsqueeze(-1)
            .chunk(2, 1);
        (&parts[0] + 1.0) * x + &parts[1]
    }
}

/// MMRealSR.
pub struct MmRealSr {
    estimator: Vec<EstimatorBranch>,
    embed: Linear,
    conv_first: Conv2d,
    body: Vec<([DenseBlock; 3], Modulation)>,
    conv_body: Conv2d,
    reconstruction: Reconstruction,
}

impl MmRealSr {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::MmRealSr {
            channels,
            features,
            blocks,
            growth,
            degradations,
            ..
        } = architecture
        else {
            unreachable!("an MMRealSR architecture");
        };
        let estimator = vp.pp("de_net");
        let plan = body_plan(&estimator.pp("body").pp(0));
        let body = (0..blocks)
            .map(|b| {
                let block = load_rrdb_block(&vp.pp("body").pp(b), features, growth)?;
                Ok((block, Modulation::load(&vp.pp("am_list").pp(b), features)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            estimator: (0..degradations)
                .map(|d| EstimatorBranch::load(&estimator, d, channels, &plan))
                .collect::<Result<_>>()?,
            embed: Linear::load(&vp.pp("dd_embed").pp(0), degradations, EMBEDDING, true)?,
            conv_first: conv3(vp, "conv_first", channels, features)?,
            body,
            conv_body: conv3(vp, "conv_body", features, features)?,
            reconstruction: Reconstruction::load(vp, features, channels, ROUNDS)?,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let degrees: Vec<Tensor> = self.estimator.iter().map(|b| b.forward(image)).collect();
        let embedding = self.embed.forward(&Tensor::stack(&degrees, 1)).relu();
        let features = self.conv_first.forward(image);
        let trunk = in_turn(
            features.shallow_clone(),
            &self.body,
            between,
            |(block, modulation), trunk| modulation.forward(&rrdb_block(block, trunk), &embedding),
        )?;
        Ok(self
            .reconstruction
            .forward(features + self.conv_body.forward(&trunk)))
    }
}
