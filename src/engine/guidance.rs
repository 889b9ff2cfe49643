//! How a denoising run's UNet batch is laid out for guidance, and how its predictions are
//! combined into one, as diffusers' SDXL pipelines and their PAG variants do
//! (`StableDiffusionXLPipeline.__call__`, `PAGMixin._prepare_perturbed_attention_guidance`
//! and `_apply_perturbed_attention_guidance`, `rescale_noise_cfg`).

use tch::Tensor;

use crate::engine::guider::GuiderRun;
use crate::engine::pag::Pag;

/// The parts of a guided batch, in order: the negative prompt's images (classifier-free
/// guidance), the prompt's (one part per sub-prompt of a composable prompt), and the
/// prompt's again with perturbed self-attention (perturbed-attention guidance, with one
/// prompt part only). Each part holds the run's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLayout {
    /// Classifier-free guidance: a negative part first.
    pub negative: bool,
    /// The prompt's parts, at least 1.
    pub prompts: i64,
    /// Perturbed-attention guidance: a perturbed part last.
    pub perturbed: bool,
}

impl BatchLayout {
    /// The layout of the prompt's part alone.
    pub const PROMPT_ONLY: BatchLayout = BatchLayout {
        negative: false,
        prompts: 1,
        perturbed: false,
    };

    /// How many parts the batch has.
    pub fn parts(self) -> i64 {
        i64::from(self.negative) + self.prompts + i64::from(self.perturbed)
    }

    /// `positive` for every prompt part and, as the layout has them, `negative` before
    /// them and `positive` again after them, along the batch dimension.
    pub fn assemble(self, negative: &Tensor, positive: &Tensor) -> Tensor {
        let mut parts = Vec::with_capacity(self.parts().max(1) as usize);
        if self.negative {
            parts.push(negative);
        }
        parts.extend(std::iter::repeat_n(positive, self.prompts.max(1) as usize));
        if self.perturbed {
            parts.push(positive);
        }
        Tensor::cat(&parts, 0)
    }

    /// [`Self::assemble`] with the prompt parts given: `prompts` holds them in order.
    pub fn assemble_prompts(self, negative: &Tensor, prompts: &Tensor) -> Tensor {
        let mut parts = Vec::with_capacity(3);
        if self.negative {
            parts.push(negative);
        }
        parts.push(prompts);
        if self.perturbed {
            parts.push(prompts);
        }
        Tensor::cat(&parts, 0)
    }

    /// `t` once per part.
    pub fn repeat(self, t: &Tensor) -> Tensor {
        self.assemble(t, t)
    }

    /// The (first) prompt part of `t`, a batch laid out this way (a view).
    pub fn prompt_part(self, t: &Tensor) -> Tensor {
        t.chunk(self.parts(), 0)[usize::from(self.negative)].shallow_clone()
    }

    /// The parts of `t` after the negative one (a view; all of `t` without one).
    pub fn past_negative(self, t: &Tensor) -> Tensor {
        if !self.negative {
            return t.shallow_clone();
        }
        let rows = t.size()[0];
        let part = rows / self.parts();
        t.narrow(0, part, rows - part)
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
    /// The prompt parts' weights, which scale their guidance (A1111's composable
    /// prompts; a part without one weighs 1).
    pub weights: &'a [f64],
}

impl Guidance<'_> {
    /// The guided prediction of the float32 batch `prediction` at scheduler timestep
    /// `timestep`: `uncond + Σ weight × scale × (text − uncond) + pag × (text − perturbed)`
    /// over the prompt parts, the terms of parts the layout lacks left out, then rescaled
    /// as diffusers rescales classifier-free guidance (A1111's `combine_denoised` for
    /// several parts). A `guider` (with the call's schedule index) combines the negative
    /// and the prompt's part in place of the first two terms.
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
        let first = usize::from(layout.negative);
        let text = &parts[first];
        let scale = |part: usize| self.scale * self.weights.get(part).copied().unwrap_or(1.0);
        let mut guided = if layout.negative {
            let uncond = &parts[0];
            match guider {
                Some((run, index)) => run.combine(index, uncond, text, scale(0)),
                None => {
                    let mut guided = uncond + (text - uncond) * scale(0);
                    for part in 1..layout.prompts as usize {
                        guided += (&parts[first + part] - uncond) * scale(part);
                    }
                    guided
                }
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
            prompts: 1,
            perturbed: true,
        };
        assert_eq!(values(&all.assemble(&neg, &pos)), [1.0, 2.0, 2.0]);
        assert_eq!(values(&all.prompt_part(&batch(&[1.0, 2.0, 3.0]))), [2.0]);
        let perturbed_only = BatchLayout {
            negative: false,
            prompts: 1,
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
                prompts: 1,
                perturbed,
            },
            scale: 3.0,
            rescale: 0.0,
            pag: Some(&pag),
            weights: &[],
        };
        // uncond 1, text 2, perturbed 4: 1 + 3 × 1 + 0.5 × (2 − 4).
        let combined = guidance(true, true).combine(batch(&[1.0, 2.0, 4.0]), 500.0, None);
        assert_eq!(values(&combined), [3.0]);
        let combined = guidance(false, true).combine(batch(&[2.0, 4.0]), 500.0, None);
        assert_eq!(values(&combined), [1.0]);
        let combined = guidance(true, false).combine(batch(&[1.0, 2.0]), 500.0, None);
        assert_eq!(values(&combined), [4.0]);
    }

    #[test]
    fn composable_prompts_weigh_each_parts_guidance() {
        let layout = BatchLayout {
            negative: true,
            prompts: 3,
            perturbed: false,
        };
        // Two images a part: negative, then three prompt parts.
        let t = batch(&[1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 5.0, 50.0]);
        assert_eq!(values(&layout.prompt_part(&t)), [2.0, 20.0]);
        assert_eq!(
            values(&layout.past_negative(&t)),
            [2.0, 20.0, 3.0, 30.0, 5.0, 50.0]
        );
        let (neg, pos) = (batch(&[1.0]), batch(&[2.0]));
        assert_eq!(values(&layout.assemble(&neg, &pos)), [1.0, 2.0, 2.0, 2.0]);
        let prompts = batch(&[2.0, 3.0, 4.0]);
        assert_eq!(
            values(&layout.assemble_prompts(&neg, &prompts)),
            [1.0, 2.0, 3.0, 4.0]
        );
        let guidance = Guidance {
            layout,
            scale: 2.0,
            rescale: 0.0,
            pag: None,
            weights: &[0.5, -1.0, 0.25],
        };
        // 1 + 2 × (0.5 × 1 − 1 × 2 + 0.25 × 4), and 10 + 2 × (0.5 × 10 − 20 + 0.25 × 40).
        let combined = guidance.combine(t, 500.0, None);
        assert_eq!(values(&combined), [0.0, 0.0]);
        // One part's weight scales its guidance.
        let single = Guidance {
            layout: BatchLayout {
                prompts: 1,
                ..layout
            },
            weights: &[0.5],
            ..guidance
        };
        assert_eq!(
            values(&single.combine(batch(&[1.0, 3.0]), 500.0, None)),
            [3.0]
        );
    }
}
