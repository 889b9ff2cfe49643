//! `sdxld bench-detector`: how fast a preprocessor network turns a square image of random
//! pixels into its 8-bit map (the network and its post-processing, as a unit runs it);
//! one JSON line of run times.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use sdxld::engine::device::{self, Placement};
use sdxld::engine::preprocess::detector::Detector;

use crate::cli::bench::TimingArgs;

/// The command's flags.
#[derive(clap::Args)]
pub struct BenchDetectorArgs {
    /// The detector file (safetensors, any served network).
    #[arg(long)]
    model: PathBuf,
    /// Image side in pixels.
    #[arg(long, default_value_t = 1024)]
    size: u32,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// float32, float16 or bfloat16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    #[command(flatten)]
    timing: TimingArgs,
}

/// Times `runs` detections after a warm-up; prints `{"seconds": [...], "device_peak_mib": M}`.
pub fn bench_detector(args: &BenchDetectorArgs) -> anyhow::Result<()> {
    if args.timing.runs == 0 || args.size == 0 {
        bail!("--runs and --size must be at least 1");
    }
    args.timing.set_threads();
    let placement = Placement::parse(&args.device, &args.dtype)?;
    let detector = Detector::load(&args.model, placement.device, placement.kind)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let pixels: Vec<u8> = (0..args.size as usize * args.size as usize * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    let image = image::RgbImage::from_raw(args.size, args.size, pixels)
        .ok_or_else(|| anyhow::anyhow!("an image of {0}x{0}", args.size))?;
    let once = || detector.detect(&image);
    once()?;
    device::reset_peak(placement.device);
    let mut seconds = Vec::with_capacity(args.timing.runs);
    for _ in 0..args.timing.runs {
        let start = Instant::now();
        once()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    let peak = device::memory(placement.device).map_or(0, |m| m.peak);
    let peak_mib = peak as f64 / f64::from(1 << 20);
    println!(
        "{}",
        serde_json::json!({ "network": detector.network().name(), "seconds": seconds, "device_peak_mib": peak_mib })
    );
    Ok(())
}
