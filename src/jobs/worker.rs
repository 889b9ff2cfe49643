//! The worker thread: owns the device and the loaded pipelines, takes jobs from the
//! queue in order and runs them, checking for stop requests between denoising steps.

use std::collections::HashSet;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::Tensor;

use crate::engine::cache::{activation_estimate, ModelCache, ModelPath};
use crate::engine::codec::VaeCodec;
use crate::engine::error::EngineError;
use crate::engine::loading::lora::LoraWeights;
use crate::engine::lora::{JobLora, LoraMode};
use crate::engine::pipeline::{GenerateParams, Placement, Progress, SdxlPipeline};
use crate::engine::registry::{ModelEntry, ModelKind};
use crate::jobs::{AdminOp, Job, JobError, JobEvent, JobQueue, Outcome, Stage, StopReason, Work};
use crate::output::{encode_image, encode_latents, latent_preview, OutputFormat, PngMetadata};
use crate::proto::v1 as pb;
use crate::telemetry::Metrics;

/// The model cache, on the worker thread only (tensors are not shared across threads),
/// mirrored into the set of resident paths the models RPC reads.
pub struct Engine {
    cache: ModelCache,
    /// The paths loaded, shared with the models RPC.
    resident: Arc<Mutex<HashSet<PathBuf>>>,
    /// How LoRA adapters are applied.
    lora_mode: LoraMode,
}

fn stage_pb(stage: Stage) -> i32 {
    (match stage {
        Stage::Queued => pb::Stage::Queued,
        Stage::LoadingModels => pb::Stage::LoadingModels,
        Stage::EncodingPrompt => pb::Stage::EncodingPrompt,
        Stage::Denoising => pb::Stage::Denoising,
        Stage::Refining => pb::Stage::Refining,
        Stage::Decoding => pb::Stage::Decoding,
        Stage::PostProcessing => pb::Stage::PostProcessing,
    }) as i32
}

impl Engine {
    /// An engine with nothing loaded, at most `budget` bytes of models and activations on
    /// the device and `host_budget` bytes of evicted components on the host; `resident`
    /// mirrors what it holds.
    pub fn new(
        placement: Placement,
        budget: Option<u64>,
        host_budget: u64,
        resident: Arc<Mutex<HashSet<PathBuf>>>,
    ) -> Self {
        Self {
            cache: ModelCache::with_host_budget(placement, budget, host_budget),
            resident,
            lora_mode: LoraMode::default(),
        }
    }

    /// This engine applying LoRA adapters the `mode` way.
    pub fn with_lora_mode(self, mode: LoraMode) -> Self {
        Self {
            lora_mode: mode,
            ..self
        }
    }

    /// Device and precision.
    pub fn placement(&self) -> Placement {
        self.cache.placement()
    }

    /// What the cache holds.
    pub fn stats(&self) -> crate::engine::cache::CacheStats {
        self.cache.stats()
    }

    fn publish(&self) {
        if let Ok(mut resident) = self.resident.lock() {
            *resident = self.cache.resident_paths().into_iter().collect();
        }
    }

    /// Makes room for a job using `models` and `params`, evicting what it does not use,
    /// and says how its LoRA adapters are applied: merging them takes `lora_copies` more
    /// bytes while the job runs, which the auto mode spends only if the budget has them.
    pub fn make_room(
        &mut self,
        models: &[ModelPath<'_>],
        params: &GenerateParams,
        lora_copies: u64,
    ) -> Result<LoraMode, EngineError> {
        let element = self.placement().kind.elt_size_in_bytes() as u64;
        let activations = models
            .iter()
            .find_map(|m| match m {
                ModelPath::Pipeline(path) => Some(activation_estimate(path, params, element)),
                ModelPath::Vae(_) | ModelPath::Lora(_) => None,
            })
            .unwrap_or(0);
        let result = match self.lora_mode {
            LoraMode::Forward => self
                .cache
                .make_room(models, activations)
                .map(|()| LoraMode::Forward),
            LoraMode::Merge => self
                .cache
                .make_room(models, activations + lora_copies)
                .map(|()| LoraMode::Merge),
            LoraMode::Auto => match self.cache.make_room(models, activations + lora_copies) {
                Ok(()) => Ok(LoraMode::Merge),
                Err(EngineError::MemoryBudget(_)) if lora_copies > 0 => {
                    tracing::info!(
                        lora_copies,
                        "merged LoRA weights would not fit the memory budget; applying them in the forward pass"
                    );
                    self.cache
                        .make_room(models, activations)
                        .map(|()| LoraMode::Forward)
                }
                Err(e) => Err(e),
            },
        };
        self.publish();
        result
    }

    /// The pipeline of `model`, loading it on first use.
    pub fn pipeline(&mut self, model: &ModelEntry) -> Result<Rc<SdxlPipeline>, EngineError> {
        let pipeline = self.cache.pipeline(&model.path);
        self.publish();
        pipeline
    }

    /// The VAE `model`, loading it on first use.
    pub fn vae(&mut self, model: &ModelEntry) -> Result<Rc<VaeCodec>, EngineError> {
        let vae = self.cache.vae(&model.path);
        self.publish();
        vae
    }

    /// The LoRA adapter `model`, loading it on first use.
    pub fn lora(&mut self, model: &ModelEntry) -> Result<Rc<LoraWeights>, EngineError> {
        let lora = self.cache.lora(&model.path, &model.name);
        self.publish();
        lora
    }

    /// Whether `model` is loaded.
    pub fn is_resident(&self, model: &ModelEntry) -> bool {
        self.cache.is_resident(&model.path)
    }

    /// Loads `model` (an admin request), making room for it.
    pub fn load(&mut self, model: &ModelEntry) -> Result<(), EngineError> {
        let path = match model.kind {
            ModelKind::Vae => ModelPath::Vae(&model.path),
            ModelKind::Lora => ModelPath::Lora(&model.path),
            _ => ModelPath::Pipeline(&model.path),
        };
        self.cache.make_room(&[path], 0)?;
        match model.kind {
            ModelKind::Vae => self.vae(model).map(|_| ()),
            ModelKind::Lora => self.lora(model).map(|_| ()),
            _ => self.pipeline(model).map(|_| ()),
        }
    }

    /// After the device ran out of memory: evicts every model the job does not use and
    /// returns the allocator's free blocks to the driver.
    pub fn free_memory(&mut self, keep: &[PathBuf]) {
        self.cache.evict_all_except(keep);
        crate::engine::cuda::empty_cache(self.placement().device);
        self.publish();
    }

    /// Unloads `model`; whether it was loaded.
    pub fn unload(&mut self, model: &ModelEntry) -> bool {
        let was = self.cache.unload(&model.path);
        self.publish();
        was
    }

    /// Loads `model` and runs one small denoising step, so the first request does not pay
    /// for lazy initialisation.
    pub fn warm_up(&mut self, model: &ModelEntry) -> Result<(), EngineError> {
        self.load(model)?;
        let pipeline = self.pipeline(model)?;
        // Inpainting models cannot run text to image: warm them up on a blank image.
        let init_image = pipeline
            .is_inpainting()
            .then(|| crate::engine::pipeline::InitImage {
                width: 64,
                height: 64,
                pixels: vec![127; 64 * 64 * 3],
                strength: 1.0,
                mask: Some(vec![255; 64 * 64]),
                denoising_start: None,
            });
        let params = GenerateParams {
            prompt: "warm-up".into(),
            width: 64,
            height: 64,
            steps: 1,
            init_image,
            ..GenerateParams::default()
        };
        let _latents = pipeline.denoise(&params, &mut |_| Ok(()))?;
        Ok(())
    }
}

/// Timing of the stages of one job.
struct StageClock {
    current: Option<(Stage, Instant)>,
    timings: Vec<pb::StageTiming>,
    metrics: Arc<Metrics>,
}

impl StageClock {
    fn enter(&mut self, stage: Stage) {
        if self.current.map(|(s, _)| s) == Some(stage) {
            return;
        }
        self.close();
        self.current = Some((stage, Instant::now()));
    }

    fn close(&mut self) {
        if let Some((stage, start)) = self.current.take() {
            let elapsed = start.elapsed();
            self.metrics.observe_stage(stage, elapsed);
            match self.timings.iter_mut().find(|t| t.stage == stage_pb(stage)) {
                Some(t) => t.duration_ms += elapsed.as_secs_f64() * 1000.0,
                None => self.timings.push(pb::StageTiming {
                    stage: stage_pb(stage),
                    duration_ms: elapsed.as_secs_f64() * 1000.0,
                }),
            }
        }
    }
}

/// Runs jobs until the queue is closed. Call on a dedicated OS thread.
pub fn run_worker(queue: Arc<JobQueue>, mut engine: Engine, metrics: Arc<Metrics>) {
    metrics.set_cache(engine.stats());
    while let Some(work) = queue.next_work() {
        let job = match work {
            Work::Job(job) => *job,
            Work::Admin(request) => {
                let result = match request.op {
                    AdminOp::Load => engine.load(&request.model).map(|()| true),
                    AdminOp::Unload => Ok(engine.unload(&request.model)),
                };
                if let Err(e) = &result {
                    tracing::warn!(model = %request.model.name, error = %e, "admin load failed");
                }
                let _ = request.reply.send(result);
                metrics.set_cache(engine.stats());
                continue;
            }
        };
        metrics.set_queue_depth(queue.depth());
        let outcome = match run_job(&mut engine, &job, &metrics) {
            Ok(()) => Outcome::Completed,
            Err(err) => {
                let outcome = match err {
                    JobError::Stopped(_) => Outcome::Stopped,
                    _ => Outcome::Failed,
                };
                metrics.job_failed(err.error_type());
                if let JobError::Engine(e) = &err {
                    tracing::warn!(job = %job.id, error = %e, "job failed");
                }
                let _ = job.events.blocking_send(JobEvent::Failed(err));
                outcome
            }
        };
        queue.finish(&job, outcome);
        drop(job);
        metrics.set_cache(engine.stats());
        metrics.set_queue_depth(queue.depth());
    }
}

fn check(job: &Job) -> Result<(), JobError> {
    if let Some(reason) = job.control.stopped() {
        return Err(JobError::Stopped(reason));
    }
    if job.events.is_closed() {
        return Err(JobError::Stopped(StopReason::ClientGone));
    }
    Ok(())
}

fn send(job: &Job, event: JobEvent) -> Result<(), JobError> {
    job.events
        .blocking_send(event)
        .map_err(|_| JobError::Stopped(StopReason::ClientGone))
}

fn progress(stage: Stage, step: usize, total: usize, image_index: usize) -> pb::JobProgress {
    pb::JobProgress {
        stage: stage_pb(stage),
        step: step as u32,
        total_steps: total as u32,
        image_index: image_index as u32,
        preview: None,
    }
}

fn run_job(engine: &mut Engine, job: &Job, metrics: &Arc<Metrics>) -> Result<(), JobError> {
    let span = tracing::info_span!("job", job.id = %job.id, model = %job.spec.model.name);
    let _enter = span.enter();
    let spec = &job.spec;
    let mut clock = StageClock {
        current: Some((Stage::Queued, job.admitted_at)),
        timings: Vec::new(),
        metrics: metrics.clone(),
    };
    check(job)?;

    clock.enter(Stage::LoadingModels);
    crate::engine::cuda::reset_peak(engine.placement().device);
    let refiner_model = spec.refiner.as_ref().map(|r| &r.model);
    let vae_model = spec.vae.as_ref().map(|v| &v.model);
    if [Some(&spec.model), refiner_model, vae_model]
        .into_iter()
        .flatten()
        .chain(spec.loras.iter().map(|l| &l.model))
        .any(|m| !engine.is_resident(m))
    {
        send(
            job,
            JobEvent::Progress(progress(Stage::LoadingModels, 0, 0, 0)),
        )?;
    }
    let mut models = vec![ModelPath::Pipeline(&spec.model.path)];
    models.extend(refiner_model.map(|m| ModelPath::Pipeline(&m.path)));
    models.extend(vae_model.map(|m| ModelPath::Vae(&m.path)));
    models.extend(spec.loras.iter().map(|l| ModelPath::Lora(&l.model.path)));
    let lora_files: Vec<_> = spec
        .loras
        .iter()
        .map(|l| (l.model.path.as_path(), l.model.name.as_str()))
        .collect();
    let lora_copies = crate::engine::lora::merged_bytes(
        &lora_files,
        engine.placement().kind.elt_size_in_bytes() as u64,
    )?;
    let lora_mode = engine.make_room(&models, &spec.params, lora_copies)?;
    let mut pipeline = engine.pipeline(&spec.model)?;
    let mut refiner = match refiner_model {
        Some(model) => Some(engine.pipeline(model)?),
        None => None,
    };
    if let Some(model) = vae_model {
        // The request's VAE replaces the models' own for encoding and decoding.
        let vae = engine.vae(model)?;
        pipeline = Rc::new(pipeline.with_vae(vae.clone())?);
        if let Some(r) = refiner.take() {
            refiner = Some(Rc::new(r.with_vae(vae)?));
        }
    }
    let mut loras = Vec::with_capacity(spec.loras.len());
    for lora in &spec.loras {
        loras.push(JobLora {
            name: lora.model.name.clone(),
            weights: engine.lora(&lora.model)?,
            strength: f64::from(lora.weight),
        });
    }
    // On the base model's components for the whole job; taken off when this goes out of
    // scope, however the job ends.
    let _adapters =
        EngineError::catch(|| crate::engine::lora::apply(&pipeline, &loras, lora_mode))?;
    // Loads and evictions are visible before the job reports anything further.
    metrics.set_cache(engine.stats());
    check(job)?;
    let mut warnings = Vec::new();

    // Images are denoised one at a time, each with its own seed, so that an image is
    // the same whatever batch it was part of (the PNG metadata reproduces it exactly),
    // and each is sent as soon as it is ready.
    let preview_every = spec.output.preview_every as usize;
    let (width, height) = (spec.params.width as u32, spec.params.height as u32);
    let count = spec.params.num_images;
    for i in 0..count {
        check(job)?;
        let seed = spec.params.seed + i as u64;
        let params = GenerateParams {
            seed,
            num_images: 1,
            ..spec.params.clone()
        };
        let mut last_step = Instant::now();
        let mut step_error: Option<JobError> = None;
        let mut on_progress = |p: Progress<'_>| -> Result<(), EngineError> {
            let result = match p {
                Progress::EncodingPrompt => {
                    clock.enter(Stage::EncodingPrompt);
                    send(
                        job,
                        JobEvent::Progress(progress(Stage::EncodingPrompt, 0, 0, i)),
                    )
                }
                Progress::Denoising {
                    step,
                    total,
                    latents,
                    refining,
                } => {
                    let stage = if refining {
                        Stage::Refining
                    } else {
                        Stage::Denoising
                    };
                    if step == 0 {
                        clock.enter(stage);
                    } else {
                        metrics.observe_step(last_step.elapsed());
                    }
                    last_step = Instant::now();
                    let mut event = progress(stage, step, total, i);
                    if preview_every > 0 && step > 0 && (step % preview_every == 0 || step == total)
                    {
                        event.preview = preview(&latents.get(0));
                    }
                    check(job).and_then(|()| send(job, JobEvent::Progress(event)))
                }
                Progress::Decoding { .. } => Ok(()),
            };
            result.map_err(|e| {
                step_error = Some(e);
                EngineError::Cancelled
            })
        };
        let denoise = |on_progress: &mut dyn FnMut(Progress<'_>) -> Result<(), EngineError>| {
            EngineError::catch(|| match (&refiner, &spec.refiner) {
                (Some(refiner), Some(stage)) => crate::engine::refiner::denoise_refined(
                    &pipeline,
                    refiner,
                    &params,
                    &stage.params,
                    on_progress,
                ),
                _ => pipeline.denoise(&params, on_progress),
            })
        };
        let mut denoised = denoise(&mut on_progress);
        if denoised
            .as_ref()
            .err()
            .is_some_and(EngineError::is_out_of_memory)
        {
            // The job's tensors are gone with the failed attempt: free what other models
            // hold and try once more.
            tracing::warn!(job = %job.id, "device out of memory; evicting idle models and retrying once");
            engine.free_memory(&keep_paths(spec));
            denoised = denoise(&mut on_progress);
        }
        let latents = match denoised {
            Ok(latents) => latents,
            Err(EngineError::Cancelled) => {
                return Err(step_error.unwrap_or(JobError::Stopped(StopReason::Cancelled)))
            }
            Err(e) => return Err(e.into()),
        };
        check(job)?;
        let image_latents = latents.get(0);
        let (data, mime) = if spec.output.format == OutputFormat::Latents {
            clock.enter(Stage::PostProcessing);
            (
                encode_latents(&image_latents)?,
                OutputFormat::Latents.mime_type(),
            )
        } else {
            clock.enter(Stage::Decoding);
            send(job, JobEvent::Progress(progress(Stage::Decoding, 0, 0, i)))?;
            // The refiner pipeline decodes with its VAE, as diffusers' recipe does.
            let decoder = refiner.as_ref().unwrap_or(&pipeline);
            let decode = |tiled| {
                EngineError::catch(|| decoder.vae_codec().decode_with(&image_latents, tiled))
            };
            let decoded = match decode(false) {
                Err(e) if e.is_out_of_memory() => {
                    // Free what other models hold and decode tile by tile.
                    tracing::warn!(job = %job.id, "device out of memory while decoding; retrying with VAE tiling");
                    engine.free_memory(&keep_paths(spec));
                    decode(true)?
                }
                other => other?,
            };
            if decoded.redone_in_float32 {
                warnings.push(format!(
                    "image {i}: the VAE's half-precision decode was not finite; it was decoded again in float32"
                ));
            }
            let image = decoded.image;
            clock.enter(Stage::PostProcessing);
            let metadata = (spec.output.format == OutputFormat::Png && spec.output.embed_metadata)
                .then(|| png_metadata(spec, seed));
            let data = encode_image(
                &image,
                spec.output.format,
                spec.output.quality,
                metadata.as_ref(),
            )?;
            (data, spec.output.format.mime_type())
        };
        metrics.image_produced();
        send(
            job,
            JobEvent::Image(pb::GeneratedImage {
                index: i as u32,
                seed,
                data,
                mime_type: mime.to_string(),
                width,
                height,
                ready_after_ms: job.admitted_at.elapsed().as_secs_f64() * 1000.0,
            }),
        )?;
    }
    clock.close();

    if let Some(w) = prompt_warning(&pipeline, spec) {
        warnings.push(w);
    }
    send(
        job,
        JobEvent::Completed(pb::JobCompleted {
            job_id: job.id.clone(),
            stage_timings: std::mem::take(&mut clock.timings),
            total_ms: job.admitted_at.elapsed().as_secs_f64() * 1000.0,
            peak_device_memory_bytes: crate::engine::cuda::memory(engine.placement().device)
                .map_or(0, |m| m.peak),
            models: models_used(spec),
            warnings,
        }),
    )
}

/// The models a job uses, which a memory recovery keeps.
fn keep_paths(spec: &crate::jobs::JobSpec) -> Vec<PathBuf> {
    let mut paths = vec![spec.model.path.clone()];
    paths.extend(spec.refiner.as_ref().map(|r| r.model.path.clone()));
    paths.extend(spec.vae.as_ref().map(|v| v.model.path.clone()));
    paths
}

/// The models a job used, with their hashes (and the LoRAs' weights).
fn models_used(spec: &crate::jobs::JobSpec) -> Vec<pb::ModelUsage> {
    let usage =
        |model: &ModelEntry, kind: pb::ModelKind, sha256: &str, weight: f32| pb::ModelUsage {
            name: model.name.clone(),
            kind: kind as i32,
            sha256: sha256.to_string(),
            weight,
        };
    let mut models = vec![usage(
        &spec.model,
        pb::ModelKind::Base,
        &spec.model_sha256,
        0.0,
    )];
    if let Some(r) = &spec.refiner {
        models.push(usage(&r.model, pb::ModelKind::Refiner, &r.sha256, 0.0));
    }
    if let Some(v) = &spec.vae {
        models.push(usage(&v.model, pb::ModelKind::Vae, &v.sha256, 0.0));
    }
    models.extend(
        spec.loras
            .iter()
            .map(|l| usage(&l.model, pb::ModelKind::Lora, &l.sha256, l.weight)),
    );
    models
}

/// A warning when a prompt is longer than CLIP's 77 tokens.
fn prompt_warning(pipeline: &SdxlPipeline, spec: &crate::jobs::JobSpec) -> Option<String> {
    let dropped = pipeline.prompt_overflow(&spec.params.prompt);
    (dropped > 0)
        .then(|| format!("the prompt is {dropped} tokens longer than CLIP's 77 and was truncated"))
}

fn preview(latents: &Tensor) -> Option<pb::Preview> {
    let rgb = latent_preview(latents)?;
    let size = rgb.size();
    let data = encode_image(&rgb, OutputFormat::Png, 0, None).ok()?;
    Some(pb::Preview {
        data,
        mime_type: "image/png".into(),
        width: size[1] as u32,
        height: size[0] as u32,
    })
}

/// The A1111 `parameters` text and the resolved request of image `seed`.
fn png_metadata(spec: &crate::jobs::JobSpec, seed: u64) -> PngMetadata {
    let p = &spec.params;
    let mut text = p.prompt.clone();
    // A1111 writes the LoRAs a prompt used into the prompt itself.
    for lora in &spec.loras {
        text.push_str(&format!(" <lora:{}:{}>", lora.model.name, lora.weight));
    }
    if let Some(negative) = &p.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    let hash = &spec.model_sha256;
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}, Version: sdxld {}",
        p.steps,
        spec.sampler_name,
        p.guidance_scale,
        seed,
        p.width,
        p.height,
        &hash[..hash.len().min(10)],
        spec.model.name,
        env!("CARGO_PKG_VERSION"),
    ));
    if p.guidance_rescale > 0.0 {
        text.push_str(&format!(", CFG rescale: {}", p.guidance_rescale));
    }
    if let Some(vae) = &spec.vae {
        text.push_str(&format!(
            ", VAE hash: {}, VAE: {}",
            &vae.sha256[..vae.sha256.len().min(10)],
            vae.model.name
        ));
    }
    if !spec.loras.is_empty() {
        let hashes: Vec<String> = spec
            .loras
            .iter()
            .map(|l| format!("{}: {}", l.model.name, &l.sha256[..l.sha256.len().min(12)]))
            .collect();
        text.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
    }
    if let Some(refiner) = &spec.refiner {
        let hash = &refiner.sha256;
        text.push_str(&format!(
            ", Refiner: {} [{}]",
            refiner.model.name,
            &hash[..hash.len().min(10)]
        ));
        match refiner.params.mode {
            crate::engine::pipeline::RefinerMode::EnsembleOfExperts {
                high_noise_fraction,
            } => text.push_str(&format!(", Refiner switch at: {high_noise_fraction}")),
            crate::engine::pipeline::RefinerMode::Img2Img { strength } => {
                text.push_str(&format!(", Refiner strength: {strength}"))
            }
        }
    }
    let mut resolved = spec.resolved.clone();
    resolved.seed = Some(seed);
    resolved.num_images = 1;
    resolved.client_job_id.clear();
    PngMetadata {
        parameters: text,
        request_json: crate::proto::spec_to_json(&resolved),
    }
}
