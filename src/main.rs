//! The `sdxld` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use sdxld::engine::demo::write_demo_model;
use sdxld::engine::loading::lora::LoraWeights;
use sdxld::engine::lora::{JobLora, LoraMode};
use sdxld::engine::pipeline::{
    GenerateParams, Placement, Progress, RefinerMode, RefinerParams, SchedulerOverrides,
    SdxlPipeline,
};
use sdxld::engine::registry::{ModelEntry, ModelKind, ModelRoots, Registry};
use sdxld::engine::schedulers::SchedulerKind;
use sdxld::output::{numbered_path, png_bytes, write_latents};

#[derive(Parser)]
#[command(
    name = "sdxld",
    version,
    about = "Stable Diffusion XL image generation on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (on the built-in demo model unless a model is configured).
    Serve {
        /// A configuration file (TOML) overriding config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (host:port), overriding `server.listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Default model: a name under `models.base_roots` or a diffusers folder.
        #[arg(long)]
        model: Option<String>,
    },
    /// Generate images from a diffusers SDXL pipeline folder.
    Generate(GenerateArgs),
    /// Write the built-in random-weight demo pipeline (diffusers layout).
    DemoModel {
        /// Folder to write.
        #[arg(long)]
        output: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a pickle-based PyTorch checkpoint (.ckpt, .pt, .pth, .bin) to safetensors,
    /// offline: the server never reads pickle.
    Convert {
        /// The checkpoint (the zip format torch.save writes).
        input: PathBuf,
        /// The safetensors file to write.
        output: PathBuf,
    },
    /// Send one GenerationSpec (JSON, as the PNG metadata holds it) to a running server
    /// and print the outcome as JSON (status, images, the completed event's figures).
    Request {
        /// The server (host:port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        server: String,
        /// The GenerationSpec as JSON, or @FILE.
        #[arg(long)]
        spec: String,
        /// Write the images here as image-N.<ext>.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Time end-to-end generation (median of several runs) and print JSON.
    Bench {
        #[command(flatten)]
        generate: GenerateArgs,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// Times LoRA adapters in each mode: the time per denoising step with no adapter, the
    /// first --lora and all of them, and the cost of switching between those two sets, as
    /// ratios to a step without adapters; one JSON line per mode.
    BenchLora {
        #[command(flatten)]
        generate: GenerateArgs,
        #[command(flatten)]
        timing: TimingArgs,
    },
}

/// How a benchmark runs.
#[derive(Args, Clone, Copy)]
struct TimingArgs {
    /// Timed runs (of each measurement) after a warm-up.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// CPU threads (0 keeps libtorch's default).
    #[arg(long, default_value_t = 1)]
    threads: i32,
}

#[derive(Args, Clone)]
struct GenerateArgs {
    /// A diffusers SDXL pipeline folder.
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "")]
    prompt: String,
    /// The prompt for the second text encoder (default: the prompt).
    #[arg(long)]
    prompt_2: Option<String>,
    /// The negative prompt. Without it SDXL uses zero negative embeddings.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// The negative prompt for the second text encoder (default: the negative prompt).
    #[arg(long)]
    negative_prompt_2: Option<String>,
    /// Seed of the first image; image i uses seed + i. Random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (off at 1 or below).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Guidance rescale in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// Image width in pixels, a multiple of 8 (default: the model's).
    #[arg(long)]
    width: Option<i64>,
    /// Image height in pixels, a multiple of 8 (default: the model's).
    #[arg(long)]
    height: Option<i64>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// float32, float16 or bfloat16 (half precision needs CUDA).
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Output PNG; further images get -1, -2, ... before the extension.
    #[arg(long, default_value = "out.png")]
    output: PathBuf,
    /// Also write the final latents (before decoding) as safetensors.
    #[arg(long)]
    latents_out: Option<PathBuf>,
    /// Scheduler: euler, euler-ancestral, heun, kdpm2, kdpm2-ancestral, lms, ddim,
    /// dpm-solver-multistep, dpm-solver-singlestep, unipc (the
    /// model's own when absent), or an A1111 sampler name such as "Euler a" or "DPM2 Karras".
    #[arg(long)]
    scheduler: Option<String>,
    /// Image to image: an init image (PNG, JPEG or WebP; its size is the output size).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// Inpainting: a mask of the init image's size (white repaints).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Image to image: the fraction of the schedule that runs, in (0, 1].
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// A diffusers scheduler config key, e.g. use_karras_sigmas=true or
    /// timestep_spacing=trailing (repeatable).
    #[arg(long = "scheduler-config", value_name = "KEY=VALUE")]
    scheduler_config: Vec<String>,
    /// Image to image: start at this fraction of the schedule without adding noise
    /// (diffusers' denoising_start), in (0, 1); overrides --strength.
    #[arg(long)]
    denoising_start: Option<f64>,
    /// Aesthetic-score conditioning for refiner-style models (requires_aesthetics_score).
    #[arg(long, default_value_t = 6.0)]
    aesthetic_score: f64,
    /// Negative aesthetic-score conditioning.
    #[arg(long, default_value_t = 2.5)]
    negative_aesthetic_score: f64,
    /// A refiner pipeline folder to run after the model (the SDXL refiner or any SDXL
    /// pipeline); it decodes the images.
    #[arg(long)]
    refiner: Option<PathBuf>,
    /// How the refiner takes over: ensemble (the base runs the first
    /// --high-noise-fraction of the schedule) or img2img (the refiner re-noises the base's
    /// result by --refiner-strength).
    #[arg(long, default_value = "ensemble")]
    refiner_mode: String,
    /// Ensemble of experts: the fraction of the schedule the base runs, in (0, 1).
    #[arg(long, default_value_t = 0.8)]
    high_noise_fraction: f64,
    /// Refiner img2img: strength in (0, 1].
    #[arg(long, default_value_t = 0.3)]
    refiner_strength: f64,
    /// Refiner steps (default: --steps).
    #[arg(long)]
    refiner_steps: Option<usize>,
    /// Refiner guidance scale (default: --guidance).
    #[arg(long)]
    refiner_guidance: Option<f64>,
    /// Refiner scheduler (same names as --scheduler; default: the refiner's own).
    #[arg(long)]
    refiner_scheduler: Option<String>,
    /// A VAE folder (diffusers AutoencoderKL, e.g. sdxl-vae-fp16-fix) replacing the
    /// models' own for encoding and decoding.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// A LoRA adapter from --lora-dir by name (its path there without .safetensors) and
    /// weight in [-2, 2], e.g. style:0.8 (repeatable; applied together).
    #[arg(long = "lora", value_name = "NAME:WEIGHT")]
    loras: Vec<String>,
    /// The folder --lora names resolve in.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// How LoRA adapters are applied: merge (into the weights, for this run) or forward
    /// (extra low-rank products in each layer's forward pass).
    #[arg(long, default_value = "merge")]
    lora_mode: String,
}

/// A scheduler by CLI name or A1111 sampler name, with the config keys the name implies.
fn parse_scheduler(
    name: &str,
) -> anyhow::Result<(SchedulerKind, Vec<(&'static str, serde_json::Value)>)> {
    let karras = [("use_karras_sigmas", serde_json::Value::Bool(true))];
    Ok(match name {
        "euler" | "Euler" => (SchedulerKind::Euler, vec![]),
        "euler-ancestral" | "Euler a" => (SchedulerKind::EulerAncestral, vec![]),
        "heun" | "Heun" => (SchedulerKind::Heun, vec![]),
        "kdpm2" | "DPM2" => (SchedulerKind::Kdpm2, vec![]),
        "kdpm2-ancestral" | "DPM2 a" => (SchedulerKind::Kdpm2Ancestral, vec![]),
        "DPM2 Karras" => (SchedulerKind::Kdpm2, karras.to_vec()),
        "DPM2 a Karras" => (SchedulerKind::Kdpm2Ancestral, karras.to_vec()),
        "Euler Karras" => (SchedulerKind::Euler, karras.to_vec()),
        "Heun Karras" => (SchedulerKind::Heun, karras.to_vec()),
        "lms" | "LMS" => (SchedulerKind::Lms, vec![]),
        "LMS Karras" => (SchedulerKind::Lms, karras.to_vec()),
        "ddim" | "DDIM" => (SchedulerKind::Ddim, vec![]),
        "dpm-solver-multistep" | "DPM++ 2M" => (SchedulerKind::DpmSolverMultistep, vec![]),
        "DPM++ 2M Karras" => (SchedulerKind::DpmSolverMultistep, karras.to_vec()),
        "DPM++ 2M SDE" => (SchedulerKind::DpmSolverMultistep, vec![("algorithm_type", "sde-dpmsolver++".into())]),
        "DPM++ 2M SDE Karras" => (
            SchedulerKind::DpmSolverMultistep,
            vec![("algorithm_type", "sde-dpmsolver++".into()), ("use_karras_sigmas", true.into())],
        ),
        "unipc" | "UniPC" => (SchedulerKind::UniPc, vec![]),
        "dpm-solver-singlestep" | "DPM++ SDE" => (SchedulerKind::DpmSolverSinglestep, vec![]),
        "DPM++ SDE Karras" => (SchedulerKind::DpmSolverSinglestep, karras.to_vec()),
        other => bail!(
            "unknown scheduler {other:?} (euler, euler-ancestral, heun, kdpm2, kdpm2-ancestral, lms, ddim, dpm-solver-multistep, dpm-solver-singlestep, unipc, or an A1111 name)"
        ),
    })
}

/// `KEY=VALUE` with VALUE as JSON where it parses (true, 1.5) and a string otherwise.
fn parse_config_pair(pair: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let Some((key, value)) = pair.split_once('=') else {
        bail!("--scheduler-config takes KEY=VALUE, got {pair:?}");
    };
    let value = serde_json::from_str(value)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    Ok((key.trim().to_string(), value))
}

/// The overrides a CLI scheduler name implies.
fn named_scheduler(name: Option<&str>) -> anyhow::Result<SchedulerOverrides> {
    let mut overrides = SchedulerOverrides::default();
    if let Some(name) = name {
        let (kind, keys) = parse_scheduler(name)?;
        overrides.class = Some(kind);
        for (k, v) in keys {
            overrides.set(k, v);
        }
    }
    Ok(overrides)
}

impl GenerateArgs {
    /// The refiner stage the flags ask for, if any.
    fn refiner_params(&self, base: &GenerateParams) -> anyhow::Result<Option<RefinerParams>> {
        if self.refiner.is_none() {
            return Ok(None);
        }
        let mode = match self.refiner_mode.as_str() {
            "ensemble" => RefinerMode::EnsembleOfExperts {
                high_noise_fraction: self.high_noise_fraction,
            },
            "img2img" => RefinerMode::Img2Img {
                strength: self.refiner_strength,
            },
            other => bail!("--refiner-mode must be ensemble or img2img, got `{other}`"),
        };
        let mut params = RefinerParams::new(mode, base);
        params.steps = self.refiner_steps.unwrap_or(base.steps);
        params.guidance_scale = self.refiner_guidance.unwrap_or(base.guidance_scale);
        params.scheduler_overrides = named_scheduler(self.refiner_scheduler.as_deref())?;
        params.aesthetic_score = self.aesthetic_score;
        params.negative_aesthetic_score = self.negative_aesthetic_score;
        Ok(Some(params))
    }

    fn params(&self, pipeline: &SdxlPipeline) -> anyhow::Result<GenerateParams> {
        let size = pipeline.default_size();
        let mut overrides = named_scheduler(self.scheduler.as_deref())?;
        for pair in &self.scheduler_config {
            let (k, v) = parse_config_pair(pair)?;
            overrides.set(&k, v);
        }
        let init_image = match &self.init_image {
            Some(path) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let mut image = sdxld::engine::pipeline::InitImage::decode(&bytes, self.strength)?;
                image.denoising_start = self.denoising_start;
                match &self.mask {
                    Some(mask) => {
                        let mask = std::fs::read(mask)
                            .with_context(|| format!("reading {}", mask.display()))?;
                        Some(image.with_mask(&mask)?)
                    }
                    None => Some(image),
                }
            }
            None => None,
        };
        let (default_w, default_h) = init_image
            .as_ref()
            .map_or((size, size), |i| (i.width, i.height));
        Ok(GenerateParams {
            init_image,
            prompt: self.prompt.clone(),
            prompt_2: self.prompt_2.clone(),
            negative_prompt: self.negative_prompt.clone(),
            negative_prompt_2: self.negative_prompt_2.clone(),
            guidance_scale: self.guidance,
            guidance_rescale: self.guidance_rescale,
            width: self.width.unwrap_or(default_w),
            height: self.height.unwrap_or(default_h),
            steps: self.steps,
            seed: self.seed.unwrap_or_else(random_seed),
            num_images: self.num_images,
            scheduler_overrides: overrides,
            aesthetic_score: self.aesthetic_score,
            negative_aesthetic_score: self.negative_aesthetic_score,
            ..GenerateParams::default()
        })
    }

    fn load(&self) -> anyhow::Result<SdxlPipeline> {
        let placement = Placement::parse(&self.device, &self.dtype)?;
        let pipeline = SdxlPipeline::load(&self.model, placement)
            .with_context(|| format!("loading {}", self.model.display()))?;
        self.swap_vae(pipeline)
    }

    /// The --lora adapters, loaded for `pipeline`'s placement.
    fn loras(&self, pipeline: &SdxlPipeline) -> anyhow::Result<Vec<JobLora>> {
        if self.loras.is_empty() {
            return Ok(Vec::new());
        }
        let Some(dir) = &self.lora_dir else {
            bail!("--lora needs --lora-dir, the folder its names resolve in");
        };
        let registry = Registry::new(
            ModelRoots {
                lora: vec![dir.clone()],
                ..ModelRoots::default()
            },
            ModelEntry::of_kind(ModelKind::Base, "model", &self.model)
                .context("--model is not a model")?,
        );
        let placement = pipeline.placement();
        let mut loras = Vec::with_capacity(self.loras.len());
        for arg in &self.loras {
            let (name, weight) = match arg.rsplit_once(':') {
                Some((name, weight)) => {
                    let weight: f64 = weight
                        .parse()
                        .with_context(|| format!("--lora {arg:?}: the weight is not a number"))?;
                    (name, weight)
                }
                None => (arg.as_str(), 1.0),
            };
            if !(-2.0..=2.0).contains(&weight) {
                bail!("--lora {arg:?}: the weight must be between -2 and 2");
            }
            let model = registry
                .resolve_kind(ModelKind::Lora, name)
                .map_err(|e| anyhow::anyhow!("--lora {arg:?}: {e}"))?;
            let weights = LoraWeights::load(&model.path, name, placement.device, placement.kind)?;
            loras.push(JobLora {
                name: name.to_string(),
                weights: std::rc::Rc::new(weights),
                strength: weight,
            });
        }
        Ok(loras)
    }

    /// `pipeline` with the --vae VAE, if one is given.
    fn swap_vae(&self, pipeline: SdxlPipeline) -> anyhow::Result<SdxlPipeline> {
        let Some(dir) = &self.vae else {
            return Ok(pipeline);
        };
        let vae = sdxld::engine::codec::VaeCodec::load(dir, pipeline.placement())
            .with_context(|| format!("loading {}", dir.display()))?;
        Ok(pipeline.with_vae(std::rc::Rc::new(vae))?)
    }
}

/// A seed from the clock and process id, for requests that name none.
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (u64::from(std::process::id()) << 32)) % (1 << 53)
}

fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let pipeline = args.load()?;
    let params = args.params(&pipeline)?;
    let mode: LoraMode = args.lora_mode.parse().map_err(anyhow::Error::msg)?;
    let _adapters = sdxld::engine::lora::apply(&pipeline, &args.loras(&pipeline)?, mode)?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(params.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    };
    let mut report = |p: Progress<'_>| {
        if let Some(bar) = &bar {
            match p {
                Progress::EncodingPrompt => bar.set_message("encoding"),
                Progress::Denoising {
                    step,
                    total,
                    refining,
                    ..
                } => {
                    bar.set_message(if refining { "refining" } else { "denoising" });
                    bar.set_length(total as u64);
                    bar.set_position(step as u64);
                }
                Progress::Decoding { .. } => bar.set_message("decoding"),
            }
        }
        Ok(())
    };
    let out = match (&args.refiner, args.refiner_params(&params)?) {
        (Some(dir), Some(stage)) => {
            let refiner = SdxlPipeline::load(dir, pipeline.placement())
                .with_context(|| format!("loading {}", dir.display()))?;
            let refiner = match args.vae {
                Some(_) => refiner.with_vae(pipeline.vae_codec().clone())?,
                None => refiner,
            };
            sdxld::engine::refiner::generate_refined(
                &pipeline,
                &refiner,
                &params,
                &stage,
                &mut report,
            )?
        }
        _ => pipeline.generate(&params, &mut report)?,
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &args.latents_out {
        write_latents(path, &out.latents).with_context(|| format!("writing {}", path.display()))?;
    }
    for i in 0..params.num_images {
        let path = numbered_path(&args.output, i);
        let png = png_bytes(&out.images.get(i as i64))?;
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} (seed {})", path.display(), params.seed + i as u64);
    }
    Ok(())
}

/// The pipeline and parameters a benchmark runs, on `threads` CPU threads (0: libtorch's
/// default), with a fixed seed.
fn bench_setup(
    args: &GenerateArgs,
    threads: i32,
) -> anyhow::Result<(SdxlPipeline, GenerateParams)> {
    if threads > 0 {
        tch::set_num_threads(threads);
        tch::set_num_interop_threads(threads);
    }
    let pipeline = args.load()?;
    let mut params = args.params(&pipeline)?;
    params.seed = args.seed.unwrap_or(0);
    Ok((pipeline, params))
}

fn bench(args: &GenerateArgs, runs: usize, threads: i32) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (pipeline, params) = bench_setup(args, threads)?;
    let mode: LoraMode = args.lora_mode.parse().map_err(anyhow::Error::msg)?;
    let _adapters = sdxld::engine::lora::apply(&pipeline, &args.loras(&pipeline)?, mode)?;
    let mut none = |_: Progress<'_>| Ok(());
    pipeline.generate(&params, &mut none)?;
    let device = pipeline.placement().device;
    sdxld::engine::cuda::reset_peak(device);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        pipeline.generate(&params, &mut none)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "median_s": median(times.clone()),
            "runs_s": times,
            "threads": threads,
            "peak_device_memory_bytes": sdxld::engine::cuda::memory(device).map(|m| m.peak),
        })
    );
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench_lora(args: &GenerateArgs, runs: usize, threads: i32) -> anyhow::Result<()> {
    if runs == 0 || args.steps < 2 {
        bail!("--runs must be at least 1 and --steps at least 2");
    }
    let (pipeline, params) = bench_setup(args, threads)?;
    let loras = args.loras(&pipeline)?;
    if loras.len() < 2 {
        bail!("give at least two --lora adapters (one, then all of them, are timed)");
    }
    let device = pipeline.placement().device;
    let sync = || {
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    // The denoising loop alone: a run of --steps steps less a run of one step (prompt
    // encoding and set-up cancel out), per step.
    let denoise = |steps: usize| -> anyhow::Result<f64> {
        let p = GenerateParams {
            steps,
            ..params.clone()
        };
        let start = Instant::now();
        let latents = pipeline.denoise(&p, &mut |_| Ok(()))?;
        let _ = latents.sum(tch::Kind::Float).double_value(&[]);
        sync();
        Ok(start.elapsed().as_secs_f64())
    };
    // One step's time for each adapter set, the sets taking turns so that drifting clocks
    // weigh on all of them alike.
    let (one, all) = (&loras[..1], &loras[..]);
    let sets = [&loras[..0], one, all];
    let per_step = |mode: LoraMode| -> anyhow::Result<Vec<f64>> {
        let mut samples = vec![Vec::with_capacity(runs); sets.len()];
        for run in 0..=runs {
            for (set, times) in sets.iter().zip(samples.iter_mut()) {
                let _applied = sdxld::engine::lora::apply(&pipeline, set, mode)?;
                sync();
                let long = denoise(args.steps)?;
                let short = denoise(1)?;
                // The first round warms up.
                if run > 0 {
                    times.push((long - short) / (args.steps - 1) as f64);
                }
            }
        }
        Ok(samples.into_iter().map(median).collect())
    };
    for mode in [LoraMode::Merge, LoraMode::Forward] {
        let steps = per_step(mode)?;
        // Switching: the adapters of one request off, the next request's on.
        let (mut switches, mut restores) = (Vec::new(), Vec::new());
        let mut current = Some(sdxld::engine::lora::apply(&pipeline, one, mode)?);
        for i in 0..=2 * runs {
            let next = if i % 2 == 0 { all } else { one };
            let start = Instant::now();
            drop(current.take());
            sync();
            let restored = start.elapsed().as_secs_f64();
            current = Some(sdxld::engine::lora::apply(&pipeline, next, mode)?);
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
                "step_s": { "none": steps[0], "one": steps[1], "all": steps[2] },
                "step_ratio_one": steps[1] / steps[0],
                "step_ratio_all": steps[2] / steps[0],
                "switch_s": switch,
                "restore_s": median(restores),
                "switch_over_step": switch / steps[0],
            })
        );
    }
    Ok(())
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    model: Option<String>,
) -> anyhow::Result<()> {
    let mut settings = sdxld::config::Settings::load(config.as_deref())?;
    if let Some(listen) = listen {
        if listen.parse::<std::net::SocketAddr>().is_err() {
            bail!("--listen must be host:port with an IP address, got {listen:?}");
        }
        settings.server.listen = listen;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The OTLP exporter's gRPC channel lives on this runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        sdxld::telemetry::init_telemetry(
            &settings.telemetry.log_format,
            &settings.telemetry.log_level,
        )
    };
    let result = runtime.block_on(sdxld::server::serve(settings, model.as_deref()));
    drop(telemetry);
    result
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            model,
        } => serve(config, listen, model),
        Command::Generate(args) => generate(&args),
        Command::DemoModel { output, seed } => {
            write_demo_model(&output, seed)?;
            println!("wrote the demo model to {}", output.display());
            Ok(())
        }
        Command::Bench { generate, timing } => bench(&generate, timing.runs, timing.threads),
        Command::BenchLora { generate, timing } => {
            bench_lora(&generate, timing.runs, timing.threads)
        }
        Command::Request {
            server,
            spec,
            output_dir,
        } => request(&server, &spec, output_dir.as_deref()),
        Command::Convert { input, output } => {
            let count = sdxld::convert::convert(&input, &output)
                .with_context(|| format!("converting {}", input.display()))?;
            println!("wrote {count} tensors to {}", output.display());
            Ok(())
        }
    }
}

/// `sdxld request`: one GenerateImages call.
fn request(server: &str, spec: &str, output_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use sdxld::proto::v1 as pb;
    use tonic_types::StatusExt;
    let json = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => spec.to_string(),
    };
    let spec = sdxld::proto::spec_from_json(&json).map_err(|e| anyhow::anyhow!("--spec: {e}"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut client = pb::generation_service_client::GenerationServiceClient::connect(format!(
            "http://{server}"
        ))
        .await
        .with_context(|| format!("connecting to {server}"))?
        .max_decoding_message_size(1 << 30);
        let started = Instant::now();
        let result = client
            .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        let report = match result {
            Ok(response) => {
                let response = response.into_inner();
                if let Some(dir) = output_dir {
                    std::fs::create_dir_all(dir)?;
                    for image in &response.images {
                        let ext = image.mime_type.rsplit('/').next().unwrap_or("bin");
                        std::fs::write(
                            dir.join(format!("image-{}.{ext}", image.index)),
                            &image.data,
                        )?;
                    }
                }
                let completed = response.completed.unwrap_or_default();
                serde_json::json!({
                    "code": "OK",
                    "seconds": elapsed,
                    "images": response.images.len(),
                    "peak_device_memory_bytes": completed.peak_device_memory_bytes,
                    "total_ms": completed.total_ms,
                    "warnings": completed.warnings,
                })
            }
            Err(status) => serde_json::json!({
                "code": format!("{:?}", status.code()),
                "seconds": elapsed,
                "message": status.message(),
                "reason": status.get_details_error_info().map(|i| i.reason),
            }),
        };
        println!("{report}");
        anyhow::Ok(())
    })
}
