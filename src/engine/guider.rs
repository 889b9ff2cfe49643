//! Guiders: how the prompt's and the negative prompt's predictions combine, as diffusers'
//! guiders (`diffusers/guiders/`) do in its modular SDXL pipeline: classifier-free
//! guidance (`ClassifierFreeGuidance`), adaptive projected guidance
//! (`AdaptiveProjectedGuidance`, arXiv:2410.02416) or tangential damping
//! (`TangentialClassifierFreeGuidance`, arXiv:2503.18137), each within an interval of the
//! run's steps outside which the prompt's prediction is taken alone.

use tch::{Kind, Tensor};

/// The combination rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GuiderKind {
    /// `uncond + scale × (cond − uncond)`.
    Cfg,
    /// Adaptive projected guidance: the guidance update, its norm capped and averaged
    /// with momentum, split into its parts parallel and orthogonal to the prompt's
    /// prediction, the parallel one weighted by `eta`.
    Apg {
        /// Momentum of the running average of updates (`None`: no averaging).
        momentum: Option<f64>,
        /// Cap on each sample's update norm (`adaptive_projected_guidance_rescale`); 0
        /// for none.
        norm_threshold: f64,
        /// Weight of the update's part parallel to the prompt's prediction.
        eta: f64,
    },
    /// Tangential damping classifier-free guidance: classifier-free guidance from the
    /// negative prediction projected on the first right singular vector of each image's
    /// [cond; uncond] (its part tangential to the pair's principal direction damped).
    Tcfg,
}

/// A guider and the interval of steps it guides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guider {
    /// The rule.
    pub kind: GuiderKind,
    /// Fraction of the run's steps before which it does not guide.
    pub start: f64,
    /// Fraction of the run's steps from which it does not guide.
    pub stop: f64,
}

impl Guider {
    /// Whether it guides model call `step` of a run of `steps` steps (the guiders'
    /// `int(start × steps) <= step < int(stop × steps)`).
    pub fn guides(&self, step: usize, steps: usize) -> bool {
        let bound = |fraction: f64| (fraction * steps as f64) as usize;
        (bound(self.start)..bound(self.stop)).contains(&step)
    }
}

/// A guider over one run: the run's step count, where its model calls begin, and the
/// momentum's running average.
pub struct GuiderRun {
    guider: Guider,
    /// The steps the fractions count (the run's `num_inference_steps`).
    steps: usize,
    /// The schedule index of the run's first model call.
    first_call: usize,
    running_average: Option<Tensor>,
}

impl GuiderRun {
    /// `guider` over a run of `steps` steps whose first model call is schedule index
    /// `first_call`.
    pub fn new(guider: Guider, steps: usize, first_call: usize) -> Self {
        Self {
            guider,
            steps,
            first_call,
            running_average: None,
        }
    }

    /// Whether it guides the model call at schedule index `index` (outside its interval
    /// the negative prompt's prediction is not needed).
    pub fn guides_call(&self, index: usize) -> bool {
        let step = index.saturating_sub(self.first_call);
        self.guider.guides(step, self.steps)
    }

    /// The guided prediction of schedule index `index` from the float32 predictions of
    /// the negative prompt (`uncond`) and the prompt (`cond`) at guidance `scale`.
    pub fn combine(&mut self, index: usize, uncond: &Tensor, cond: &Tensor, scale: f64) -> Tensor {
        if !self.guides_call(index) {
            return cond.shallow_clone();
        }
        match self.guider.kind {
            GuiderKind::Cfg => uncond + (cond - uncond) * scale,
            GuiderKind::Tcfg => {
                let uncond = tangential_uncond(cond, uncond);
                &uncond + (cond - &uncond) * scale
            }
            GuiderKind::Apg {
                momentum,
                norm_threshold,
                eta,
            } => {
                let mut diff = cond - uncond;
                if let Some(momentum) = momentum {
                    let average = match self.running_average.take() {
                        Some(previous) => &diff + previous * momentum,
                        None => diff.shallow_clone(),
                    };
                    self.running_average = Some(average.shallow_clone());
                    diff = average;
                }
                uncond + projected_update(&diff, cond, norm_threshold, eta) * scale
            }
        }
    }
}

/// TCFG's negative prediction (diffusers' `normalized_guidance` of its tangential guider):
/// each image's `uncond` projected on the first right singular vector of the 2 × D matrix
/// of its flattened `cond` and `uncond`, in float32. A decomposition that fails (non-finite
/// predictions) gives NaN, which the run's final check reports.
fn tangential_uncond(cond: &Tensor, uncond: &Tensor) -> Tensor {
    let images = uncond.size()[0];
    let pair = Tensor::stack(&[cond, uncond], 1)
        .to_kind(Kind::Float)
        .flatten(2, -1);
    let Ok((_, _, v)) = pair.f_svd(true, true) else {
        return uncond.full_like(f64::NAN);
    };
    // [images, D, 1]: the right singular vector of the larger singular value.
    let principal = v.narrow(2, 0, 1);
    uncond
        .reshape([images, 1, -1])
        .to_kind(Kind::Float)
        .matmul(&principal)
        .matmul(&principal.transpose(1, 2))
        .reshape(uncond.size())
        .to_kind(uncond.kind())
}

/// APG's update (diffusers' `normalized_guidance` less its last line): `diff` with each
/// sample's norm capped at `norm_threshold` (when above 0), its parts orthogonal and (times
/// `eta`) parallel to `cond`, projected in float64.
fn projected_update(diff: &Tensor, cond: &Tensor, norm_threshold: f64, eta: f64) -> Tensor {
    let dims: Vec<i64> = (1..diff.dim() as i64).collect();
    let dims = dims.as_slice();
    let diff = if norm_threshold > 0.0 {
        let norm = diff.norm_scalaropt_dim(2, dims, true);
        // torch computes `float / tensor` as the tensor's reciprocal times the float.
        let factor = (norm.reciprocal() * norm_threshold).clamp_max(1.0);
        diff * factor
    } else {
        diff.shallow_clone()
    };
    let kind = diff.kind();
    let (v0, v1) = (diff.to_kind(Kind::Double), cond.to_kind(Kind::Double));
    // torch.nn.functional.normalize: v / max(‖v‖, 1e-12).
    let v1 = &v1 / v1.norm_scalaropt_dim(2, dims, true).clamp_min(1e-12);
    let parallel = (&v0 * &v1).sum_dim_intlist(dims, true, Kind::Double) * &v1;
    let orthogonal = &v0 - &parallel;
    orthogonal.to_kind(kind) + parallel.to_kind(kind) * eta
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apg(momentum: Option<f64>, norm_threshold: f64, eta: f64) -> Guider {
        Guider {
            kind: GuiderKind::Apg {
                momentum,
                norm_threshold,
                eta,
            },
            start: 0.0,
            stop: 1.0,
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("values")
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn the_interval_counts_steps_as_the_guiders_do() {
        let guider = Guider {
            kind: GuiderKind::Cfg,
            start: 0.25,
            stop: 0.75,
        };
        let guided: Vec<usize> = (0..8).filter(|&s| guider.guides(s, 8)).collect();
        assert_eq!(guided, [2, 3, 4, 5]);
        // int() truncates: 0.2 × 6 = 1.2 starts at 1, 0.9 × 6 = 5.4 stops before 5.
        let guider = Guider {
            start: 0.2,
            stop: 0.9,
            ..guider
        };
        let guided: Vec<usize> = (0..6).filter(|&s| guider.guides(s, 6)).collect();
        assert_eq!(guided, [1, 2, 3, 4]);
    }

    #[test]
    fn outside_the_interval_the_prompt_alone() {
        let guider = Guider {
            start: 0.5,
            ..apg(Some(0.5), 0.0, 1.0)
        };
        let mut run = GuiderRun::new(guider, 4, 10);
        let (uncond, cond) = (
            Tensor::from_slice(&[1.0f32, 2.0]),
            Tensor::from_slice(&[3.0f32, 1.0]),
        );
        let (uncond, cond) = (uncond.view([1, 2]), cond.view([1, 2]));
        close(&values(&run.combine(11, &uncond, &cond, 5.0)), &[3.0, 1.0]);
        let guided: Vec<usize> = (9..15).filter(|&i| run.guides_call(i)).collect();
        assert_eq!(guided, [12, 13]);
        // The momentum starts with the first guided step.
        assert!(run.running_average.is_none());
        assert!(run.combine(12, &uncond, &cond, 5.0) != cond);
        assert!(run.running_average.is_some());
    }

    #[test]
    fn tangential_damping_projects_the_negative_prediction_on_the_principal_direction() {
        let tcfg = Guider {
            kind: GuiderKind::Tcfg,
            start: 0.0,
            stop: 1.0,
        };
        let mut run = GuiderRun::new(tcfg, 1, 0);
        // Parallel predictions span one direction: the projection keeps uncond as it is,
        // so TCFG equals CFG.
        let cond = Tensor::from_slice(&[2.0f32, 4.0]).view([1, 2]);
        let uncond = Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]);
        close(&values(&run.combine(0, &uncond, &cond, 3.0)), &[4.0, 8.0]);
        // Orthogonal unit predictions of norms 2 (cond) and 1 (uncond): the principal
        // direction is cond's, on which uncond projects to 0, so the result is 3 × cond.
        let cond = Tensor::from_slice(&[2.0f32, 0.0]).view([1, 2]);
        let uncond = Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]);
        close(&values(&run.combine(0, &uncond, &cond, 3.0)), &[6.0, 0.0]);
        // Each image on its own, and non-finite predictions give NaN.
        let cond = Tensor::from_slice(&[2.0f32, 0.0, 2.0, 4.0]).view([2, 2]);
        let uncond = Tensor::from_slice(&[0.0f32, 1.0, 1.0, 2.0]).view([2, 2]);
        close(
            &values(&run.combine(0, &uncond, &cond, 3.0)),
            &[6.0, 0.0, 4.0, 8.0],
        );
        let nan = Tensor::from_slice(&[f32::NAN, 1.0]).view([1, 2]);
        let out = run.combine(
            0,
            &nan,
            &Tensor::from_slice(&[2.0f32, 0.0]).view([1, 2]),
            3.0,
        );
        assert!(values(&out).iter().any(|v| v.is_nan()));
    }

    #[test]
    fn eta_one_without_cap_or_momentum_is_classifier_free_guidance() {
        let uncond = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([2, 2]);
        let cond = Tensor::from_slice(&[1.5f32, 0.0, -1.0, 3.0]).view([2, 2]);
        let mut run = GuiderRun::new(apg(None, 0.0, 1.0), 1, 0);
        let expected = &uncond + (&cond - &uncond) * 4.0;
        close(
            &values(&run.combine(0, &uncond, &cond, 4.0)),
            &values(&expected),
        );
    }

    #[test]
    fn eta_zero_keeps_the_part_orthogonal_to_the_prompt() {
        // cond along x: the update (1, 1)'s x part goes, its y part (0, 1) stays.
        let cond = Tensor::from_slice(&[2.0f32, 0.0]).view([1, 2]);
        let uncond = Tensor::from_slice(&[1.0f32, -1.0]).view([1, 2]);
        let mut run = GuiderRun::new(apg(None, 0.0, 0.0), 1, 0);
        let guided = run.combine(0, &uncond, &cond, 2.0);
        close(&values(&guided), &[1.0, 1.0]);
    }

    #[test]
    fn the_norm_threshold_caps_each_sample_and_momentum_averages() {
        let uncond = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
        let cond = Tensor::from_slice(&[3.0f32, 4.0, 0.3, 0.4]).view([2, 2]);
        let mut run = GuiderRun::new(apg(None, 1.0, 1.0), 1, 0);
        // Sample 0's update (norm 5) is scaled to norm 1; sample 1's (norm 0.5) is not.
        close(
            &values(&run.combine(0, &uncond, &cond, 1.0)),
            &[0.6, 0.8, 0.3, 0.4],
        );
        let mut run = GuiderRun::new(apg(Some(-0.5), 0.0, 1.0), 2, 0);
        let first = run.combine(0, &uncond, &cond, 1.0);
        close(&values(&first), &values(&cond));
        // Second step: diff + (-0.5) × previous average = 0.5 × diff.
        let second = run.combine(1, &uncond, &cond, 1.0);
        close(&values(&second), &values(&(&cond * 0.5)));
    }
}
