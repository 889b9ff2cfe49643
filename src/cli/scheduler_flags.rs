//! The scheduler flags of `generate`: `--scheduler` names (sdxld's and A1111's) and
//! `--scheduler-config KEY=VALUE` pairs, as the contract's scheduler and options.

use anyhow::{bail, Context};
use sdxld::api::convert;
use sdxld::engine::schedulers::options::{from_sampler_name, AlgorithmType};
use sdxld::engine::schedulers::sigmas::SigmaSpacing;
use sdxld::proto::v1 as pb;

/// A scheduler name (`euler`, "DPM++ 2M Karras", ...) as the contract's scheduler and
/// options.
pub fn named_scheduler(name: &str, options: &mut pb::SchedulerOptions) -> anyhow::Result<i32> {
    let Some((kind, named)) = from_sampler_name(name) else {
        bail!(
            "unknown scheduler {name:?} (euler, euler-ancestral, heun, kdpm2, kdpm2-ancestral, lms, ddim, dpm-solver-multistep, dpm-solver-singlestep, unipc, lcm, tcd, or an A1111 name such as \"DPM++ 2M Karras\")"
        );
    };
    if let Some(spacing) = named.sigma_schedule {
        options.sigma_schedule = convert::sigma_schedule(spacing) as i32;
    }
    if named.algorithm_type == Some(AlgorithmType::SdeDpmSolverPlusPlus) {
        options.algorithm_type = pb::AlgorithmType::SdeDpmsolverPlusPlus as i32;
    }
    Ok(convert::scheduler(kind) as i32)
}

/// `KEY=VALUE` (a diffusers config key the contract's SchedulerOptions has) into
/// `options`.
pub fn config_pair(pair: &str, options: &mut pb::SchedulerOptions) -> anyhow::Result<()> {
    let Some((key, value)) = pair.split_once('=') else {
        bail!("--scheduler-config takes KEY=VALUE, got {pair:?}");
    };
    let (key, value) = (key.trim(), value.trim());
    let flag = || {
        value
            .parse::<bool>()
            .with_context(|| format!("--scheduler-config {key}: not true or false"))
    };
    let number = || {
        value
            .parse::<u32>()
            .with_context(|| format!("--scheduler-config {key}: not a whole number"))
    };
    let spacing = |s: SigmaSpacing| convert::sigma_schedule(s) as i32;
    match key {
        "use_karras_sigmas" if flag()? => options.sigma_schedule = spacing(SigmaSpacing::Karras),
        "use_exponential_sigmas" if flag()? => {
            options.sigma_schedule = spacing(SigmaSpacing::Exponential)
        }
        "use_beta_sigmas" if flag()? => options.sigma_schedule = spacing(SigmaSpacing::Beta),
        "use_karras_sigmas" | "use_exponential_sigmas" | "use_beta_sigmas" => {
            options.sigma_schedule = spacing(SigmaSpacing::Default)
        }
        "timestep_spacing" => {
            options.timestep_spacing = match value {
                "leading" => pb::TimestepSpacing::Leading,
                "trailing" => pb::TimestepSpacing::Trailing,
                "linspace" => pb::TimestepSpacing::Linspace,
                _ => bail!("--scheduler-config timestep_spacing: leading, trailing or linspace"),
            } as i32
        }
        "steps_offset" => options.steps_offset = Some(number()?),
        "solver_order" => options.solver_order = Some(number()?),
        "algorithm_type" => {
            options.algorithm_type = match value {
                "dpmsolver++" => pb::AlgorithmType::DpmsolverPlusPlus,
                "sde-dpmsolver++" => pb::AlgorithmType::SdeDpmsolverPlusPlus,
                _ => bail!("--scheduler-config algorithm_type: dpmsolver++ or sde-dpmsolver++"),
            } as i32
        }
        "solver_type" => {
            options.solver_type = match value {
                "midpoint" => pb::SolverType::Midpoint,
                "heun" => pb::SolverType::Heun,
                "bh1" => pb::SolverType::Bh1,
                "bh2" => pb::SolverType::Bh2,
                _ => bail!("--scheduler-config solver_type: midpoint, heun, bh1 or bh2"),
            } as i32
        }
        "lower_order_final" => options.lower_order_final = Some(flag()?),
        "euler_at_final" => options.euler_at_final = Some(flag()?),
        "final_sigmas_type" => {
            options.final_sigmas_type = match value {
                "zero" => pb::FinalSigmasType::Zero,
                "sigma_min" => pb::FinalSigmasType::SigmaMin,
                _ => bail!("--scheduler-config final_sigmas_type: zero or sigma_min"),
            } as i32
        }
        "eta" => options.eta = Some(value.parse().context("--scheduler-config eta: not a number")?),
        "rescale_betas_zero_snr" => options.rescale_betas_zero_snr = Some(flag()?),
        "original_inference_steps" => options.original_inference_steps = Some(number()?),
        "prediction_type" => {
            options.prediction_type = match value {
                "epsilon" => pb::PredictionType::Epsilon,
                "v_prediction" => pb::PredictionType::VPrediction,
                _ => bail!("--scheduler-config prediction_type: epsilon or v_prediction"),
            } as i32
        }
        other => bail!(
            "--scheduler-config: `{other}` is not a scheduler option a request can set (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, timestep_spacing, steps_offset, solver_order, algorithm_type, solver_type, lower_order_final, euler_at_final, final_sigmas_type, eta, rescale_betas_zero_snr, prediction_type, original_inference_steps)"
        ),
    }
    Ok(())
}
