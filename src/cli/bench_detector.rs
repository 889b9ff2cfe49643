//! `sdxld bench-detector`: how fast a preprocessor network (or a preprocessor that runs
//! none) turns a square image of random pixels into its 8-bit map (the network and its
//! post-processing, as a unit runs it); one JSON line of run times.

use std::path::PathBuf;

use anyhow::bail;
use sdxld::engine::device::Placement;
use sdxld::engine::preprocess::detector::Detector;
use sdxld::engine::preprocess::image_filters::Param;
use sdxld::engine::preprocess::pose::PoseParts;
use sdxld::engine::preprocess::recolor::Lightness;
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};

use crate::cli::bench::{noise_image, timed_runs, TimingArgs};

/// The command's flags.
#[derive(clap::Args)]
pub struct BenchDetectorArgs {
    /// The detector file (safetensors, any served network) or model folder.
    #[arg(long, required_unless_present = "preprocessor")]
    model: Option<PathBuf>,
    /// Instead of a model, a preprocessor that runs no network: canny,
    /// lineart_standard, tile_resample (at a rate of 2: 2×2 blocks),
    /// tile_resample_fractional (2.5: weighted overlaps), blur (sigma 9),
    /// recolor_luminance or recolor_intensity (gamma 0.8), scribble_xdog (threshold 32);
    /// with a TEED
    /// model, anyline (its whole preprocessor); with an OpenPose body model,
    /// openpose_face (with --face-model), openpose_hand (with --hand-model) or
    /// openpose_full (both).
    #[arg(long)]
    preprocessor: Option<String>,
    /// The OpenPose face network's file, for openpose_face and openpose_full.
    #[arg(long)]
    face_model: Option<PathBuf>,
    /// The OpenPose hand network's file, for openpose_hand and openpose_full.
    #[arg(long)]
    hand_model: Option<PathBuf>,
    /// Image side in pixels.
    #[arg(long, default_value_t = 1024)]
    size: u32,
    /// The image to detect in (the reference's own, so that a pose detector finds the
    /// same people); default: random pixels of --size.
    #[arg(long)]
    image: Option<PathBuf>,
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
    let image = match &args.image {
        Some(path) => image::open(path)?.to_rgb8(),
        None => noise_image(args.size, 0x9e37_79b9_7f4a_7c15)?,
    };
    let (name, (seconds, peak_mib)) = match (&args.model, args.preprocessor.as_deref()) {
        (Some(model), None) => {
            let detector = Detector::load(model, placement.device, placement.kind)?;
            let once = || detector.detect(&image);
            let timed = timed_runs(args.timing.runs, placement.device, once)?;
            (detector.network().name(), timed)
        }
        (Some(model), Some("anyline")) => {
            let detector = Detector::load(model, placement.device, placement.kind)?;
            let preprocessing = Preprocessing {
                preprocessor: Preprocessor::Anyline,
                detect_resolution: None,
            };
            let image = image::DynamicImage::ImageRgb8(image);
            let once = || preprocessing.run(&image, Networks::detector(Some(&detector)));
            (
                "anyline",
                timed_runs(args.timing.runs, placement.device, once)?,
            )
        }
        (Some(model), Some(name @ ("openpose_face" | "openpose_hand" | "openpose_full"))) => {
            let parts = match name {
                "openpose_face" => PoseParts::BODY_AND_FACE,
                "openpose_hand" => PoseParts::BODY_AND_HANDS,
                _ => PoseParts::FULL,
            };
            let load = |file: &Option<PathBuf>, flag: &str, needed: bool| match (file, needed) {
                (Some(file), true) => Ok(Some(Detector::load(
                    file,
                    placement.device,
                    placement.kind,
                )?)),
                (None, true) => bail!("--preprocessor {name} needs --{flag}"),
                (_, false) => Ok(None),
            };
            let body = Detector::load(model, placement.device, placement.kind)?;
            let face = load(&args.face_model, "face-model", parts.face)?;
            let hand = load(&args.hand_model, "hand-model", parts.hands)?;
            let preprocessing = Preprocessing {
                preprocessor: Preprocessor::OpenPose(parts),
                detect_resolution: None,
            };
            let networks = Networks {
                detector: Some(&body),
                face: face.as_ref(),
                hand: hand.as_ref(),
            };
            let image = image::DynamicImage::ImageRgb8(image);
            let once = || preprocessing.run(&image, networks);
            (name, timed_runs(args.timing.runs, placement.device, once)?)
        }
        (Some(_), Some(other)) => bail!("--preprocessor {other:?} takes no --model"),
        (None, Some(name)) => {
            let preprocessing = Preprocessing {
                preprocessor: networkless(name)?,
                detect_resolution: None,
            };
            let image = image::DynamicImage::ImageRgb8(image);
            let once = || preprocessing.run(&image, Networks::default());
            (name, timed_runs(args.timing.runs, placement.device, once)?)
        }
        (None, None) => bail!("--model or --preprocessor is required"),
    };
    println!(
        "{}",
        serde_json::json!({ "network": name, "seconds": seconds, "device_peak_mib": peak_mib })
    );
    Ok(())
}

/// A preprocessor that runs no network, by its CLI name, with the parameters its
/// reference benchmark runs.
fn networkless(name: &str) -> anyhow::Result<Preprocessor> {
    match name {
        "canny" => Ok(Preprocessor::Canny {
            low: 100,
            high: 200,
        }),
        "lineart_standard" => Ok(Preprocessor::LineartStandard),
        "tile_resample" => Ok(Preprocessor::TileResample { rate: Param(2.0) }),
        "tile_resample_fractional" => Ok(Preprocessor::TileResample { rate: Param(2.5) }),
        "blur" => Ok(Preprocessor::Blur { sigma: Param(9.0) }),
        "recolor_luminance" => Ok(Preprocessor::Recolor {
            lightness: Lightness::Luminance,
            gamma: Param(0.8),
        }),
        "recolor_intensity" => Ok(Preprocessor::Recolor {
            lightness: Lightness::Intensity,
            gamma: Param(0.8),
        }),
        "scribble_xdog" => Ok(Preprocessor::ScribbleXdog { threshold: 32 }),
        other => bail!(
            "--preprocessor {other:?}: expected canny, lineart_standard, tile_resample, tile_resample_fractional, blur, recolor_luminance, recolor_intensity or scribble_xdog"
        ),
    }
}
