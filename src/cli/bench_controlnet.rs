//! `sdxld bench-controlnet`: the cost of a denoising step under none, the first and all
//! of the ControlNet units the flags give, as ratios to a step without any.

use std::time::Instant;

use anyhow::bail;
use sdxld::engine::control::fit;
use sdxld::engine::pipeline::Control;
use sdxld::engine::pixels::unit_range;
use sdxld::engine::request::GenerateParams;
use sdxld::jobs::detectors::NetworkFiles;

use crate::cli::args::GenerateArgs;
use crate::cli::bench::{median, seeded, TimingArgs};

/// Times per step with 0, 1 and all units; prints one JSON line.
pub fn bench_controlnet(args: &GenerateArgs, timing: TimingArgs) -> anyhow::Result<()> {
    if timing.runs == 0 || args.steps.unwrap_or(30) < 2 {
        bail!("--runs must be at least 1 and --steps at least 2");
    }
    if args.controlnets.len() < 2 {
        bail!("give at least two --controlnet units (one, then all of them, are timed)");
    }
    timing.set_threads();
    let args = seeded(args);
    let job = args.job()?;
    let mut engine = args.engine()?;
    let pipeline = engine.pipeline(&job.model)?;
    let (width, height) = (job.params.width as u32, job.params.height as u32);
    let mut models = Vec::new();
    let mut maps = Vec::new();
    for unit in &job.controlnets {
        models.push(engine.controlnet(&unit.model, &pipeline)?);
        let mut unit_maps = Vec::with_capacity(unit.inputs.len());
        for input in &unit.inputs {
            let networks = NetworkFiles::of_input(input).load(&mut engine)?;
            let map = input
                .preprocessing
                .run(&input.image.0, networks.networks())?;
            unit_maps.push(unit_range(&fit(&map, width, height, unit.resize)));
        }
        maps.push(unit_maps);
    }
    let controls: Vec<Control<'_>> = job
        .controlnets
        .iter()
        .enumerate()
        .map(|(i, unit)| Control {
            model: &models[i],
            maps: &maps[i],
            unit: &unit.unit,
        })
        .collect();
    let device = pipeline.placement().device;
    let sync = || {
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    // The denoising loop alone: a run of the job's steps less a run of one step, per step.
    let denoise = |steps: usize, set: &[Control<'_>]| -> anyhow::Result<f64> {
        let p = GenerateParams {
            steps,
            ..job.params.clone()
        };
        let start = Instant::now();
        let latents = pipeline.denoise_all_controlled(&p, set, &mut |_| {})?;
        let _ = latents.sum(tch::Kind::Float).double_value(&[]);
        sync();
        Ok(start.elapsed().as_secs_f64())
    };
    let steps = job.params.steps;
    let sets = [&controls[..0], &controls[..1], &controls[..]];
    let mut samples = vec![Vec::with_capacity(timing.runs); sets.len()];
    // The sets take turns, so that drifting clocks weigh on all of them alike; the first
    // round warms up.
    for run in 0..=timing.runs {
        for (set, times) in sets.iter().zip(samples.iter_mut()) {
            let long = denoise(steps, set)?;
            let short = denoise(1, set)?;
            if run > 0 {
                times.push((long - short) / (steps - 1) as f64);
            }
        }
    }
    let step: Vec<f64> = samples.into_iter().map(median).collect();
    println!(
        "{}",
        serde_json::json!({
            "units": job.controlnets.iter().map(|u| u.model.name.clone()).collect::<Vec<_>>(),
            "step_s": { "none": step[0], "one": step[1], "all": step[2] },
            "step_ratio_one": step[1] / step[0],
            "step_ratio_all": step[2] / step[0],
            "threads": timing.threads,
        })
    );
    Ok(())
}
