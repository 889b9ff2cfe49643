//! The scheduler run alone, on a stand-in for the model, before a job is admitted: some
//! schedules divide by zero in their step coefficients (a multistep solver's last
//! full-order step onto sigma 0, two equal last sigmas under a third-order step, zero
//! terminal SNR under DDIM), which makes NaN latents whatever the model predicts, in
//! diffusers as here. Such a run is refused up front instead of failing at its end.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use crate::engine::pipeline::window::window;
use crate::engine::request::Entry;
use crate::engine::schedulers::SchedulerConfig;

/// Whether a run of `steps` steps under `config`, entering at `entry` and stopping at
/// `denoising_end`, keeps its latents finite for a model that predicts half its input.
/// `true` where the scheduler cannot be built or the window holds no step (their own
/// rules refuse those).
/// Runs are remembered (a 30-step run takes about a millisecond, a thousand steps tens),
/// so that the requests of a service, which repeat their schedules, pay for it once.
pub fn schedule_stays_finite(
    config: &SchedulerConfig,
    steps: usize,
    entry: Option<Entry>,
    denoising_end: Option<f64>,
) -> bool {
    static RUNS: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    /// Remembered runs at most; all are forgotten when it is reached.
    const REMEMBERED: usize = 4096;
    let Ok(config_json) = serde_json::to_string(config) else {
        return dry_run(config, steps, entry, denoising_end);
    };
    let key = format!("{config_json}|{steps}|{entry:?}|{denoising_end:?}");
    let runs = RUNS.get_or_init(Mutex::default);
    if let Some(&finite) = runs.lock().ok().as_ref().and_then(|r| r.get(&key)) {
        return finite;
    }
    let finite = dry_run(config, steps, entry, denoising_end);
    if let Ok(mut runs) = runs.lock() {
        if runs.len() >= REMEMBERED {
            runs.clear();
        }
        runs.insert(key, finite);
    }
    finite
}

fn dry_run(
    config: &SchedulerConfig,
    steps: usize,
    entry: Option<Entry>,
    denoising_end: Option<f64>,
) -> bool {
    let Ok(mut scheduler) = config.build(steps) else {
        return true;
    };
    let train_steps = config.num_train_timesteps;
    let Ok(run) = window(scheduler.as_ref(), train_steps, steps, entry, denoising_end) else {
        return true;
    };
    let options = (Kind::Float, Device::Cpu);
    let noise = Tensor::ones([1, 1, 1, 1], options);
    let mut sample = match entry {
        Some(_) => scheduler.add_noise(&(&noise * 0.5), &noise, run.start),
        None => &noise * scheduler.init_noise_sigma(),
    };
    let mut no_noise = |shape: &[i64]| Tensor::zeros(shape, options);
    for index in run.start..run.end {
        let prediction = scheduler.scale_model_input(&sample, index) * 0.5;
        sample = scheduler.step(&prediction, index, &sample, &mut no_noise);
    }
    sample.isfinite().all().int64_value(&[]) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::schedulers::PredictionType;

    /// SDXL's betas with `json`'s keys, trailing spacing (so that runs start at 999).
    fn config(json: &str) -> SchedulerConfig {
        let base = r#""beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "trailing""#;
        serde_json::from_str(&format!("{{{base}, {json}}}")).expect("valid config")
    }

    /// The degenerate schedules diffusers makes NaN from (checked there with random
    /// model outputs), and their neighbours that run.
    #[test]
    fn schedules_that_divide_by_zero_are_found() {
        let unipc = r#""_class_name": "UniPCMultistepScheduler""#;
        let unipc_full_order = format!(r#"{unipc}, "lower_order_final": false"#);
        let dpm_third = r#""_class_name": "DPMSolverMultistepScheduler", "solver_order": 3,
            "lower_order_final": false, "use_karras_sigmas": true,
            "final_sigmas_type": "sigma_min""#;
        let dpm_zero = r#""_class_name": "DPMSolverMultistepScheduler", "solver_order": 3,
            "lower_order_final": false"#;
        let ddim = r#""_class_name": "DDIMScheduler", "clip_sample": false,
            "rescale_betas_zero_snr": true"#;
        for (json, steps, finite) in [
            (unipc, 8, true),
            (unipc_full_order.as_str(), 1, true),
            (unipc_full_order.as_str(), 2, false),
            (unipc_full_order.as_str(), 8, false),
            (dpm_third, 2, true),
            (dpm_third, 3, false),
            (dpm_third, 8, false),
            (dpm_zero, 8, true),
            (ddim, 4, false),
            (r#""_class_name": "EulerDiscreteScheduler""#, 30, true),
        ] {
            let c = config(json);
            assert_eq!(
                schedule_stays_finite(&c, steps, None, None),
                finite,
                "{json} {steps}"
            );
        }
        let mut v = config(ddim);
        v.prediction_type = PredictionType::VPrediction;
        assert!(schedule_stays_finite(&v, 4, None, None));
        // Entered below the signal-free timestep, DDIM runs.
        let c = config(ddim);
        assert!(schedule_stays_finite(
            &c,
            4,
            Some(Entry::Strength(0.9)),
            None
        ));
        assert!(!schedule_stays_finite(
            &c,
            4,
            Some(Entry::Strength(1.0)),
            None
        ));
    }
}
