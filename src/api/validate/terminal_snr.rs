//! Runs that would start where their scheduler cannot form the clean image: under zero
//! terminal SNR (`rescale_betas_zero_snr`) the last training timestep keeps no signal,
//! and DDIM, LCM and TCD divide an epsilon prediction by that signal, so a run that
//! starts there (trailing or linspace spacing, a strength of 1) would make a NaN image,
//! as diffusers does. Refused before admission, naming the option that led there.

use crate::api::validate::fields::Violations;
use crate::api::validate::window::{run_config, BaseRun};
use crate::engine::hires::{entry as hires_entry, HiresParams};
use crate::engine::pipeline::window::planned_first_timestep;
use crate::engine::registry::ModelEntry;
use crate::engine::request::{Entry, InitImage, RefinerMode, SchedulerOverrides};
use crate::jobs::RefinerJob;

/// One run of the job, as placed for this check.
struct Run<'a> {
    /// The request's message holding the run's scheduler (`spec`, `spec.hires`, ...).
    prefix: &'static str,
    model: Option<&'a ModelEntry>,
    overrides: &'a SchedulerOverrides,
    steps: usize,
    entry: Option<Entry>,
    /// The field to name when the request set none of the run's scheduler options.
    otherwise: String,
}

/// Adds a violation for each run that would start at a timestep where its scheduler
/// leaves the clean image undefined. `hires_inherits`: the hires pass runs the first
/// pass's scheduler and options (none named for it).
pub fn undefined_starts(
    base: &BaseRun<'_>,
    hires: Option<&HiresParams>,
    hires_inherits: bool,
    refiner: Option<&RefinerJob>,
    v: &mut Violations,
) {
    let mut runs = vec![Run {
        prefix: "spec",
        model: base.model,
        overrides: &base.overrides,
        steps: base.steps,
        entry: base.init.map(InitImage::entry),
        otherwise: "spec.scheduler".into(),
    }];
    if let Some(h) = hires {
        runs.push(Run {
            prefix: if hires_inherits { "spec" } else { "spec.hires" },
            model: base.model,
            overrides: &h.scheduler_overrides,
            steps: h.steps,
            entry: Some(hires_entry(h)),
            otherwise: if hires_inherits {
                "spec.hires.strength".into()
            } else {
                "spec.hires.scheduler".into()
            },
        });
    }
    if let Some(r) = refiner {
        let entry = match r.params.mode {
            RefinerMode::EnsembleOfExperts {
                high_noise_fraction,
            } => Entry::DenoisingStart(high_noise_fraction),
            RefinerMode::Img2Img { strength } => Entry::Strength(strength),
        };
        runs.push(Run {
            prefix: "spec.refiner",
            model: Some(&r.model),
            overrides: &r.params.scheduler_overrides,
            steps: r.params.steps,
            entry: Some(entry),
            otherwise: "spec.refiner.scheduler".into(),
        });
    }
    for run in runs.iter().filter(|r| r.steps <= base.max_steps as usize) {
        let Some(config) = run_config(run.model, run.overrides) else {
            continue;
        };
        let Some(t) = planned_first_timestep(&config, run.steps, run.entry) else {
            continue;
        };
        if !config.clean_image_undefined_at(t) {
            continue;
        }
        let field = blamed_field(run);
        if v.names(&field) {
            continue;
        }
        let scheduler = config.kind().map_or("the scheduler", |k| k.a1111_name());
        v.add(
            field,
            format!(
                "{scheduler} with zero terminal SNR (rescale_betas_zero_snr) starts this run at timestep {t}, where alphas_cumprod is 0 and an epsilon prediction gives no clean image (the result would be NaN): use v-prediction, leading spacing, a strength below 1, or Euler, Euler a, DPM++ or UniPC, which keep the last timestep's signal above 0"
            ),
        );
    }
}

/// The option the request set that leads the run to its undefined start, in the order a
/// user would change them; the run's scheduler (or strength) where it set none.
fn blamed_field(run: &Run<'_>) -> String {
    let options = [
        "rescale_betas_zero_snr",
        "prediction_type",
        "timestep_spacing",
    ];
    options
        .iter()
        .find(|key| run.overrides.keys.contains_key(**key))
        .map_or(run.otherwise.clone(), |key| {
            format!("{}.scheduler_options.{key}", run.prefix)
        })
}
