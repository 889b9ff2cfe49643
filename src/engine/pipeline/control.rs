//! ControlNet units in the denoising loop, as diffusers' `StableDiffusionXLControlNet*`
//! pipelines run them: each unit's control map repeated for the batch (and doubled for
//! guidance unless it runs in guess mode), its residuals scaled by its window over the
//! model calls of the run, the residuals of all units summed in unit order.

use tch::Tensor;

use crate::engine::control::{mismatch, ControlMode, ControlUnit, ControlledModel};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::controlnet::{ControlNetModel, ControlScale};
use crate::engine::models::embeddings::AddedCond;
use crate::engine::models::unet::ControlResiduals;
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};

/// A ControlNet unit as a denoising run takes it.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    /// The ControlNet.
    pub model: &'a ControlNetModel,
    /// The control map at the output size: [1, 3, H, W] float32 in [0, 1] on the CPU.
    pub map: &'a Tensor,
    /// Scale, window and mode.
    pub unit: &'a ControlUnit,
}

/// A unit prepared for one run.
struct Prepared<'a> {
    model: &'a ControlNetModel,
    unit: ControlUnit,
    /// Guess mode: the conditional half only (also forced by `global_pool_conditions`, as
    /// diffusers forces it).
    guess: bool,
    /// The map repeated for the run's images, doubled when the unit sees both halves.
    image: Tensor,
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
    /// Whether the batch is doubled for guidance (negative half first).
    pub guided: bool,
}

impl<'a> Controls<'a> {
    /// `controls` for a run of `images` images at `placement`; the run's first model
    /// call is `first_call` of a schedule diffusers counts `calls` calls in.
    pub fn prepare(
        controls: &[Control<'a>],
        images: i64,
        guided: bool,
        placement: Placement,
        (first_call, calls): (usize, usize),
    ) -> Self {
        let units = controls
            .iter()
            .map(|c| {
                let guess = c.unit.mode == ControlMode::Guess
                    || c.model.config().control.global_pool_conditions;
                let copies = if guided && !guess { 2 * images } else { images };
                Prepared {
                    model: c.model,
                    unit: *c.unit,
                    guess,
                    image: c
                        .map
                        .repeat([copies, 1, 1, 1])
                        .to_device(placement.device)
                        .to_kind(placement.kind),
                }
            })
            .collect();
        Self {
            units,
            first_call,
            calls,
        }
    }

    /// The summed residuals of model call `index` (an index into the schedule) for
    /// `model_input` (the scaled latents, doubled when guided, without an inpainting
    /// UNet's extra channels); `None` when no unit acts at this call. A unit whose scale
    /// is 0 at this call is skipped: its residuals would be zeros.
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
            let scale = unit.unit.scale_at(call, self.calls);
            if scale == 0.0 {
                continue;
            }
            let residuals = unit.forward(model_input, timestep, c, scale);
            sum = Some(match sum {
                None => residuals,
                Some(acc) => add(acc, residuals),
            });
        }
        sum
    }
}

impl Prepared<'_> {
    fn forward(
        &self,
        model_input: &Tensor,
        timestep: &Tensor,
        c: &ControlContext<'_>,
        scale: f64,
    ) -> ControlResiduals {
        let scale = ControlScale {
            scale,
            guess_mode: self.guess,
        };
        if !(self.guess && c.guided) {
            let added = AddedCond {
                text_embeds: c.text_embeds,
                time_ids: c.time_ids,
            };
            return self.model.forward(
                model_input,
                timestep,
                c.context,
                Some(&added),
                &self.image,
                scale,
            );
        }
        // Guess mode under guidance: the conditional half only, zeros for the other.
        let cond = |t: &Tensor| t.chunk(2, 0)[1].shallow_clone();
        let (text_embeds, time_ids) = (cond(c.text_embeds), cond(c.time_ids));
        let added = AddedCond {
            text_embeds: &text_embeds,
            time_ids: &time_ids,
        };
        let half = self.model.forward(
            &cond(model_input),
            timestep,
            &cond(c.context),
            Some(&added),
            &self.image,
            scale,
        );
        let pad = |t: Tensor| Tensor::cat(&[t.zeros_like(), t], 0);
        ControlResiduals {
            down: half.down.into_iter().map(pad).collect(),
            mid: pad(half.mid),
        }
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
            if control.map.size() != [1, 3, p.height, p.width] {
                return bad(format!(
                    "the control map is {:?}, not [1, 3, {}, {}]",
                    control.map.size(),
                    p.height,
                    p.width
                ));
            }
            let unit = control.unit;
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
        }
        Ok(())
    }
}
