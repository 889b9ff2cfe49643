//! The denoising loop of diffusers' SDXL pipelines (`StableDiffusionXLPipeline.__call__`
//! and its img2img and inpainting variants): from the prompt embeddings and the initial
//! latents to the final latents, one scheduler step at a time.

use std::ops::ControlFlow;

use tch::{Device, Kind, Tensor};

use crate::engine::device;
use crate::engine::error::{EngineError, Result};
use crate::engine::guidance::{BatchLayout, Guidance};
use crate::engine::guider::GuiderRun;
use crate::engine::models::attention::{Context, Perturbation};
use crate::engine::models::unet::AddedCond;
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::conditioning::{Conditioning, RunConditioning};
use crate::engine::pipeline::control::{Control, ControlContext, ControlCounts, Controls};
use crate::engine::pipeline::latents::Inpaint;
use crate::engine::pipeline::window::{window, Window};
use crate::engine::pipeline::{GenerateParams, PromptEmbeds, SdxlPipeline, Start};
use crate::engine::profile;
use crate::engine::request::Entry;
use crate::engine::schedulers::Scheduler;

/// A denoising step that finished (step 0 marks the start of the loop).
pub struct Step<'a> {
    /// Scheduler steps done (second-order schedulers call the UNet twice per step).
    pub step: usize,
    /// Scheduler steps in all.
    pub total: usize,
    /// The latents after this step.
    pub latents: &'a Tensor,
}

/// The part of the schedule one run covers.
struct Schedule {
    scheduler: Box<dyn Scheduler>,
    timesteps: Vec<f64>,
    /// Index of the first timestep run.
    start: usize,
    /// Index past the last timestep run.
    end: usize,
}

impl SdxlPipeline {
    /// Checks the parameters against this model before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        self.check(p, false)
    }

    /// [`Self::validate`] for a stage that may start from an earlier stage's latents.
    pub(super) fn check(&self, p: &GenerateParams, handoff: bool) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        for (name, value) in [("width", p.width), ("height", p.height)] {
            if value <= 0 || value % 8 != 0 {
                return bad(format!(
                    "`{name}` must be a positive multiple of 8, got {value}"
                ));
            }
        }
        if p.steps == 0 {
            return bad("`steps` must be at least 1, got 0".into());
        }
        if p.num_images == 0 {
            return bad("`num_images` must be at least 1, got 0".into());
        }
        let fraction_ok = |f: f64| f > 0.0 && f < 1.0;
        if let Some(end) = p.denoising_end.filter(|f| !fraction_ok(*f)) {
            return bad(format!("`denoising_end` must be in (0, 1), got {end}"));
        }
        if let Some(init) = &p.init_image {
            if init.width != p.width || init.height != p.height {
                return bad(format!(
                    "the init image is {}x{} but the requested size is {}x{}",
                    init.width, init.height, p.width, p.height
                ));
            }
            let pixels = (init.width * init.height) as usize;
            if init.pixels.len() != pixels * 3
                || init.mask.as_ref().is_some_and(|m| m.len() != pixels)
            {
                return bad("the init image's or mask's pixels do not match its size".into());
            }
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return bad(format!(
                    "`strength` must be in (0, 1], got {}",
                    init.strength
                ));
            }
            match init.denoising_start {
                Some(start) if !fraction_ok(start) => {
                    return bad(format!("`denoising_start` must be in (0, 1), got {start}"))
                }
                Some(_) if init.mask.is_some() => {
                    return bad("`denoising_start` does not apply to inpainting".into())
                }
                Some(start) if p.denoising_end.is_some_and(|end| start >= end) => {
                    return bad(format!(
                        "`denoising_start` {start} must be below `denoising_end`"
                    ))
                }
                Some(_) => {}
                None if (p.steps as f64 * init.strength) < 1.0 => {
                    return bad(format!(
                        "`strength` {} leaves no step of {} to run (steps x strength must be at least 1)",
                        init.strength, p.steps
                    ))
                }
                None => {}
            }
        } else if self.requires_aesthetics_score && !handoff {
            return Err(EngineError::Incompatible(format!(
                "`{}` is a refiner (requires_aesthetics_score): it runs as a refiner stage or on an init image, not from noise",
                self.dir.display()
            )));
        }
        if !p.guidance_scale.is_finite() {
            return bad("`guidance_scale` must be finite".into());
        }
        if !(0.0..=1.0).contains(&p.guidance_rescale) {
            return bad(format!(
                "`guidance_rescale` must be between 0 and 1, got {}",
                p.guidance_rescale
            ));
        }
        if p.guider.is_some() && p.pag.is_some() {
            return bad("a guider does not combine with perturbed-attention guidance".into());
        }
        if p.guider.is_some() && self.unet.time_cond_proj_dim().is_some() {
            return bad(
                "a guider combines classifier-free guidance's predictions, which a guidance-distilled UNet (time_cond_proj_dim) does not make"
                    .into(),
            );
        }
        self.check_composition(p)?;
        self.check_pag(p)
    }

    /// Perturbed-attention guidance's scales, and layers this UNet has.
    fn check_pag(&self, p: &GenerateParams) -> Result<()> {
        let Some(pag) = &p.pag else {
            return Ok(());
        };
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !(pag.scale.is_finite() && pag.scale > 0.0) {
            return bad(format!("`pag_scale` must be above 0, got {}", pag.scale));
        }
        if !(pag.adaptive_scale.is_finite() && pag.adaptive_scale >= 0.0) {
            return bad(format!(
                "`pag_adaptive_scale` must be at least 0, got {}",
                pag.adaptive_scale
            ));
        }
        if pag.layers.is_empty() {
            return bad("`pag_applied_layers` must name at least one layer".into());
        }
        match pag.unmatched(self.unet.self_attentions()) {
            Some(layer) => bad(format!(
                "the PAG layer `{layer}` finds no self-attention layer of this UNet"
            )),
            None => Ok(()),
        }
    }

    /// Whether the images of `p` draw noise from generators of their own (a stochastic
    /// scheduler, or an init image's latent samples), so that each must be denoised in a
    /// run of its own to match diffusers.
    pub fn needs_own_generators(&self, p: &GenerateParams) -> Result<bool> {
        if p.init_image.is_some() {
            return Ok(true);
        }
        let config = p.scheduler_overrides.apply(&self.scheduler)?;
        Ok(config.build(p.steps)?.is_stochastic())
    }

    /// One denoising run: the images of `p` (several only where they draw no noise of
    /// their own: see [`crate::engine::request::batch_runs`]) from `from`, with the
    /// generator held by the caller, under the ControlNet units `controls`. `on_step` is
    /// called after every step; when it breaks, the run stops there and its value is
    /// returned. The final latents are float32 on the CPU, [N, C, H/f, W/f].
    pub fn denoise<B>(
        &self,
        p: &GenerateParams,
        prompt: &PromptEmbeds,
        from: Start<'_>,
        controls: &[Control<'_>],
        noise: &mut NoiseStream,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<B>,
    ) -> Result<ControlFlow<B, Tensor>> {
        let handoff = from.continues();
        self.check(p, handoff)?;
        self.check_controls(p, controls)?;
        if p.num_images > 1 && (handoff || self.needs_own_generators(p)?) {
            return Err(EngineError::InvalidRequest(
                "images that draw noise of their own are denoised one run each".into(),
            ));
        }
        let _no_grad = tch::no_grad_guard();
        let schedule = self.schedule(p, &from)?;
        let (latents, inpaint) =
            self.initial_latents(p, &from, schedule.scheduler.as_ref(), schedule.start, noise)?;
        let layout = BatchLayout {
            negative: prompt.text.negative.is_some(),
            prompts: prompt.text.embeds.size()[0],
            perturbed: p.pag.is_some(),
        };
        let counts = control_counts(p, &schedule);
        let controls = Controls::prepare(
            controls,
            p.num_images as i64,
            layout,
            self.placement,
            counts,
        )?;
        let conditioning =
            self.conditioning(p, prompt, from.entry(p).is_some(), (layout, controls));
        let total = (schedule.end - schedule.start).div_ceil(schedule.scheduler.order());
        if let ControlFlow::Break(b) = on_step(Step {
            step: 0,
            total,
            latents: &latents,
        }) {
            return Ok(ControlFlow::Break(b));
        }
        // The guiders count the steps as the adapter pipeline does (`num_inference_steps`).
        let guider = p
            .guider
            .map(|g| GuiderRun::new(g, counts.adapter_steps, schedule.start));
        // A1111 counts a prompt's steps from the run's first, continuing the count of
        // the run a `denoising_start` run continues.
        let origin = match from.entry(p) {
            Some(Entry::DenoisingStart(_)) => 0,
            _ => schedule.start,
        };
        let n = p.num_images as i64;
        let conditioning =
            self.run_conditioning(conditioning, prompt, (n, origin), guider.as_ref());
        let run = (latents, inpaint, guider);
        let latents = match self.run_loop(p, schedule, run, &conditioning, noise, on_step) {
            ControlFlow::Continue(latents) => latents,
            ControlFlow::Break(b) => return Ok(ControlFlow::Break(b)),
        };
        let latents = latents.to_kind(Kind::Float).to_device(Device::Cpu);
        if latents.isfinite().all().int64_value(&[]) == 0 {
            return Err(EngineError::NonFinite(format!(
                "try another scheduler configuration (scheduler {:?}, {} steps)",
                p.scheduler_overrides.class, p.steps
            )));
        }
        Ok(ControlFlow::Continue(latents))
    }

    /// The scheduler for `p` and the timesteps a run from `from` covers.
    fn schedule(&self, p: &GenerateParams, from: &Start<'_>) -> Result<Schedule> {
        let config = p.scheduler_overrides.apply(&self.scheduler)?;
        let scheduler = config.build(p.steps)?;
        let Window { start, end } = window(
            scheduler.as_ref(),
            config.num_train_timesteps,
            p.steps,
            from.entry(p),
            p.denoising_end,
        )
        .map_err(|empty| EngineError::InvalidRequest(empty.describe(p.steps)))?;
        let timesteps = scheduler.timesteps().to_vec();
        Ok(Schedule {
            scheduler,
            timesteps,
            start,
            end,
        })
    }

    /// The loop over the schedule's timesteps from the initial latents (with the
    /// inpainting state and the run's guider); progress counts scheduler steps, not UNet
    /// calls.
    fn run_loop<B>(
        &self,
        p: &GenerateParams,
        mut schedule: Schedule,
        (mut latents, inpaint, mut guider): (Tensor, Option<Inpaint>, Option<GuiderRun>),
        conditioning: &RunConditioning,
        noise: &mut NoiseStream,
        on_step: &mut dyn FnMut(Step<'_>) -> ControlFlow<B>,
    ) -> ControlFlow<B, Tensor> {
        let (start, end) = (schedule.start, schedule.end);
        let total = (end - start).div_ceil(schedule.scheduler.order());
        let mut done = 0;
        // A stochastic scheduler's noise, drawn on the host, goes to the device without
        // making the host wait (the schedulers' own move is then a no-op).
        let target = self.placement.device;
        let mut draw = |shape: &[i64]| device::upload(&noise.randn(shape), target);
        // Every timestep on the device at once: a host value copied per step would make
        // the host wait for the device at every step.
        let timesteps: Vec<f32> = schedule.timesteps.iter().map(|&t| t as f32).collect();
        let timesteps = device::upload(&Tensor::from_slice(&timesteps), target);
        for i in start..end {
            let step_stage = profile::span("denoise_step");
            let scheduler = schedule.scheduler.as_mut();
            let timestep = timesteps.get(i as i64);
            let noise_pred = self.predict_noise(
                p,
                scheduler,
                (i, &timestep, schedule.timesteps[i]),
                &latents,
                inpaint.as_ref(),
                conditioning.at(i, guider.as_ref()),
                guider.as_mut(),
            );
            latents = {
                let _stage = profile::span("scheduler");
                scheduler.step(&noise_pred, i, &latents, &mut draw)
            };
            if let Some(state) = inpaint.as_ref().filter(|s| s.masked_latents.is_none()) {
                // 4-channel UNets: keep the unmasked area on the image's noised trajectory;
                // after the run's last step (a `denoising_end` one included) on the image.
                let proper = if i + 1 < end {
                    scheduler.add_noise(&state.image_latents, &state.noise, i + 1)
                } else {
                    state.image_latents.shallow_clone()
                };
                latents = (-&state.mask + 1.0) * proper + &state.mask * &latents;
            }
            drop(step_stage);
            if scheduler.completes_step(i) || i + 1 == end {
                done += 1;
                on_step(Step {
                    step: done.min(total),
                    total,
                    latents: &latents,
                })?;
            }
        }
        ControlFlow::Continue(latents)
    }

    /// The guided noise prediction of UNet call `index` at `timestep` (a scalar on the
    /// device; `time` on the host), by the run's `guider` when it has one.
    #[allow(clippy::too_many_arguments)]
    fn predict_noise(
        &self,
        p: &GenerateParams,
        scheduler: &dyn Scheduler,
        (index, timestep, time): (usize, &Tensor, f64),
        latents: &Tensor,
        inpaint: Option<&Inpaint>,
        c: &Conditioning,
        guider: Option<&mut GuiderRun>,
    ) -> Tensor {
        let mut model_input = scheduler
            .scale_model_input(&c.layout.repeat(latents), index)
            .to_kind(self.placement.kind);
        let control = ControlContext {
            context: &c.context,
            text_mask: c.text_mask.as_ref(),
            text_embeds: &c.text_embeds,
            time_ids: &c.time_ids,
            layout: c.layout,
        };
        let additions = {
            let _stage = (!c.controls.is_empty()).then(|| profile::span("controlnet"));
            c.controls
                .additions(index, &model_input, timestep, &control)
        };
        if let Some((state, masked)) =
            inpaint.and_then(|s| s.masked_latents.as_ref().map(|m| (s, m)))
        {
            // 9-channel inpainting UNets also see the mask and the masked image.
            let (mask, masked) = (c.layout.repeat(&state.mask), c.layout.repeat(masked));
            model_input = Tensor::cat(&[model_input, mask, masked], 1);
        }
        let model_input = model_input.to_kind(self.placement.kind);
        let added = AddedCond {
            text_embeds: &c.text_embeds,
            time_ids: &c.time_ids,
            timestep_cond: c.timestep_cond.as_ref(),
        };
        let _stage = profile::span("unet");
        // Graphs hold the inputs they were captured with: image prompts' keys, FreeU's
        // factors, perturbed layers, a guidance embedding, circular padding and token
        // masks are not.
        let plain = additions.is_none()
            && c.images.is_none()
            && p.freeu.is_none()
            && p.seamless.is_none()
            && c.perturbed_slots.is_none()
            && c.timestep_cond.is_none()
            && c.text_mask.is_none();
        let noise_pred = if plain && self.replays_unet_graphs() {
            self.unet_graphs.call(
                &self.unet,
                self.placement.device,
                &model_input,
                timestep,
                &c.context,
                &added,
            )
        } else {
            let context = Context {
                text: &c.context,
                text_mask: c.text_mask.as_ref(),
                images: c.images.as_ref(),
                freeu: p.freeu,
                perturbation: c.perturbed_slots.as_deref().map(|slots| Perturbation {
                    slots,
                    parts: c.layout.parts(),
                }),
            };
            self.unet.forward_controlled(
                &model_input,
                timestep,
                &context,
                Some(&added),
                additions.as_ref(),
            )
        }
        .to_kind(Kind::Float);
        let guidance = Guidance {
            layout: c.layout,
            scale: p.guidance_scale,
            rescale: p.guidance_rescale,
            pag: p.pag.as_ref(),
            weights: &c.weights,
        };
        guidance.combine(noise_pred, time, guider.map(|g| (g, index)))
    }
}

impl SdxlPipeline {
    /// Whether the UNet's plain calls go through CUDA graphs now: asked for, on CUDA, with
    /// no LoRA adapters on the pipeline and no profile being recorded.
    fn replays_unet_graphs(&self) -> bool {
        self.placement.cuda_graphs
            && self.placement.device.is_cuda()
            && self.adapted.get() == 0
            && !profile::recording()
    }
}

/// How diffusers counts the model calls of a run on `schedule` for the units' windows: a
/// ControlNet's over the schedule from the run's entry on (the part `denoising_end` cuts
/// off included); a T2I-Adapter's over the run's steps (`num_inference_steps`), or under
/// `denoising_end` over the calls it keeps (the adapter pipeline's own count).
fn control_counts(p: &GenerateParams, schedule: &Schedule) -> ControlCounts {
    let from_entry = schedule.timesteps.len() - schedule.start;
    ControlCounts {
        first_call: schedule.start,
        calls: from_entry,
        adapter_steps: if p.denoising_end.is_some() {
            schedule.end - schedule.start
        } else {
            from_entry.div_ceil(schedule.scheduler.order())
        },
    }
}
