//! Schedules that leave a run nothing to do or divide by zero are refused before
//! admission naming the option that makes them so, and every other combination of
//! scheduler, spacing, sigmas and step count runs to its end: never admitted and then
//! failed.

use crate::bad_requests::png;
use crate::common;

use common::server::{quick_spec, TestServer};
use sdxld::proto::v1 as pb;

/// A `denoising_start` that leaves no timestep below it is refused before admission,
/// naming the field; every other one runs. The demo model's Euler schedule is leading
/// with offset 1: 2 steps are timesteps 501 and 1, so 0.998 (cutoff 2) keeps one and
/// 0.999 (cutoff 1) none; Heun, second order, always keeps one (diffusers' rule).
#[tokio::test]
async fn a_denoising_start_that_leaves_no_step_is_refused_before_admission() {
    let server = TestServer::start(&[]).await;
    let spec = |scheduler: pb::Scheduler, options, steps, start| pb::GenerationSpec {
        steps,
        scheduler: scheduler as i32,
        scheduler_options: options,
        init_image: Some(pb::InitImage {
            image: png(64, 64),
            denoising_start: Some(start),
            ..Default::default()
        }),
        ..quick_spec(3)
    };
    let plain = || None;
    let euler = |steps, start| spec(pb::Scheduler::Euler, plain(), steps, start);
    assert_eq!(
        server.refused_or_completed("0.998", euler(2, 0.998)).await,
        Ok(())
    );
    let refused = server
        .refused_or_completed("0.999", euler(2, 0.999))
        .await
        .expect_err("0.999 of 2 Euler steps leaves none");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "spec.init_image.denoising_start");
    assert!(
        refused[0].1.contains("0.999 leaves no step of 2 to run"),
        "{refused:?}"
    );
    let heun = spec(pb::Scheduler::Heun, plain(), 2, 0.999);
    assert_eq!(server.refused_or_completed("Heun", heun).await, Ok(()));

    // The rule over schedules of other spacings and sigma placements: refused before
    // admission or run to the end, never admitted and then failed.
    let trailing = Some(pb::SchedulerOptions {
        timestep_spacing: pb::TimestepSpacing::Trailing as i32,
        ..Default::default()
    });
    let karras = Some(pb::SchedulerOptions {
        sigma_schedule: pb::SigmaSchedule::Karras as i32,
        ..Default::default()
    });
    let schedules = [
        (pb::Scheduler::Euler, plain()),
        (pb::Scheduler::Euler, trailing),
        (pb::Scheduler::DpmSolverMultistep, karras),
        (pb::Scheduler::Ddim, trailing),
        (pb::Scheduler::Heun, plain()),
    ];
    let mut cases = Vec::new();
    for (scheduler, options) in schedules {
        for steps in [1, 3] {
            for start in [0.3, 0.9, 0.99, 0.999, 0.9999] {
                let what = format!("{scheduler:?} {options:?} {steps} steps from {start}");
                cases.push((what, spec(scheduler, options, steps, start)));
            }
        }
    }
    server
        .completed_or_refused_naming("spec.init_image.denoising_start", cases)
        .await;
}

/// Zero terminal SNR leaves the last training timestep no signal; DDIM, LCM and TCD
/// divide an epsilon prediction by it there, so a run that starts at it (trailing or
/// linspace spacing, LCM's and TCD's own schedules, a strength of 1) is refused before
/// admission naming the option, where it used to be admitted and fail with NaN latents.
/// Every other combination runs to its end.
#[tokio::test]
async fn a_run_starting_where_zero_terminal_snr_leaves_no_signal_is_refused() {
    let server = TestServer::start(&[]).await;
    let options = |spacing: pb::TimestepSpacing, prediction: pb::PredictionType| {
        Some(pb::SchedulerOptions {
            rescale_betas_zero_snr: Some(true),
            timestep_spacing: spacing as i32,
            prediction_type: prediction as i32,
            ..Default::default()
        })
    };
    let spec = |scheduler: pb::Scheduler, options, steps| pb::GenerationSpec {
        steps,
        scheduler: scheduler as i32,
        scheduler_options: options,
        ..quick_spec(5)
    };
    use pb::{PredictionType as P, TimestepSpacing as S};
    let trailing = options(S::Trailing, P::Unspecified);
    let refused = server
        .refused_or_completed("DDIM trailing", spec(pb::Scheduler::Ddim, trailing, 2))
        .await
        .expect_err("DDIM trailing starts at 999");
    assert_eq!(
        refused,
        [(
            "spec.scheduler_options.rescale_betas_zero_snr".to_string(),
            refused[0].1.clone()
        )]
    );
    assert!(refused[0].1.contains("timestep 999"), "{refused:?}");
    let v = options(S::Trailing, P::VPrediction);
    let v_prediction = spec(pb::Scheduler::Ddim, v, 2);
    assert_eq!(server.refused_or_completed("v", v_prediction).await, Ok(()));

    // An image entered at strength 1 starts at 999 too; below 1 it does not.
    let img2img = |strength| pb::GenerationSpec {
        init_image: Some(pb::InitImage {
            image: png(64, 64),
            strength: Some(strength),
            ..Default::default()
        }),
        ..spec(pb::Scheduler::Ddim, trailing, 4)
    };
    let at_one = server
        .refused_or_completed("strength 1", img2img(1.0))
        .await;
    assert!(at_one.is_err(), "strength 1 runs from 999");
    assert_eq!(
        server.refused_or_completed("0.9", img2img(0.9)).await,
        Ok(())
    );

    // A hires pass's own scheduler is named under spec.hires; one inheriting the first
    // pass's options is named where they were set.
    let hires = |scheduler: pb::Scheduler, options, strength| pb::GenerationSpec {
        hires: Some(pb::HiresPass {
            scale: Some(1.5),
            steps: 2,
            strength: Some(strength),
            scheduler: scheduler as i32,
            scheduler_options: options,
            ..Default::default()
        }),
        ..quick_spec(6)
    };
    let own = hires(pb::Scheduler::Ddim, trailing, 1.0);
    let refused = server.refused_or_completed("hires", own).await;
    let field = refused.expect_err("hires at 1").remove(0).0;
    assert_eq!(field, "spec.hires.scheduler_options.rescale_betas_zero_snr");
    // (The first pass enters at 0.5, below 999; the hires pass at 1 does not.)
    let inherited = pb::GenerationSpec {
        scheduler: pb::Scheduler::Ddim as i32,
        scheduler_options: trailing,
        init_image: img2img(0.5).init_image,
        ..hires(pb::Scheduler::Unspecified, None, 1.0)
    };
    let refused = server.refused_or_completed("inherited", inherited).await;
    let field = refused.expect_err("inherited at 1").remove(0).0;
    assert_eq!(field, "spec.scheduler_options.rescale_betas_zero_snr");

    // The rule over schedulers, spacings, predictions and step counts.
    let mut cases = Vec::new();
    let spaced = [
        pb::Scheduler::Ddim,
        pb::Scheduler::Euler,
        pb::Scheduler::Unipc,
    ];
    let all_spacings = [S::Unspecified, S::Leading, S::Trailing, S::Linspace];
    let schedulers = spaced
        .iter()
        .flat_map(|&s| all_spacings.iter().map(move |&spacing| (s, spacing)))
        .chain([pb::Scheduler::Lcm, pb::Scheduler::Tcd].map(|s| (s, S::Unspecified)))
        .chain([(pb::Scheduler::DpmSolverMultistep, S::Trailing)])
        .chain([(pb::Scheduler::EulerAncestral, S::Trailing)]);
    for (scheduler, spacing) in schedulers {
        for prediction in [P::Unspecified, P::Epsilon, P::VPrediction] {
            for steps in [1, 2, 4] {
                let what = format!("{scheduler:?} {spacing:?} {prediction:?} {steps} steps");
                let options = options(spacing, prediction);
                cases.push((what, spec(scheduler, options, steps)));
            }
        }
    }
    server
        .completed_or_refused_naming("spec.scheduler_options.rescale_betas_zero_snr", cases)
        .await;
}

/// Multistep solvers whose step coefficients divide by zero (UniPC's last step at full
/// order onto sigma 0, a third-order step between two equal last sigmas), which makes
/// NaN latents from any model in diffusers too, are refused before admission naming the
/// option without which they run; over solvers, orders, final sigmas, sigma schedules
/// and step counts every request is either refused so or runs to its end.
#[tokio::test]
async fn solver_schedules_that_divide_by_zero_are_refused_before_admission() {
    let server = TestServer::start(&[]).await;
    let spec =
        |scheduler: pb::Scheduler, options: pb::SchedulerOptions, steps| pb::GenerationSpec {
            steps,
            scheduler: scheduler as i32,
            scheduler_options: Some(options),
            ..quick_spec(8)
        };
    let full_order = pb::SchedulerOptions {
        lower_order_final: Some(false),
        ..Default::default()
    };
    let third_order = pb::SchedulerOptions {
        lower_order_final: Some(false),
        solver_order: Some(3),
        sigma_schedule: pb::SigmaSchedule::Karras as i32,
        final_sigmas_type: pb::FinalSigmasType::SigmaMin as i32,
        ..Default::default()
    };
    for (what, request) in [
        ("UniPC", spec(pb::Scheduler::Unipc, full_order, 8)),
        (
            "DPM++ 3",
            spec(pb::Scheduler::DpmSolverMultistep, third_order, 8),
        ),
    ] {
        let refused = server.refused_or_completed(what, request).await;
        let refused = refused.expect_err(what);
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert_eq!(
            refused[0].0, "spec.scheduler_options.lower_order_final",
            "{what}"
        );
        assert!(refused[0].1.contains("NaN latents"), "{what}: {refused:?}");
    }
    // One step is first order; the same options run.
    let one = spec(pb::Scheduler::Unipc, full_order, 1);
    assert_eq!(server.refused_or_completed("one", one).await, Ok(()));

    let (mut ran, mut refused) = (0, 0);
    let solvers = [pb::Scheduler::Unipc, pb::Scheduler::DpmSolverMultistep];
    for (scheduler, lower, order, karras, finals) in solver_combinations(solvers) {
        for steps in [2, 3] {
            let options = pb::SchedulerOptions {
                lower_order_final: lower,
                solver_order: order,
                sigma_schedule: karras as i32,
                final_sigmas_type: finals as i32,
                ..Default::default()
            };
            let what = format!("{scheduler:?} {options:?} {steps} steps");
            match server
                .refused_or_completed(&what, spec(scheduler, options, steps))
                .await
            {
                Ok(()) => ran += 1,
                Err(fields) => {
                    assert_eq!(fields.len(), 1, "{what}: {fields:?}");
                    assert!(fields[0].0.starts_with("spec.scheduler_options."), "{what}");
                    refused += 1;
                }
            }
        }
    }
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

/// A solver, `lower_order_final`, `solver_order`, sigma schedule and final sigmas.
type SolverCase = (
    pb::Scheduler,
    Option<bool>,
    Option<u32>,
    pb::SigmaSchedule,
    pb::FinalSigmasType,
);

/// Every combination of the solver options the sweep above tries.
fn solver_combinations(solvers: [pb::Scheduler; 2]) -> Vec<SolverCase> {
    let mut all = Vec::new();
    for scheduler in solvers {
        for lower in [None, Some(false)] {
            for order in [None, Some(3)] {
                for karras in [pb::SigmaSchedule::Unspecified, pb::SigmaSchedule::Karras] {
                    for finals in [pb::FinalSigmasType::Zero, pb::FinalSigmasType::SigmaMin] {
                        all.push((scheduler, lower, order, karras, finals));
                    }
                }
            }
        }
    }
    all
}
