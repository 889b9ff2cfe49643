//! Which of a schedule's timesteps a run covers: diffusers' `get_timesteps` for an
//! image-based start, `denoising_end` cutting the tail. Request validation asks the same
//! question before a job is admitted, so a window that holds no step is refused up front.

use crate::engine::request::Entry;
use crate::engine::schedulers::{Scheduler, SchedulerConfig};

/// Indices `start..end` of the scheduler's timesteps that a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
}

/// Why a run would cover no timestep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EmptyWindow {
    /// The image-based start leaves no timestep.
    Entry(Entry),
    /// `denoising_end` (the fraction) cuts every timestep after the start.
    End(f64),
}

impl EmptyWindow {
    /// What the request asked for, for a run of `steps` steps.
    pub fn describe(self, steps: usize) -> String {
        match self {
            Self::Entry(Entry::Strength(s)) => {
                format!("`strength` {s} leaves no step of {steps} to run")
            }
            Self::Entry(Entry::DenoisingStart(f)) => {
                format!("`denoising_start` {f} leaves no step of {steps} to run")
            }
            Self::End(f) => format!("`denoising_end` {f} leaves no step of {steps} to run"),
        }
    }
}

/// The window of a run of `steps` steps entering at `entry` (none: from the first
/// timestep) and stopping at `denoising_end` (none: at the last).
pub fn window(
    scheduler: &dyn Scheduler,
    train_steps: i64,
    steps: usize,
    entry: Option<Entry>,
    denoising_end: Option<f64>,
) -> Result<Window, EmptyWindow> {
    let timesteps = scheduler.timesteps();
    let start = match entry {
        Some(entry) => entry_index(scheduler, train_steps, steps, entry)?,
        None => 0,
    };
    let end = match denoising_end {
        Some(fraction) => {
            let cutoff = discrete_cutoff(train_steps, fraction);
            start + timesteps[start..].iter().filter(|&&t| t >= cutoff).count()
        }
        None => timesteps.len(),
    };
    if end <= start {
        return Err(EmptyWindow::End(denoising_end.unwrap_or(1.0)));
    }
    Ok(Window { start, end })
}

/// Whether a run under `config` would cover a timestep, its scheduler built as the run
/// builds it; `Ok` where the scheduler cannot be built (the run reports that itself).
pub fn check_planned_window(
    config: &SchedulerConfig,
    steps: usize,
    entry: Option<Entry>,
    denoising_end: Option<f64>,
) -> Result<(), EmptyWindow> {
    let Ok(scheduler) = config.build(steps) else {
        return Ok(());
    };
    let train_steps = config.num_train_timesteps;
    window(scheduler.as_ref(), train_steps, steps, entry, denoising_end).map(|_| ())
}

/// The timestep a run under `config` first calls the UNet at; `None` where the scheduler
/// cannot be built or the window holds no step (their own rules refuse those).
pub fn planned_first_timestep(
    config: &SchedulerConfig,
    steps: usize,
    entry: Option<Entry>,
) -> Option<f64> {
    let scheduler = config.build(steps).ok()?;
    let train_steps = config.num_train_timesteps;
    let window = window(scheduler.as_ref(), train_steps, steps, entry, None).ok()?;
    scheduler.timesteps().get(window.start).copied()
}

/// The index of the first timestep an image-based start runs: diffusers' `get_timesteps`
/// of the img2img and inpainting pipelines.
fn entry_index(
    scheduler: &dyn Scheduler,
    train_steps: i64,
    steps: usize,
    entry: Entry,
) -> Result<usize, EmptyWindow> {
    let timesteps = scheduler.timesteps();
    match entry {
        Entry::Strength(strength) => {
            let keep = ((steps as f64 * strength) as usize).min(steps);
            if keep == 0 {
                return Err(EmptyWindow::Entry(entry));
            }
            Ok((steps - keep) * scheduler.order())
        }
        Entry::DenoisingStart(fraction) => {
            let cutoff = discrete_cutoff(train_steps, fraction);
            let mut remaining = timesteps.iter().filter(|&&t| t < cutoff).count();
            // A second-order scheduler must not start between its two evaluations.
            if scheduler.order() == 2 && remaining % 2 == 0 {
                remaining += 1;
            }
            let remaining = remaining.min(timesteps.len());
            if remaining == 0 {
                return Err(EmptyWindow::Entry(entry));
            }
            Ok(timesteps.len() - remaining)
        }
    }
}

/// diffusers' `discrete_timestep_cutoff` for a fraction of the schedule: timesteps at or
/// above it belong to the first `fraction`.
fn discrete_cutoff(train_steps: i64, fraction: f64) -> f64 {
    let train = train_steps as f64;
    // Python's round() rounds halves to even.
    (train - fraction * train).round_ties_even()
}
