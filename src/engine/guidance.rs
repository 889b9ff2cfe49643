//! How a denoising run's UNet batch is laid out for guidance, and how its predictions are
//! combined into one, as diffusers' SDXL pipelines and their PAG variants do
//! (`StableDiffusionXLPipeline.__call__`, `PAGMixin._prepare_perturbed_attention_guidance`
//! and `_apply_perturbed_attention_guidance`, `rescale_noise_cfg`).

use tch::Tensor;

use crate::engine::guider::GuiderRun;
use crate::engine::pag::Pag;

/// The parts of a guided batch, in order: the negative prompt's images (classifier-free
/// guidance), the prompt's, and the prompt's again with perturbed self-attention
/// (perturbed-attention guidance). Each part holds the run's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    /// Classifier-free guidance: a negative part first.
    pub negative: bool,
    /// Perturbed-attention guidance: a perturbed part last.
    pub perturbed: bool,
}

impl BatchLayout {
    /// The layout of the prompt's part alone.
    pub const PROMPT_ONLY: BatchLayout = BatchLayout {
        negative: false,
        perturbed: false,
    };

    /// How many parts the batch has (1 to 3).
    pub fn parts(self) -> i64 {
        1 + i64::from(self.negative) + i64::from(self.perturbed)
    }

    /// `positive` and, as the layout has them, `negative` before it and `positive` again
    /// after it, along the batch dimension.
    pub fn assemble(self, negative: &Tensor, positive: &Tensor) -> Tensor {
        let mut parts = Vec::with_capacity(3);
        if self.negative {
            parts.push(negative);
        }
        parts.push(positive);
        if self.perturbed {
            parts.push(positive);
        }
        Tensor::cat(&parts, 0)
    }

    /// `t` once per part.
    pub fn repeat(self, t: &Tensor) -> Tensor {
        self.assemble(t, t)
    }

    /// The prompt's part of `t`, a batch laid out this way (a view).
    pub fn prompt_part(self, t: &Tensor) -> Tensor {
        t.chunk(self.parts(), 0)[usize::from(self.negative)].shallow_clone()
    }
}

/// How one prediction is made of a batch's parts.
pub struct Guidance<'a> {
    /// The batch's layout.
    pub layout: BatchLayout,
    /// Classifier-free guidance scale (with a negative part).
    pub scale: f64,
    /// Guidance rescale (with a negative part), 0 for none.
    pub rescale: f64,
    /// Perturbed-attention guidance (with a perturbed part).
    pub pag: Option<&'a Pag>,
}

impl Guidance<'_> {
    /// The guided prediction of the float32 batch `prediction` at scheduler timestep
    /// `timestep`: `uncond + scale × (text − uncond) + pag × (text − perturbed)`, the
    /// terms of parts the layout lacks left out, then rescaled as diffusers rescales
    /// classifier-free guidance. A `guider` (with the call's schedule index) combines the
    /// negative and the prompt's parts in place of the first two terms.
    pub fn combine(
        &self,
        prediction: Tensor,
        timestep: f64,
        guider: Option<(&mut GuiderRun, usize)>,
    ) -> Tensor {
        let layout = self.layout;
        if layout.parts() == 1 {
            return prediction;
        }
        let parts = prediction.chunk(layout.parts(), 0);
        let text = &parts[usize::from(layout.negative)];
        let mut guided = if layout.negative {
            let uncond = &parts[0];
            match guider {
                Some((run, index)) => run.combine(index, uncond, text, self.scale),
                None => uncond + (text - uncond) * self.scale,
            }
        } else {
            text.shallow_clone()
        };
        if let (true, Some(pag)) = (layout.perturbed, self.pag) {
            let perturbed = &parts[parts.len() - 1];
            guided += (text - perturbed) * pag.scale_at(timestep);
        }
        if layout.negative && self.rescale > 0.0 {
            rescale_noise_cfg(&guided, text, self.rescale)
        } else {
            guided
        }
    }
}

/// diffusers' `rescale_noise_cfg` (arXiv:2305.08891 §3.4).
fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, rescale: f64) -> Tensor {
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std_text = text.std_dim(dims.as_slice(), true, true);
    let std_cfg = guided.std_dim(dims.as_slice(), true, true);
    let rescaled = guided * (std_text / std_cfg);
    rescaled * rescale + guided * (1.0 - rescale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pag::PagLayer;

    fn batch(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).reshape([values.len() as i64, 1])
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).expect("float tensor")
    }

    fn pag(scale: f64) -> Pag {
        Pag {
            scale,
            adaptive_scale: 0.0,
            layers: vec![PagLayer::parse("mid").expect("valid layer")],
        }
    }

    #[test]
    fn layouts_assemble_parts_in_diffusers_order() {
        let (neg, pos) = (batch(&[1.0]), batch(&[2.0]));
        let all = BatchLayout {
            negative: true,
            perturbed: true,
        };
        assert_eq!(values(&all.assemble(&neg, &pos)), [1.0, 2.0, 2.0]);
        assert_eq!(values(&all.prompt_part(&batch(&[1.0, 2.0, 3.0]))), [2.0]);
        let perturbed_only = BatchLayout {
            negative: false,
            perturbed: true,
        };
        assert_eq!(values(&perturbed_only.assemble(&neg, &pos)), [2.0, 2.0]);
        assert_eq!(perturbed_only.parts(), 2);
        assert_eq!(
            values(&perturbed_only.prompt_part(&batch(&[1.0, 2.0, 3.0, 4.0]))),
            [1.0, 2.0]
        );
    }

    #[test]
    fn predictions_combine_every_guidance_term() {
        let pag = pag(0.5);
        let guidance = |negative, perturbed| Guidance {
            layout: BatchLayout {
                negative,
                perturbed,
            },
            scale: 3.0,
            rescale: 0.0,
            pag: Some(&pag),
        };
        // uncond 1, text 2, perturbed 4: 1 + 3 × 1 + 0.5 × (2 − 4).
        let combined = guidance(true, true).combine(batch(&[1.0, 2.0, 4.0]), 500.0, None);
        assert_eq!(values(&combined), [3.0]);
        let combined = guidance(false, true).combine(batch(&[2.0, 4.0]), 500.0, None);
        assert_eq!(values(&combined), [1.0]);
        let combined = guidance(true, false).combine(batch(&[1.0, 2.0]), 500.0, None);
        assert_eq!(values(&combined), [4.0]);
    }
}
