//! DnCNN and FDnCNN, as spandrel runs them (`DnCNN/__arch/network_dncnn.py` and the
//! descriptor's call, in eval mode): 3×3 convolutions with ReLU between them, the body's
//! batch norms (epsilon 1e-4) folded into their convolutions at load. DnCNN predicts the
//! noise and returns the input less it; FDnCNN takes spandrel's noise-level map (15/255)
//! as a last input channel and predicts the image.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::upscale::kair::with_noise_map;
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::weights::VarPath;

/// KAIR's batch norms' epsilon.
const BATCH_NORM_EPS: f64 = 1e-4;

/// DnCNN or FDnCNN.
pub struct DnCnn {
    /// Every convolution but the last, each followed by ReLU.
    layers: Vec<SameConv>,
    last: SameConv,
    noise_map: bool,
}

impl DnCnn {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::DnCnn {
            channels,
            features,
            layers,
            batch_norm,
            noise_map,
        } = architecture
        else {
            unreachable!("a DnCNN architecture");
        };
        let vp = vp.pp("model");
        let input = channels + i64::from(noise_map);
        // The sequence's entries: the head and its ReLU, then per body layer a
        // convolution, its batch norm where there is one and a ReLU.
        let per_layer = if batch_norm { 3 } else { 2 };
        let head = SameConv::load(&vp.pp(0), [input, features], 3, 1, true)?;
        let body = (0..layers - 2).map(|l| {
            let index = 2 + per_layer * l;
            let conv = SameConv::load(&vp.pp(index), [features, features], 3, 1, true)?;
            match batch_norm {
                true => conv.normed(&vp.pp(index + 1), BATCH_NORM_EPS),
                false => Ok(conv),
            }
        });
        let last = vp.pp(2 + per_layer * (layers - 2));
        Ok(Self {
            layers: std::iter::once(Ok(head))
                .chain(body)
                .collect::<Result<_>>()?,
            last: SameConv::load(&last, [features, channels], 3, 1, true)?,
            noise_map,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let input = match self.noise_map {
            true => with_noise_map(image),
            false => image.shallow_clone(),
        };
        let x = in_turn(input, &self.layers, between, |conv, x| {
            let mut y = conv.forward(x);
            let _ = y.relu_();
            y
        })?;
        let predicted = self.last.forward(&x);
        Ok(match self.noise_map {
            true => predicted,
            false => image - predicted,
        })
    }
}
