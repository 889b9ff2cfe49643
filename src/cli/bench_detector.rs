//! `sdxld bench-detector`: how fast a preprocessor network turns a square image of random
//! pixels into its 8-bit map (the network and its post-processing, as a unit runs it);
//! one JSON line of run times.

use std::path::PathBuf;

use anyhow::bail;
use sdxld::engine::device::Placement;
use sdxld::engine::preprocess::detector::Detector;

use crate::cli::bench::{noise_image, timed_runs, TimingArgs};

/// The command's flags.
#[derive(clap::Args)]
pub struct BenchDetectorArgs {
    /// The detector file (safetensors, any served network) or model folder.
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
    let image = noise_image(args.size, 0x9e37_79b9_7f4a_7c15)?;
    let once = || detector.detect(&image);
    let (seconds, peak_mib) = timed_runs(args.timing.runs, placement.device, once)?;
    println!(
        "{}",
        serde_json::json!({ "network": detector.network().name(), "seconds": seconds, "device_peak_mib": peak_mib })
    );
    Ok(())
}
