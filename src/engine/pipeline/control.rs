//! ControlNet units in the denoising loop, as diffusers' `StableDiffusionXLControlNet*`
//! pipelines run them: each unit's control map repeated for the batch (and doubled for
//! guidance unless it runs in guess mode), its residuals scaled by its window over the
//! model calls of the run, the residuals of all units summed in unit order. Units of
//! T2I-Adapters run as `StableDiffusionXLAdapterPipeline` runs them: once per run, their
//! scaled features repeated for every image and part of the batch and handed to the
//! UNet at the calls of their window.

use tch::Tensor;

use crate::engine::control::{
    adapter_mismatch, mismatch, ControlMode, ControlUnit, ControlledModel,
};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::guidance::BatchLayout;
use crate::engine::models::attention::Context;
use crate::engine::models::control_model::ControlModel;
use crate::engine::models::controlnet::{ControlNetModel, ControlScale, EmbeddedCondition};
use crate::engine::models::embeddings::AddedCond;
use crate::engine::models::t2i_adapter::T2IAdapter;
use crate::engine::models::unet::{ControlAdditions, ControlResiduals};
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};

/// A ControlNet unit as a denoising run takes it.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    /// The ControlNet or T2I-Adapter.
    pub model: &'a ControlModel,
    /// The control maps at the output size, each [1, 3, H, W] float32 in [0, 1] on the
    /// CPU: one, or for a union model one per condition of the unit.
    pub maps: &'a [Tensor],
    /// Scale, window, mode and a union model's conditions.
    pub unit: &'a ControlUnit,
}

/// A ControlNet unit prepared for one run.
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

/// A T2I-Adapter unit prepared for one run: its features times its scale, repeated for
/// every image and part of the batch.
struct PreparedAdapter<'a> {
    unit: &'a ControlUnit,
    features: Vec<Tensor>,
}

/// How diffusers counts a run's model calls for the units' windows.
#[derive(Debug, Clone, Copy)]
pub(super) struct ControlCounts {
    /// Index of the run's first model call in the schedule.
    pub first_call: usize,
    /// Model calls a ControlNet's window is a fraction of (the schedule from the run's
    /// entry on).
    pub calls: usize,
    /// Steps a T2I-Adapter's window is a fraction of (the adapter pipeline's
    /// `num_inference_steps`); a guider's interval is a fraction of them too.
    pub adapter_steps: usize,
}

/// The units of one run.
pub(super) struct Controls<'a> {
    units: Vec<Prepared<'a>>,
    adapters: Vec<PreparedAdapter<'a>>,
    counts: ControlCounts,
    /// The parts of the batch their inputs are repeated for.
    layout: BatchLayout,
}

/// The text conditioning a ControlNet call sees.
pub(super) struct ControlContext<'t> {
    pub context: &'t Tensor,
    /// The tokens each row attends to, where not all.
    pub text_mask: Option<&'t Tensor>,
    pub text_embeds: &'t Tensor,
    pub time_ids: &'t Tensor,
    /// The batch's parts.
    pub layout: BatchLayout,
}

impl<'a> Controls<'a> {
    /// `controls` for a run of `images` images per part of `layout` at `placement`,
    /// whose model calls diffusers counts as `counts` says.
    pub fn prepare(
        controls: &[Control<'a>],
        images: i64,
        layout: BatchLayout,
        placement: Placement,
        counts: ControlCounts,
    ) -> Result<Self> {
        let mut units = Vec::new();
        let mut adapters = Vec::new();
        for c in controls {
            match c.model {
                ControlModel::ControlNet(model) => {
                    units.push(prepare_controlnet(model, c, images, layout, placement));
                }
                ControlModel::Adapter(adapter) => {
                    let copies = images * layout.parts();
                    let features = adapter_features(adapter, c, copies, placement)?;
                    adapters.push(PreparedAdapter {
                        unit: c.unit,
                        features,
                    });
                }
            }
        }
        Ok(Self {
            units,
            adapters,
            counts,
            layout,
        })
    }

    /// The units for calls of the prompt's part of the batch alone (views of this run's
    /// inputs).
    pub fn prompt_only(&self) -> Controls<'a> {
        let layout = self.layout;
        let part = |t: &Tensor| layout.prompt_part(t);
        let units = self
            .units
            .iter()
            .map(|u| Prepared {
                // Guess mode under guidance embeds the prompt's maps alone already.
                embedded: if u.guess && layout.negative {
                    u.embedded.iter().map(Tensor::shallow_clone).collect()
                } else {
                    u.embedded.iter().map(part).collect()
                },
                ..*u
            })
            .collect();
        let adapters = self
            .adapters
            .iter()
            .map(|a| PreparedAdapter {
                unit: a.unit,
                features: a.features.iter().map(part).collect(),
            })
            .collect();
        Controls {
            units,
            adapters,
            counts: self.counts,
            layout: BatchLayout::PROMPT_ONLY,
        }
    }

    /// The same units (views of this run's inputs).
    pub fn view(&self) -> Controls<'a> {
        let same = |t: &Tensor| t.shallow_clone();
        Controls {
            units: self
                .units
                .iter()
                .map(|u| Prepared {
                    embedded: u.embedded.iter().map(same).collect(),
                    ..*u
                })
                .collect(),
            adapters: self
                .adapters
                .iter()
                .map(|a| PreparedAdapter {
                    unit: a.unit,
                    features: a.features.iter().map(same).collect(),
                })
                .collect(),
            counts: self.counts,
            layout: self.layout,
        }
    }

    /// Whether there is no unit.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty() && self.adapters.is_empty()
    }

    /// What the units add to model call `index` (an index into the schedule) for
    /// `model_input` (the scaled latents, doubled when guided, without an inpainting
    /// UNet's extra channels); `None` when no unit acts at this call.
    pub fn additions(
        &self,
        index: usize,
        model_input: &Tensor,
        timestep: &Tensor,
        c: &ControlContext<'_>,
    ) -> Option<ControlAdditions> {
        let call = index.checked_sub(self.counts.first_call)?;
        let residuals = self.residuals(call, model_input, timestep, c);
        let features = self.features(call);
        (residuals.is_some() || !features.is_empty()).then_some(ControlAdditions {
            residuals,
            features,
        })
    }

    /// The T2I-Adapter units' features at call `call` of the run, summed level by level
    /// over the units whose window holds it (in unit order, as diffusers' `MultiAdapter`
    /// sums them); empty when none does.
    fn features(&self, call: usize) -> Vec<Tensor> {
        let mut sum: Vec<Tensor> = Vec::new();
        let acting = self.adapters.iter().filter(|a| {
            a.unit.scale != 0.0 && a.unit.adapter_in_window(call, self.counts.adapter_steps)
        });
        for adapter in acting {
            if sum.is_empty() {
                sum = adapter.features.iter().map(Tensor::shallow_clone).collect();
            } else {
                sum = sum
                    .iter()
                    .zip(&adapter.features)
                    .map(|(a, b)| a + b)
                    .collect();
            }
        }
        sum
    }

    /// The summed residuals of the ControlNet units at call `call` of the run; `None`
    /// when none acts. A unit whose residuals would be zeros at this call (scale 0, or
    /// outside its window) is not run; a union unit of several conditions always runs:
    /// diffusers scales its conditions inside the fusion, so its residuals are not zeros
    /// at scale 0.
    fn residuals(
        &self,
        call: usize,
        model_input: &Tensor,
        timestep: &Tensor,
        c: &ControlContext<'_>,
    ) -> Option<ControlResiduals> {
        let mut sum: Option<ControlResiduals> = None;
        for unit in &self.units {
            let keep = if unit.unit.in_window(call, self.counts.calls) {
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

/// A ControlNet unit's maps through its conditioning embedding, repeated for the images
/// of each part of `layout` it sees.
fn prepare_controlnet<'a>(
    model: &'a ControlNetModel,
    c: &Control<'a>,
    images: i64,
    layout: BatchLayout,
    placement: Placement,
) -> Prepared<'a> {
    // diffusers' PAG pipelines have no guess mode: their ControlNets see the whole batch
    // (guess mode itself is refused with PAG).
    let guess = !layout.perturbed
        && (c.unit.mode == ControlMode::Guess || model.config().control.global_pool_conditions);
    let copies = if layout.negative && guess {
        images * layout.prompts
    } else {
        images * layout.parts()
    };
    let embed = |map: &Tensor| {
        let image = map
            .repeat([copies, 1, 1, 1])
            .to_device(placement.device)
            .to_kind(placement.kind);
        model.embed(&image)
    };
    Prepared {
        model,
        unit: c.unit,
        guess,
        embedded: c.maps.iter().map(embed).collect(),
    }
}

/// A T2I-Adapter unit's features: its map through the adapter once, times the unit's
/// scale, repeated `copies` times.
fn adapter_features(
    adapter: &T2IAdapter,
    c: &Control<'_>,
    copies: i64,
    placement: Placement,
) -> Result<Vec<Tensor>> {
    let map = c.maps.first().ok_or_else(|| {
        EngineError::InvalidRequest("a T2I-Adapter unit needs a control map".into())
    })?;
    let features = adapter.forward(&map.to_device(placement.device))?;
    Ok(features
        .into_iter()
        .map(|f| (f * c.unit.scale).repeat([copies, 1, 1, 1]))
        .collect())
}

/// What one ControlNet call takes besides its images.
struct CallInputs<'t> {
    sample: Tensor,
    context: Tensor,
    text_mask: Option<Tensor>,
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
        // Guess mode under guidance: the prompt's parts only, zeros for the negative.
        let part = |t: &Tensor| {
            if half {
                c.layout.past_negative(t)
            } else {
                t.shallow_clone()
            }
        };
        let inputs = CallInputs {
            sample: part(model_input),
            context: part(c.context),
            text_mask: c.text_mask.map(part),
            text_embeds: part(c.text_embeds),
            time_ids: part(c.time_ids),
            timestep,
        };
        let residuals = self.call(&inputs, scales)?;
        if !half {
            return Some(residuals);
        }
        let prompts = c.layout.prompts;
        let pad = |t: Tensor| {
            let negative = t.narrow(0, 0, t.size()[0] / prompts).zeros_like();
            Tensor::cat(&[negative, t], 0)
        };
        Some(ControlResiduals {
            down: residuals.down.into_iter().map(pad).collect(),
            mid: pad(residuals.mid),
        })
    }

    fn call(&self, inputs: &CallInputs<'_>, scales: &[f64]) -> Option<ControlResiduals> {
        let added = AddedCond {
            text_embeds: &inputs.text_embeds,
            time_ids: &inputs.time_ids,
            timestep_cond: None,
        };
        let context = Context {
            text_mask: inputs.text_mask.as_ref(),
            ..Context::text(&inputs.context)
        };
        if !self.model.is_union() {
            let scale = ControlScale {
                scale: *scales.first()?,
                guess_mode: self.guess,
            };
            return Some(self.model.forward_embedded(
                &inputs.sample,
                inputs.timestep,
                &context,
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
            &context,
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
    pub fn control_mismatch(&self, model: &ControlModel) -> Option<String> {
        let controlled = ControlledModel {
            unet: self.unet.config(),
            vae_factor: self.vae_scale_factor(),
            latent_channels: self.vae.latent_channels(),
        };
        match model {
            ControlModel::ControlNet(model) => mismatch(&controlled, model.config()),
            ControlModel::Adapter(adapter) => adapter_mismatch(&controlled, adapter.config()),
        }
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
            if let Some(why) = control
                .model
                .adapter()
                .and_then(|a| adapter_unit_problem(a, p, unit))
            {
                return bad(why);
            }
        }
        Ok(())
    }
}

/// Why a unit's maps and conditions do not fit its ControlNet, if they do not: a union
/// model takes one condition per map, each of a type it knows; another ControlNet one map
/// and no conditions.
fn union_mismatch(control: &Control<'_>) -> Option<String> {
    let unit = control.unit;
    let Some(model) = control.model.controlnet().filter(|m| m.is_union()) else {
        return match (control.maps.len(), unit.conditions.is_empty()) {
            (1, true) => None,
            (_, false) => Some("control types apply to union models only".into()),
            (n, true) => Some(format!("{n} control maps for a ControlNet that takes one")),
        };
    };
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

/// Why a T2I-Adapter unit cannot run in a run of `p`, if it cannot: the adapter has no
/// guess mode, and its pixel unshuffle takes only sides that are multiples of its factor.
fn adapter_unit_problem(
    adapter: &T2IAdapter,
    p: &GenerateParams,
    unit: &ControlUnit,
) -> Option<String> {
    if unit.mode == ControlMode::Guess {
        return Some("a T2I-Adapter has no guess mode".into());
    }
    let factor = adapter.config().downscale_factor;
    (p.width % factor != 0 || p.height % factor != 0).then(|| {
        format!(
            "a T2I-Adapter of downscale factor {factor} takes sides that are multiples of {factor}, not {}x{}",
            p.width, p.height
        )
    })
}
