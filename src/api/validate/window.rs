//! Requests whose denoising windows hold no step: a `denoising_start` past the last
//! timestep, a high-noise fraction that leaves the pass handing over (the base's, or the
//! hires pass) or the refiner nothing to run.
//! Where a window falls depends on the model's scheduler config and the request's
//! scheduler, so the schedule is placed here as the run will place it. Also runs of a
//! consistency scheduler (LCM, TCD) asked for more steps than its schedule has.

use crate::api::validate::fields::Violations;
use crate::engine::hires::{entry as hires_entry, HiresParams};
use crate::engine::pipeline::window::{check_planned_window, EmptyWindow};
use crate::engine::refiner::handoff as refiner_handoff;
use crate::engine::registry::ModelEntry;
use crate::engine::request::{Entry, InitImage, SchedulerOverrides};
use crate::engine::schedulers::lcm::distillation_steps;
use crate::engine::schedulers::{SchedulerConfig, SchedulerKind};
use crate::jobs::RefinerJob;

/// The base's run as the request asks for it.
pub struct BaseRun<'a> {
    pub model: Option<&'a ModelEntry>,
    pub steps: usize,
    pub overrides: SchedulerOverrides,
    pub init: Option<&'a InitImage>,
    /// The steps limit: a run over it is refused by its own rule, and not placed.
    pub max_steps: u32,
}

const HIGH_NOISE_FRACTION: &str = "spec.refiner.high_noise_fraction";

/// Adds a violation for each run of the job that would cover no timestep.
pub fn empty_windows(
    base: &BaseRun<'_>,
    hires: Option<&HiresParams>,
    refiner: Option<&RefinerJob>,
    v: &mut Violations,
) {
    let handoff = refiner.and_then(|r| refiner_handoff(r.params.mode).0);
    let start = base.init.and_then(|i| i.denoising_start);
    let placeable = |steps: usize| steps <= base.max_steps as usize;
    // The first pass hands over unless a hires pass follows it.
    let base_end = handoff.filter(|_| hires.is_none());
    if (start.is_some() || base_end.is_some()) && placeable(base.steps) {
        let entry = base.init.map(InitImage::entry);
        match planned(base.model, &base.overrides, base.steps, entry, base_end) {
            Err(EmptyWindow::Entry(Entry::DenoisingStart(start))) => v.add(
                "spec.init_image.denoising_start",
                format!("{start} leaves no step of {} to run", base.steps),
            ),
            // A strength that leaves no step is refused without the schedule, by its own
            // rule.
            Err(EmptyWindow::Entry(Entry::Strength(_))) => {}
            Err(EmptyWindow::End(_)) => {
                let after = match entry {
                    Some(Entry::Strength(s)) => format!(" entered at strength {s}"),
                    _ => String::new(),
                };
                v.add(
                    HIGH_NOISE_FRACTION,
                    format!(
                        "{} leaves the base model{after} no step of {} to run",
                        base_end.unwrap_or(1.0),
                        base.steps
                    ),
                )
            }
            Ok(()) => {}
        }
    }
    let (Some(refiner), Some(handoff)) = (refiner, handoff) else {
        return;
    };
    if let Some(h) = hires.filter(|h| placeable(h.steps)) {
        let entry = Some(hires_entry(h));
        // A strength that leaves no step is the hires pass's own rule.
        let run = planned(
            base.model,
            &h.scheduler_overrides,
            h.steps,
            entry,
            Some(handoff),
        );
        if let Err(EmptyWindow::End(_)) = run {
            v.add(
                HIGH_NOISE_FRACTION,
                format!(
                    "{handoff} leaves the hires pass entered at strength {} no step of {} to run",
                    h.strength, h.steps
                ),
            );
        }
    }
    let steps = refiner.params.steps;
    if !placeable(steps) {
        return;
    }
    let entry = Some(Entry::DenoisingStart(handoff));
    let overrides = &refiner.params.scheduler_overrides;
    if planned(Some(&refiner.model), overrides, steps, entry, None).is_err() {
        v.add(
            HIGH_NOISE_FRACTION,
            format!("{handoff} leaves the refiner no step of {steps} to run"),
        );
    }
}

/// Adds a violation for each run of a consistency scheduler (LCM, TCD) asked for more
/// steps than the schedule its model was distilled on has (`original_inference_steps`:
/// the request's option, else the model's config, else 50), whose timesteps its steps
/// are taken from.
pub fn consistency_steps(
    base: &BaseRun<'_>,
    hires: Option<&HiresParams>,
    refiner: Option<&RefinerJob>,
    v: &mut Violations,
) {
    let runs = [
        Some(("spec.steps", base.model, &base.overrides, base.steps)),
        hires.map(|h| {
            (
                "spec.hires.steps",
                base.model,
                &h.scheduler_overrides,
                h.steps,
            )
        }),
        refiner.map(|r| {
            let p = &r.params;
            (
                "spec.refiner.steps",
                Some(&r.model),
                &p.scheduler_overrides,
                p.steps,
            )
        }),
    ];
    for (field, model, overrides, steps) in runs.into_iter().flatten() {
        let Some(config) = run_config(model, overrides) else {
            continue;
        };
        let Ok(kind @ (SchedulerKind::Lcm | SchedulerKind::Tcd)) = config.kind() else {
            continue;
        };
        if config.timesteps.is_some() {
            // Custom timesteps are not taken from the schedule.
            continue;
        }
        let original = distillation_steps(&config);
        // A schedule no model has is refused by the option's own rule.
        let schedule = 1..=config.num_train_timesteps;
        if schedule.contains(&original) && steps as i64 > original {
            v.add(
                field,
                format!(
                    "{steps} steps exceed the {} schedule's original_inference_steps ({original}), whose timesteps they are taken from",
                    kind.a1111_name()
                ),
            );
        }
    }
}

/// Whether the run's window holds a step; `Ok` where the model's scheduler is unknown
/// (the run then decides).
fn planned(
    model: Option<&ModelEntry>,
    overrides: &SchedulerOverrides,
    steps: usize,
    entry: Option<Entry>,
    end: Option<f64>,
) -> Result<(), EmptyWindow> {
    let Some(config) = run_config(model, overrides) else {
        return Ok(());
    };
    check_planned_window(&config, steps, entry, end)
}

/// The scheduler config a run of `model` uses under a request's `overrides`; `None` where
/// the model's scheduler is unknown here or the overrides do not apply (their own rules
/// refuse them).
pub fn run_config(
    model: Option<&ModelEntry>,
    overrides: &SchedulerOverrides,
) -> Option<SchedulerConfig> {
    let facts = model.and_then(|m| m.pipeline.as_ref())?;
    overrides.apply(&facts.scheduler_config).ok()
}
