//! `sdxld bench` (a whole job through the runner, as the server runs it, the images
//! decoded but not encoded, as diffusers' `output_type="np"`) and `sdxld bench-lora`
//! (denoising steps with LoRA adapter sets applied in each mode).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use sdxld::engine::device;
use sdxld::engine::lora::{apply, JobLora, LoraMode};
use sdxld::engine::profile;
use sdxld::engine::request::GenerateParams;
use sdxld::jobs::encode::encode;
use sdxld::jobs::events::{FinishedImage, StepProgress};
use sdxld::jobs::runner::{run_job, JobSink, RunOptions};
use sdxld::jobs::StopReason;
use sdxld::telemetry::Metrics;

use crate::cli::args::GenerateArgs;

/// How a benchmark runs.
#[derive(Args, Clone, Copy)]
pub struct TimingArgs {
    /// Timed runs (of each measurement) after a warm-up.
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: usize,
    /// CPU threads (0 keeps libtorch's default).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: i32,
}

impl TimingArgs {
    pub(crate) fn set_threads(self) {
        if self.threads > 0 {
            tch::set_num_threads(self.threads);
            tch::set_num_interop_threads(self.threads);
        }
    }
}

/// A `size`×`size` image of xorshift noise from `seed` (the same pixels every run).
pub(crate) fn noise_image(size: u32, seed: u64) -> anyhow::Result<image::RgbImage> {
    let mut state = seed;
    let pixels: Vec<u8> = (0..size as usize * size as usize * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    image::RgbImage::from_raw(size, size, pixels)
        .ok_or_else(|| anyhow::anyhow!("an image of {size}x{size}"))
}

/// `once` run once to warm up, then timed `runs` times: the seconds of each run and the
/// device allocator's peak over them in MiB (0 on the CPU).
pub(crate) fn timed_runs<T>(
    runs: usize,
    device: tch::Device,
    once: impl Fn() -> sdxld::engine::error::Result<T>,
) -> anyhow::Result<(Vec<f64>, f64)> {
    once()?;
    device::reset_peak(device);
    let mut seconds = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        once()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    let peak = device::memory(device).map_or(0, |m| m.peak);
    Ok((seconds, peak as f64 / f64::from(1 << 20)))
}

/// A sink that keeps nothing.
struct Discard;

impl JobSink for Discard {
    fn stopped(&mut self) -> Option<StopReason> {
        None
    }

    fn progress(&mut self, _: StepProgress) {}

    fn image(&mut self, _: FinishedImage) {}
}

/// A sink that encodes each image as the server would, and keeps nothing.
struct EncodeAndDiscard;

impl JobSink for EncodeAndDiscard {
    fn stopped(&mut self) -> Option<StopReason> {
        None
    }

    fn progress(&mut self, _: StepProgress) {}

    fn image(&mut self, image: FinishedImage) {
        if let Err(e) = encode(&image) {
            eprintln!("encoding an image failed: {e}");
        }
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The flags with seed 0 unless one is given: benchmarks repeat the same work.
pub(crate) fn seeded(args: &GenerateArgs) -> GenerateArgs {
    GenerateArgs {
        seed: Some(args.seed.unwrap_or(0)),
        ..args.clone()
    }
}

/// `sdxld bench`: the median time of `runs` jobs after a warm-up one, and with
/// `profile`, the stages of one more run.
pub fn bench(
    args: &GenerateArgs,
    timing: TimingArgs,
    profile: Option<&Path>,
) -> anyhow::Result<()> {
    if timing.runs == 0 {
        bail!("--runs must be at least 1");
    }
    timing.set_threads();
    let args = seeded(args);
    let job = args.job()?;
    let mut engine = args.engine()?;
    let metrics = Metrics::new();
    let options = RunOptions {
        batch: args.batch.mode(),
        keep_latents: false,
    };
    run_job(
        &mut engine,
        &job,
        options,
        &mut Discard,
        &metrics,
        Instant::now(),
    )?;
    let placement = engine.placement();
    device::reset_peak(placement.device);
    let mut times = Vec::with_capacity(timing.runs);
    for _ in 0..timing.runs {
        let start = Instant::now();
        run_job(&mut engine, &job, options, &mut Discard, &metrics, start)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let peak = device::memory(placement.device).map(|m| m.peak);
    let mut report = serde_json::json!({
        "median_s": median(times.clone()),
        "runs_s": times,
        "threads": timing.threads,
        "peak_device_memory_bytes": peak,
    });
    if let Some(folded_path) = profile {
        let (outcome, stages) = profile::record(placement.device, || {
            run_job(
                &mut engine,
                &job,
                options,
                &mut EncodeAndDiscard,
                &metrics,
                Instant::now(),
            )
        });
        outcome?;
        std::fs::write(folded_path, stages.folded())
            .with_context(|| format!("writing {}", folded_path.display()))?;
        report["profile"] = serde_json::to_value(&stages.stages)?;
    }
    println!("{report}");
    Ok(())
}

/// `sdxld bench-lora`.
pub fn bench_lora(args: &GenerateArgs, timing: TimingArgs) -> anyhow::Result<()> {
    if timing.runs == 0 || args.steps.unwrap_or(30) < 2 {
        bail!("--runs must be at least 1 and --steps at least 2");
    }
    timing.set_threads();
    let args = seeded(args);
    let job = args.job()?;
    let mut engine = args.engine()?;
    let pipeline = engine.pipeline(&job.model)?;
    let mut loras = Vec::with_capacity(job.loras.len());
    for lora in &job.loras {
        loras.push(JobLora {
            name: lora.model.name.clone(),
            weights: engine.lora(&lora.model)?,
            strength: lora.weight,
            text_encoder_strength: lora.text_encoder_weight,
        });
    }
    if loras.len() < 2 {
        bail!("give at least two --lora adapters (one, then all of them, are timed)");
    }
    let device = pipeline.placement().device;
    let sync = || {
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    // The denoising loop alone: a run of the job's steps less a run of one step (prompt
    // encoding and set-up cancel out), per step.
    let denoise = |steps: usize| -> anyhow::Result<f64> {
        let p = GenerateParams {
            steps,
            ..job.params.clone()
        };
        let start = Instant::now();
        let latents = pipeline.denoise_all(&p, &mut |_| {})?;
        let _ = latents.sum(tch::Kind::Float).double_value(&[]);
        sync();
        Ok(start.elapsed().as_secs_f64())
    };
    let steps = job.params.steps;
    // One step's time for each adapter set, the sets taking turns so that drifting clocks
    // weigh on all of them alike.
    let (one, all) = (&loras[..1], &loras[..]);
    let sets = [&loras[..0], one, all];
    let per_step = |mode: LoraMode| -> anyhow::Result<Vec<f64>> {
        let mut samples = vec![Vec::with_capacity(timing.runs); sets.len()];
        for run in 0..=timing.runs {
            for (set, times) in sets.iter().zip(samples.iter_mut()) {
                let _applied = apply(&pipeline, set, mode)?;
                sync();
                let long = denoise(steps)?;
                let short = denoise(1)?;
                // The first round warms up.
                if run > 0 {
                    times.push((long - short) / (steps - 1) as f64);
                }
            }
        }
        Ok(samples.into_iter().map(median).collect())
    };
    for mode in [LoraMode::Merge, LoraMode::Forward] {
        let step_times = per_step(mode)?;
        // Switching: the adapters of one request off, the next request's on.
        let (mut switches, mut restores) = (Vec::new(), Vec::new());
        let mut current = Some(apply(&pipeline, one, mode)?);
        for i in 0..=2 * timing.runs {
            let next = if i % 2 == 0 { all } else { one };
            let start = Instant::now();
            drop(current.take());
            sync();
            let restored = start.elapsed().as_secs_f64();
            current = Some(apply(&pipeline, next, mode)?);
            sync();
            if i > 0 {
                switches.push(start.elapsed().as_secs_f64());
                restores.push(restored);
            }
        }
        drop(current);
        let switch = median(switches);
        println!(
            "{}",
            serde_json::json!({
                "mode": format!("{mode:?}").to_lowercase(),
                "loras": loras.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
                "step_s": { "none": step_times[0], "one": step_times[1], "all": step_times[2] },
                "step_ratio_one": step_times[1] / step_times[0],
                "step_ratio_all": step_times[2] / step_times[0],
                "switch_s": switch,
                "restore_s": median(restores),
                "switch_over_step": switch / step_times[0],
            })
        );
    }
    Ok(())
}
