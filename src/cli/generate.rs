//! `sdxld generate`: the flags become a `GenerationSpec`, validated by the server's code
//! against a local registry (the model, VAE and refiner folders and the LoRA folder the
//! flags name) and run through the server's job runner; images are written as PNGs with
//! the metadata the server embeds.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use sdxld::api::status::ApiError;
use sdxld::api::validate::{to_job_spec, Context as Validation};
use sdxld::engine::device::Placement;
use sdxld::engine::registry::{ModelEntry, ModelRoots, Registry};
use sdxld::engine::weights::WeightLayout;
use sdxld::jobs::encode::encode;
use sdxld::jobs::engine::Engine;
use sdxld::jobs::events::{FinishedImage, Stage, StepProgress};
use sdxld::jobs::runner::{run_job, JobSink, RunOptions};
use sdxld::jobs::{JobSpec, StopReason};
use sdxld::output::{numbered_path, write_latents};
use sdxld::telemetry::Metrics;

use crate::cli::args::{flag_of, spec_of, GenerateArgs};

/// A folder's parent (the root it is named under) and its name there.
fn root_and_name(path: &Path) -> anyhow::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{} names no folder", path.display()))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    Ok((parent.unwrap_or(Path::new(".")).to_path_buf(), name))
}

impl GenerateArgs {
    /// The registry the flags describe: the model as the default base model, the VAE's
    /// and the refiner's folders, the hires upscaler's, the embeddings', the IP-Adapters'
    /// and their image encoders', the hires pass's model's, and the LoRA folder as roots.
    fn registry(&self) -> anyhow::Result<Registry> {
        let model = ModelEntry::from_path(&self.model).ok_or_else(|| {
            anyhow!(
                "--model {} is neither a diffusers folder nor a single-file SDXL checkpoint",
                self.model.display()
            )
        })?;
        let mut roots = ModelRoots::default();
        if let Some(vae) = &self.vae {
            roots.vae.push(root_and_name(vae)?.0);
        }
        if let Some(refiner) = &self.refiner {
            roots.refiner.push(root_and_name(refiner)?.0);
        }
        if let Some(own) = &self.hires.hires_model {
            roots.base.push(root_and_name(own)?.0);
        }
        if let Some(upscaler) = &self.hires.hires_upscaler {
            roots.upscaler.push(root_and_name(upscaler)?.0);
        }
        for unit in &self.controlnets {
            let parsed = crate::cli::controlnet::parse(unit)?;
            roots.controlnet.push(root_and_name(&parsed.folder)?.0);
            if let Some(file) = &parsed.detector {
                roots.preprocessor.push(root_and_name(file)?.0);
            }
        }
        for arg in &self.embeddings {
            let (file, _) = crate::cli::args::embedding_file(arg);
            roots.embedding.push(root_and_name(&file)?.0);
        }
        for arg in &self.ip_adapters {
            let parsed = crate::cli::ip_adapter::parse(arg)?;
            roots.ip_adapter.push(root_and_name(&parsed.adapter)?.0);
            roots.image_encoder.push(root_and_name(&parsed.encoder)?.0);
        }
        match (&self.lora_dir, self.loras.is_empty()) {
            (Some(dir), _) => roots.lora.push(dir.clone()),
            (None, false) => bail!("--lora needs --lora-dir, the folder its names resolve in"),
            (None, true) => {}
        }
        Ok(Registry::new(roots, model))
    }

    /// The job the flags ask for, validated as the server validates requests.
    pub fn job(&self) -> anyhow::Result<JobSpec> {
        let spec = spec_of(self)?;
        let registry = self.registry()?;
        let settings = sdxld::config::Settings::load(None)?;
        let context = Validation {
            limits: &settings.limits,
            registry: &registry,
            preprocessing: &settings.preprocessing,
            drawn_seed: sdxld::api::generation::random_seed(),
        };
        to_job_spec(Some(spec), &context).map_err(explain)
    }

    /// An engine on the --device and --dtype, applying adapters the --lora-mode way.
    pub fn engine(&self) -> anyhow::Result<Engine> {
        let placement = Placement::parse(&self.device, &self.dtype)?
            .with_layout(WeightLayout {
                channels_last: self.channels_last,
                fused_projections: self.fused_projections,
            })
            .with_cuda_graphs(self.cuda_graphs)
            .with_vae_band_rows(self.vae_band_rows);
        if self.cudnn_benchmark {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let attention = self.attention_backend.parse().map_err(anyhow::Error::msg)?;
        sdxld::engine::sdpa::set_attention_backend(attention);
        let mode = self.lora_mode.parse().map_err(anyhow::Error::msg)?;
        let budget = Some(self.memory_budget).filter(|b| *b > 0);
        Ok(Engine::local(placement, budget).with_lora_mode(mode))
    }
}

/// A validation error, with the flags of the bad fields.
fn explain(error: ApiError) -> anyhow::Error {
    match error {
        ApiError::InvalidArgument(violations) => {
            let lines: Vec<String> = violations
                .iter()
                .map(|(field, description)| match flag_of(field) {
                    Some(flag) => format!("  {flag}: {description}"),
                    None => format!("  {description}"),
                })
                .collect();
            anyhow!("invalid arguments:\n{}", lines.join("\n"))
        }
        other => anyhow!(other.to_string()),
    }
}

/// Writes each image as it comes, draws a progress bar on a terminal.
struct FileSink<'a> {
    output: &'a Path,
    bar: Option<indicatif::ProgressBar>,
    latents: Vec<tch::Tensor>,
    error: Option<anyhow::Error>,
}

impl JobSink for FileSink<'_> {
    fn stopped(&mut self) -> Option<StopReason> {
        // A file that could not be written ends the run.
        self.error.as_ref().map(|_| StopReason::Cancelled)
    }

    fn progress(&mut self, progress: StepProgress) {
        let Some(bar) = &self.bar else { return };
        bar.set_message(progress.stage.label());
        if matches!(
            progress.stage,
            Stage::Denoising | Stage::Refining | Stage::HiresDenoising
        ) {
            bar.set_length(u64::from(progress.total));
            bar.set_position(u64::from(progress.step));
        }
    }

    fn image(&mut self, image: FinishedImage) {
        if let Some(latents) = &image.latents {
            self.latents.push(latents.unsqueeze(0));
        }
        let path = numbered_path(self.output, image.index as usize);
        let written = encode(&image)
            .map_err(anyhow::Error::from)
            .and_then(|encoded| {
                std::fs::write(&path, encoded.data)
                    .with_context(|| format!("writing {}", path.display()))
            });
        match written {
            Ok(()) => {
                if let Some(bar) = &self.bar {
                    bar.suspend(|| println!("wrote {} (seed {})", path.display(), image.seed));
                } else {
                    println!("wrote {} (seed {})", path.display(), image.seed);
                }
            }
            Err(e) => self.error = Some(e),
        }
    }
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    Some(bar)
}

/// `sdxld generate`.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let job = args.job()?;
    let mut engine = args.engine()?;
    let mut sink = FileSink {
        output: &args.output,
        bar: progress_bar(),
        latents: Vec::new(),
        error: None,
    };
    let options = RunOptions {
        batch: args.batch.mode(),
        keep_latents: args.latents_out.is_some(),
    };
    let metrics = Metrics::new();
    let result = run_job(
        &mut engine,
        &job,
        options,
        &mut sink,
        &metrics,
        Instant::now(),
    );
    if let Some(bar) = &sink.bar {
        bar.finish_and_clear();
    }
    if let Some(error) = sink.error.take() {
        return Err(error);
    }
    result?;
    if let Some(path) = &args.latents_out {
        write_latents(path, &tch::Tensor::cat(&sink.latents, 0))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
