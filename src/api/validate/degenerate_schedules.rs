//! Runs whose schedule makes NaN latents whatever the model predicts (diffusers' too):
//! each run of the job is tried on the scheduler alone (`dry_run`) before admission, and
//! a run that does not stay finite is refused naming the option it runs without. Zero
//! terminal SNR, the usual cause, is explained: the last training timestep keeps no
//! signal, and DDIM, LCM and TCD divide an epsilon prediction by it there.

use crate::api::validate::fields::Violations;
use crate::api::validate::window::{run_config, BaseRun};
use crate::engine::hires::{entry as hires_entry, HiresParams};
use crate::engine::pipeline::dry_run::schedule_stays_finite;
use crate::engine::pipeline::window::planned_first_timestep;
use crate::engine::refiner::handoff as refiner_handoff;
use crate::engine::registry::ModelEntry;
use crate::engine::request::{Entry, InitImage, SchedulerOverrides};
use crate::engine::schedulers::SchedulerConfig;
use crate::jobs::RefinerJob;
use crate::proto::v1 as pb;

/// One run of the job, as it will be placed.
struct Run<'a> {
    /// The request's message holding the run's scheduler options (`spec`, ...).
    prefix: &'static str,
    model: Option<&'a ModelEntry>,
    overrides: &'a SchedulerOverrides,
    steps: usize,
    entry: Option<Entry>,
    end: Option<f64>,
    /// The field to name when no option the request set is to blame.
    otherwise: &'static str,
}

impl Run<'_> {
    fn stays_finite(&self, overrides: &SchedulerOverrides) -> Option<bool> {
        let config = run_config(self.model, overrides)?;
        Some(schedule_stays_finite(
            &config, self.steps, self.entry, self.end,
        ))
    }
}

/// The scheduler config keys a request sets, grouped by the field that sets them, in
/// the order they are blamed (the likeliest cause first).
const FIELDS: [(&str, &[&str]); 15] = [
    (
        "scheduler_options.rescale_betas_zero_snr",
        &["rescale_betas_zero_snr"],
    ),
    (
        "scheduler_options.lower_order_final",
        &["lower_order_final"],
    ),
    (
        "scheduler_options.final_sigmas_type",
        &["final_sigmas_type"],
    ),
    ("scheduler_options.euler_at_final", &["euler_at_final"]),
    ("scheduler_options.solver_order", &["solver_order"]),
    ("scheduler_options.solver_type", &["solver_type"]),
    ("scheduler_options.algorithm_type", &["algorithm_type"]),
    (
        "scheduler_options.sigma_schedule",
        &[
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ],
    ),
    ("scheduler_options.timestep_spacing", &["timestep_spacing"]),
    ("scheduler_options.steps_offset", &["steps_offset"]),
    ("scheduler_options.prediction_type", &["prediction_type"]),
    ("scheduler_options.eta", &["eta"]),
    (
        "scheduler_options.original_inference_steps",
        &["original_inference_steps"],
    ),
    ("timesteps", &["timesteps"]),
    ("sigmas", &["sigmas"]),
];

/// Adds a violation for each run of the job `spec` asks for whose schedule does not stay
/// finite.
pub fn nan_making_runs(
    base: &BaseRun<'_>,
    hires: Option<&HiresParams>,
    spec: &pb::GenerationSpec,
    refiner: Option<&RefinerJob>,
    v: &mut Violations,
) {
    // Without a scheduler of its own, the hires pass runs the first pass's and its options.
    let hires_inherits = spec
        .hires
        .as_ref()
        .is_some_and(|h| h.scheduler == pb::Scheduler::Unspecified as i32);
    for run in runs(base, hires, hires_inherits, refiner) {
        if run.steps > base.max_steps as usize || run.stays_finite(run.overrides) != Some(false) {
            continue;
        }
        let (field, without_it_runs) = blamed_field(&run);
        if v.names(&field) {
            continue;
        }
        let Some(config) = run_config(run.model, run.overrides) else {
            continue;
        };
        v.add(field, explanation(&config, &run, without_it_runs));
    }
}

/// The job's runs: the first pass, the hires pass and the refiner, each with where it
/// enters and leaves its schedule.
fn runs<'a>(
    base: &'a BaseRun<'_>,
    hires: Option<&'a HiresParams>,
    hires_inherits: bool,
    refiner: Option<&'a RefinerJob>,
) -> Vec<Run<'a>> {
    let handoff = refiner.and_then(|r| refiner_handoff(r.params.mode).0);
    let mut runs = vec![Run {
        prefix: "spec",
        model: base.model,
        overrides: &base.overrides,
        steps: base.steps,
        entry: base.init.map(InitImage::entry),
        end: handoff.filter(|_| hires.is_none()),
        otherwise: "spec.scheduler",
    }];
    if let Some(h) = hires {
        runs.push(Run {
            prefix: if hires_inherits { "spec" } else { "spec.hires" },
            model: base.model,
            overrides: &h.scheduler_overrides,
            steps: h.steps,
            entry: Some(hires_entry(h)),
            end: handoff,
            otherwise: if hires_inherits {
                "spec.hires.strength"
            } else {
                "spec.hires.scheduler"
            },
        });
    }
    if let Some(r) = refiner {
        let (_, entry) = refiner_handoff(r.params.mode);
        runs.push(Run {
            prefix: "spec.refiner",
            model: Some(&r.model),
            overrides: &r.params.scheduler_overrides,
            steps: r.params.steps,
            entry: Some(entry),
            end: None,
            otherwise: "spec.refiner.scheduler",
        });
    }
    runs
}

/// The first field the request set without which the run stays finite (and `true`);
/// else the scheduler it named, or the run's `otherwise` (and `false`).
fn blamed_field(run: &Run<'_>) -> (String, bool) {
    let set = |keys: &[&str]| keys.iter().any(|k| run.overrides.keys.contains_key(*k));
    for (field, keys) in FIELDS.iter().filter(|(_, keys)| set(keys)) {
        let mut without = run.overrides.clone();
        without.keys.retain(|k, _| !keys.contains(&k.as_str()));
        if run.stays_finite(&without) == Some(true) {
            let field = match *field {
                // Custom schedules are the request's own fields.
                "timesteps" | "sigmas" => format!("spec.{field}"),
                _ => format!("{}.{field}", run.prefix),
            };
            return (field, true);
        }
    }
    let named_scheduler = run.overrides.class.is_some() && !run.otherwise.ends_with("strength");
    if named_scheduler {
        return (format!("{}.scheduler", run.prefix), false);
    }
    (run.otherwise.to_string(), false)
}

/// Why the run makes NaN latents, and what runs instead.
fn explanation(config: &SchedulerConfig, run: &Run<'_>, without_it_runs: bool) -> String {
    let scheduler = config.kind().map_or("the scheduler", |k| k.a1111_name());
    let first = planned_first_timestep(config, run.steps, run.entry);
    if let Some(t) = first.filter(|&t| config.clean_image_undefined_at(t)) {
        return format!(
            "{scheduler} with zero terminal SNR (rescale_betas_zero_snr) starts this run at timestep {t}, where alphas_cumprod is 0 and an epsilon prediction gives no clean image (the result would be NaN): use v-prediction, leading spacing, a strength below 1, or Euler, Euler a, DPM++ or UniPC, which keep the last timestep's signal above 0"
        );
    }
    let remedy = if without_it_runs {
        "without this option it runs"
    } else {
        "another scheduler or step count runs"
    };
    format!(
        "{scheduler} on this schedule of {} steps makes NaN latents whatever the model predicts (its step coefficients divide by zero, as diffusers' do): {remedy}",
        run.steps
    )
}
