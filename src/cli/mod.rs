//! The subcommands. `generate` and `bench` turn their flags into the same
//! `GenerationSpec` a client sends, validate it with the server's code against a local
//! registry and run it through the server's job runner.

mod args;
mod bench;
mod bench_controlnet;
mod bench_detector;
mod bench_upscale;
mod controlnet;
mod convert;
mod demo;
mod generate;
mod guider;
mod health;
mod hires;
mod ip_adapter;
mod pag;
mod request;
mod scheduler_flags;
mod variation;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The command line.
#[derive(Parser)]
#[command(
    name = "sdxld",
    version,
    about = "Stable Diffusion XL image generation on libtorch"
)]
pub struct Cli {
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
    /// Generate images from a diffusers SDXL pipeline folder or single-file checkpoint.
    Generate(args::GenerateArgs),
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
    Request(request::RequestArgs),
    /// Time end-to-end generation (median of several runs) and print JSON.
    Bench {
        #[command(flatten)]
        generate: args::GenerateArgs,
        #[command(flatten)]
        timing: bench::TimingArgs,
        /// After the timed runs, one more with each stage timed (text encoders, each
        /// denoising step, UNet levels and layers, VAE decode, image encoding): printed
        /// under `profile`, and written to this file as folded stacks for flame graphs.
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
    },
    /// Times LoRA adapters in each mode: the time per denoising step with no adapter, the
    /// first --lora and all of them, and the cost of switching between those two sets, as
    /// ratios to a step without adapters; one JSON line per mode.
    BenchLora {
        #[command(flatten)]
        generate: args::GenerateArgs,
        #[command(flatten)]
        timing: bench::TimingArgs,
    },
    /// Times ControlNet units: the time per denoising step with no unit, the first
    /// --controlnet and all of them, as ratios to a step without; one JSON line.
    BenchControlnet {
        #[command(flatten)]
        generate: args::GenerateArgs,
        #[command(flatten)]
        timing: bench::TimingArgs,
    },
    /// Times an upscaler on a square image of random pixels, tiled as the
    /// post-processing step runs it; one JSON line of run times.
    BenchUpscale(bench_upscale::BenchUpscaleArgs),
    /// Times a preprocessor network on a square image of random pixels, its
    /// post-processing included; one JSON line of run times.
    BenchDetector(bench_detector::BenchDetectorArgs),
    /// Check a server's gRPC health service: exit 0 when SERVING (container health
    /// checks, scripts).
    Health(health::HealthArgs),
    /// Check a configuration (the defaults, the file, the SDXLD__* variables) as `serve`
    /// loads it, without serving: exit 0 when it is valid, else the key at fault.
    CheckConfig {
        /// A configuration file (TOML) overriding config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            model,
        } => serve(config, listen, model),
        Command::Generate(args) => generate::generate(&args),
        Command::DemoModel { output, seed } => demo::demo_model(&output, seed),
        Command::Convert { input, output } => convert::convert(&input, &output),
        Command::Request(args) => request::request(&args),
        Command::Bench {
            generate,
            timing,
            profile,
        } => bench::bench(&generate, timing, profile.as_deref()),
        Command::BenchLora { generate, timing } => bench::bench_lora(&generate, timing),
        Command::BenchControlnet { generate, timing } => {
            bench_controlnet::bench_controlnet(&generate, timing)
        }
        Command::BenchUpscale(args) => bench_upscale::bench_upscale(&args),
        Command::BenchDetector(args) => bench_detector::bench_detector(&args),
        Command::Health(args) => health::health(&args),
        Command::CheckConfig { config } => {
            let settings = sdxld::config::Settings::load(config.as_deref())?;
            println!(
                "configuration valid: listen {}, tls {}, {} tokens",
                settings.server.listen,
                settings.server.tls.enabled(),
                settings.server.tokens.len()
            );
            Ok(())
        }
    }
}

/// `sdxld serve`.
fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    model: Option<String>,
) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
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
