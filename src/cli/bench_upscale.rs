//! `sdxld bench-upscale`: how fast an upscaler enlarges a square image of random pixels,
//! tile by tile as the post-processing step runs it; one JSON line of run times.

use std::path::PathBuf;

use anyhow::bail;
use sdxld::engine::device::Placement;
use sdxld::engine::upscale::tiles::Tiling;
use sdxld::engine::upscale::{UpscaleNoise, Upscaler};

use crate::cli::bench::{noise_image, timed_runs, TimingArgs};

/// The command's flags.
#[derive(clap::Args)]
pub struct BenchUpscaleArgs {
    /// The upscaler file (safetensors, any served layout).
    #[arg(long)]
    model: PathBuf,
    /// Input side in pixels.
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// Tile side in input pixels; 0: the whole image at once.
    #[arg(long, default_value_t = 512)]
    tile: i64,
    /// Input pixels neighbouring tiles share (blended).
    #[arg(long, default_value_t = 0)]
    overlap: i64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// float32, float16 or bfloat16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    #[command(flatten)]
    timing: TimingArgs,
}

/// Times `runs` upscales after a warm-up; prints `{"seconds": [...], "device_peak_mib": M}`
/// (the allocator's peak over the timed runs; 0 on the CPU).
pub fn bench_upscale(args: &BenchUpscaleArgs) -> anyhow::Result<()> {
    if args.timing.runs == 0 || args.size == 0 {
        bail!("--runs and --size must be at least 1");
    }
    args.timing.set_threads();
    let placement = Placement::parse(&args.device, &args.dtype)?;
    let upscaler = Upscaler::load(&args.model, placement.device, placement.kind)?;
    let image = noise_image(args.size, 0x2545_f491_4f6c_dd1d)?;
    let tiling = Tiling {
        tile: args.tile,
        pad: 10,
        overlap: args.overlap,
    };
    let once = || upscaler.upscale(&image, tiling, UpscaleNoise::seeded(0), &mut |_| Ok(()));
    let (seconds, peak_mib) = timed_runs(args.timing.runs, placement.device, once)?;
    println!(
        "{}",
        serde_json::json!({ "seconds": seconds, "device_peak_mib": peak_mib })
    );
    Ok(())
}
