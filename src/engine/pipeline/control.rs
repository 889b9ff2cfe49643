//! ControlNet units in the denoising loop, as diffusers' `StableDiffusionXLControlNet*`
//! pipelines run them: each unit's control map repeated for the batch (and doubled for
//! guidance unless it runs in guess mode), its residuals scaled by its window over the
//! model calls of the run, the residuals of all units summed in unit order.

use tch::Tensor;

use crate::engine::control::{mismatch, ControlMode, ControlUnit, ControlledModel};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::guidance::BatchLayout;
use crate::engine::models::controlnet::{ControlNetModel, ControlScale, EmbeddedCondition};
use crate::engine::models::embeddings::AddedCond;
use crate::engine::models::unet::ControlResiduals;
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};

/// A ControlNet unit as a denoising run takes it.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    /// The ControlNet.
    pub model: &'a ControlNetModel,
    /// The control maps at the output size, each [1, 3, H, W] float32 in [0, 1] on the
    /// CPU: one, or for a union model one per condition of the unit.
    pub maps: &'a [Tensor],
    /// Scale, window, mode and a union model's conditions.
    pub unit: &'a ControlUnit,
}

/// A unit prepared for one run.
struct Prepared<'a> {
    model: &'a ControlNetModel,
    unit: &'a ControlUnit,
    /// Guess mode: the conditional half only (also forced by `global_pool_conditions`, as
    /// diffusers forces it).
    guess: bool,
    /// The maps repeated for the run's images (doubled when the unit sees both halves),
    /// through the ControlNet's conditioning embedding once for all steps.
    embedded: Vec<Tensor>,
}

/// The units of one run.
pub(super) struct Controls<'a> {
    units: Vec<Prepared<'a>>,
    /// Index of the run's first model call in the schedule.
    first_call: usize,
    /// Model calls diffusers counts for the window (the schedule from the run's entry on).
    calls: usize,
}

/// The text conditioning a ControlNet call sees.
pub(super) struct ControlContext<'t> {
    pub context: &'t Tensor,
    pub text_embeds: &'t Tensor,
    pub time_ids: &'t Tensor,
    /// The batch's parts.
    pub layout: BatchLayout,
}

impl<'a> Controls<'a> {
    /// `controls` for a run of `images` images per part of `layout` at `placement`; the
    /// run's first model call is `first_call` of a schedule diffusers counts `calls` calls
    /// in.
    pub fn prepare(
        controls: &[Control<'a>],
        images: i64,
        layout: BatchLayout,
        placement: Placement,
        (first_call, calls): (usize, usize),
    ) -> Self {
        let units = controls
            .iter()
            .map(|c| {
                // diffusers' PAG pipelines have no guess mode: their ControlNets see the
                // whole batch (guess mode itself is refused with PAG).
                let guess = !layout.perturbed
                    && (c.unit.mode == ControlMode::Guess
                        || c.model.config().control.global_pool_conditions);
                let copies = if layout.negative && guess {
                    images
                } else {
                    images * layout.parts()
                };
                let embed = |map: &Tensor| {
                    let image = map
                        .repeat([copies, 1, 1, 1])
                        .to_device(placement.device)
                        .to_kind(placement.kind);
                    c.model.embed(&image)
                };
                Prepared {
                    model: c.model,
                    unit: c.unit,
                    guess,
                    embedded: c.maps.iter().map(embed).collect(),
                }
            })
            .collect();
        Self {
            units,
            first_call,
            calls,
        }
    }

    /// Whether there is no unit.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The summed residuals of model call `index` (an index into the schedule) for
    /// `model_input` (the scaled latents, doubled when guided, without an inpainting
    /// UNet's extra channels); `None` when no unit acts at this call. A unit whose
    /// residuals would be zeros at this call (scale 0, or outside its window) is not run;
    /// a union unit of several conditions always runs: diffusers scales its conditions
    /// inside the fusion, so its residuals are not zeros at scale 0.
    pub fn residuals(
        &self,
        index: usize,
        model_input: &Tensor,
        timestep: &Tensor,
        c: &ControlContext<'_>,
    ) -> Option<ControlResiduals> {
        let call = index.checked_sub(self.first_call)?;
        let mut sum: Option<ControlResiduals> = None;
        for unit in &self.units {
            let keep = if unit.unit.in_window(call, self.calls) {
                1.0
            } else {
                0.0
            };
            let scales: Vec<f64> = if unit.unit.conditions.is_empty() {
                vec![unit.unit.scale * keep]
            } else {
                unit.unit
                    .conditions
                    .iter()
                    .map(|c| c.scale * keep)
                    .collect()
            };
            let fused_scales = unit.model.is_union() && scales.len() > 1;
            if !fused_scales && scales.iter().all(|s| *s == 0.0) {
                continue;
            }
            let residuals = unit.forward(model_input, timestep, c, &scales)?;
            sum = Some(match sum {
                None => residuals,
                Some(acc) => add(acc, residuals),
            });
        }
        sum
    }
}

/// What one ControlNet call takes besides its images.
struct CallInputs<'t> {
    sample: Tensor,
    context: Tensor,
    text_embeds: Tensor,
    time_ids: Tensor,
    timestep: &'t Tensor,
}

impl Prepared<'_> {
    /// The unit's residuals for the guided batch, its maps at `scales`.
    fn forward(
        &self,
        model_input: &Tensor,
        timestep: &Tensor,
        c: &ControlContext<'_>,
        scales: &[f64],
    ) -> Option<ControlResiduals> {
        let half = self.guess && c.layout.negative;
        // Guess mode under guidance: the conditional half only, zeros for the other.
        let part = |t: &Tensor| {
            if half {
                t.chunk(2, 0)[1].shallow_clone()
            } else {
                t.shallow_clone()
            }
        };
        let inputs = CallInputs {
            sample: part(model_input),
            context: part(c.context),
            text_embeds: part(c.text_embeds),
            time_ids: part(c.time_ids),
            timestep,
        };
        let residuals = self.call(&inputs, scales)?;
        if !half {
            return Some(residuals);
        }
        let pad = |t: Tensor| Tensor::cat(&[t.zeros_like(), t], 0);
        Some(ControlResiduals {
            down: residuals.down.into_iter().map(pad).collect(),
            mid: pad(residuals.mid),
        })
    }

    fn call(&self, inputs: &CallInputs<'_>, scales: &[f64]) -> Option<ControlResiduals> {
        let added = AddedCond {
            text_embeds: &inputs.text_embeds,
            time_ids: &inputs.time_ids,
        };
        if !self.model.is_union() {
            let scale = ControlScale {
                scale: *scales.first()?,
                guess_mode: self.guess,
            };
            return Some(self.model.forward_embedded(
                &inputs.sample,
                inputs.timestep,
                &inputs.context,
                Some(&added),
                self.embedded.first()?,
                scale,
            ));
        }
        let conditions: Vec<EmbeddedCondition<'_>> = self
            .embedded
            .iter()
            .zip(&self.unit.conditions)
            .zip(scales)
            .map(|((embedded, condition), &scale)| EmbeddedCondition {
                embedded,
                control_type: condition.control_type.index(),
                scale,
            })
            .collect();
        self.model.forward_union_embedded(
            &inputs.sample,
            inputs.timestep,
            &inputs.context,
            Some(&added),
            &conditions,
            self.guess,
        )
    }
}

/// Residuals summed state by state (diffusers' MultiControlNetModel order).
fn add(acc: ControlResiduals, more: ControlResiduals) -> ControlResiduals {
    ControlResiduals {
        down: acc
            .down
            .iter()
            .zip(&more.down)
            .map(|(a, b)| a + b)
            .collect(),
        mid: acc.mid + more.mid,
    }
}

impl SdxlPipeline {
    /// Why `model` cannot control this pipeline, if it cannot.
    pub fn control_mismatch(&self, model: &ControlNetModel) -> Option<String> {
        let controlled = ControlledModel {
            unet: self.unet.config(),
            vae_factor: self.vae_scale_factor(),
            latent_channels: self.vae.latent_channels(),
        };
        mismatch(&controlled, model.config())
    }

    /// Checks the units of a run of `p` before any work is done.
    pub(super) fn check_controls(
        &self,
        p: &GenerateParams,
        controls: &[Control<'_>],
    ) -> Result<()> {
        for (i, control) in controls.iter().enumerate() {
            if let Some(why) = self.control_mismatch(control.model) {
                return Err(EngineError::Incompatible(format!(
                    "ControlNet unit {i} cannot control `{}`: {why}",
                    self.dir.display()
                )));
            }
            let bad = |m: String| {
                Err(EngineError::InvalidRequest(format!(
                    "ControlNet unit {i}: {m}"
                )))
            };
            for map in control.maps {
                if map.size() != [1, 3, p.height, p.width] {
                    return bad(format!(
                        "a control map is {:?}, not [1, 3, {}, {}]",
                        map.size(),
                        p.height,
                        p.width
                    ));
                }
            }
            let unit = control.unit;
            if let Some(why) = union_mismatch(control) {
                return bad(why);
            }
            if !(0.0..=2.0).contains(&unit.scale) {
                return bad(format!("the scale must be in [0, 2], got {}", unit.scale));
            }
            let window_ok = (0.0..1.0).contains(&unit.guidance_start)
                && unit.guidance_end > unit.guidance_start
                && unit.guidance_end <= 1.0;
            if !window_ok {
                return bad(format!(
                    "the window [{}, {}] must lie in [0, 1] with its start below its end",
                    unit.guidance_start, unit.guidance_end
                ));
            }
            if p.pag.is_some() && unit.mode == ControlMode::Guess {
                return bad("guess mode does not combine with perturbed-attention guidance (diffusers' PAG pipelines have none)".into());
            }
        }
        Ok(())
    }
}

/// Why a unit's maps and conditions do not fit its ControlNet, if they do not: a union
/// model takes one condition per map, each of a type it knows; another ControlNet one map
/// and no conditions.
fn union_mismatch(control: &Control<'_>) -> Option<String> {
    let (model, unit) = (control.model, control.unit);
    if !model.is_union() {
        return match (control.maps.len(), unit.conditions.is_empty()) {
            (1, true) => None,
            (_, false) => Some("control types apply to union models only".into()),
            (n, true) => Some(format!("{n} control maps for a ControlNet that takes one")),
        };
    }
    if unit.conditions.is_empty() {
        return Some("a union model needs a control type for its image".into());
    }
    if unit.conditions.len() != control.maps.len() {
        return Some(format!(
            "{} conditions for {} control maps",
            unit.conditions.len(),
            control.maps.len()
        ));
    }
    let known = model.control_types();
    unit.conditions
        .iter()
        .find(|c| c.control_type.index() >= known)
        .map(|c| {
            format!(
                "control type {:?} is not one of the model's {known}",
                c.control_type
            )
        })
}
