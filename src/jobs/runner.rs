//! The job runner, shared by the server's worker and the CLI. A job is an ordered list of
//! stages ([`JobStage`]): load models, [preprocess control images], encode prompts, then
//! for each denoising run of the batch: denoise, [hires pass], [refine], decode,
//! [post-process] and encode. Each stage reports through a [`JobSink`], which also says,
//! after every step, whether the job goes on.

use std::ops::ControlFlow;
use std::time::Instant;

use tch::Tensor;

use crate::engine::device;
use crate::engine::error::EngineError;
use crate::engine::models::seamless;
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::{Control, PromptEmbeds, Start, Step};
use crate::engine::refiner;
use crate::engine::request::{batch_runs, BatchMode, GenerateParams, PromptSyntax};
use crate::jobs::clock::StageClock;
use crate::jobs::engine::Engine;
use crate::jobs::events::{FinishedImage, JobReport, RgbImage, Stage, StepProgress};
use crate::jobs::loaded::Loaded;
use crate::jobs::{JobError, JobSpec, StopReason};
use crate::output::{latent_preview, OutputFormat};
use crate::telemetry::Metrics;

/// Where a running job's progress and images go.
pub trait JobSink {
    /// Why the job must stop, if it must (asked between steps and stages).
    fn stopped(&mut self) -> Option<StopReason>;
    /// A stage started or a step finished.
    fn progress(&mut self, progress: StepProgress);
    /// An image is finished (the sink encodes and delivers it).
    fn image(&mut self, image: FinishedImage);
    /// A ControlNet unit's control map (of condition `condition_index` of a union unit),
    /// when the job hands them out.
    fn control_map(&mut self, unit_index: u32, condition_index: u32, map: RgbImage) {
        let _ = (unit_index, condition_index, map);
    }
}

/// How the runner runs a job.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// How the images of a batch are split into denoising runs.
    pub batch: BatchMode,
    /// Hand out each image's final latents with it.
    pub keep_latents: bool,
}

/// The stages of a job, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStage {
    /// Load the models (and apply the LoRA adapters).
    LoadModels,
    /// Turn the ControlNet units' images into control maps at the output size.
    Preprocess,
    /// Run the text encoders, once for all images.
    EncodePrompts,
    /// The base model's denoising of one run.
    Denoise,
    /// The hires pass: the run's result enlarged and denoised again at the final size, on
    /// the same generator.
    Hires,
    /// The refiner's denoising of the run's last pass (the hires pass when there is one),
    /// on the same generator.
    Refine,
    /// The VAE decode of each image.
    Decode,
    /// Each image of the masked area put back into the original image.
    PasteBack,
    /// The post-processing steps on each image.
    PostProcess,
    /// Each image handed out for encoding.
    Encode,
}

impl JobStage {
    /// The stage progress events and timings name.
    pub fn reported_as(self) -> Stage {
        match self {
            JobStage::LoadModels => Stage::LoadingModels,
            JobStage::Preprocess => Stage::Preprocessing,
            JobStage::EncodePrompts => Stage::EncodingPrompt,
            JobStage::Denoise => Stage::Denoising,
            JobStage::Refine => Stage::Refining,
            JobStage::Hires => Stage::HiresDenoising,
            JobStage::Decode | JobStage::PasteBack => Stage::Decoding,
            JobStage::PostProcess => Stage::PostProcessing,
            JobStage::Encode => Stage::PostProcessing,
        }
    }

    /// Whether the stage runs once per denoising run (rather than once per job).
    fn per_run(self) -> bool {
        !matches!(
            self,
            JobStage::LoadModels | JobStage::Preprocess | JobStage::EncodePrompts
        )
    }

    /// Whether the stage draws from the run's generator.
    fn draws_noise(self) -> bool {
        matches!(self, JobStage::Denoise | JobStage::Refine | JobStage::Hires)
    }
}

/// The stages `spec` runs.
pub fn plan(spec: &JobSpec) -> Vec<JobStage> {
    let mut stages = vec![JobStage::LoadModels];
    if !spec.controlnets.is_empty() {
        stages.push(JobStage::Preprocess);
    }
    stages.extend([JobStage::EncodePrompts, JobStage::Denoise]);
    if spec.hires.is_some() {
        stages.push(JobStage::Hires);
    }
    if spec.refiner.is_some() {
        stages.push(JobStage::Refine);
    }
    if spec.output.format != OutputFormat::Latents {
        stages.push(JobStage::Decode);
        if spec.paste_back.is_some() {
            stages.push(JobStage::PasteBack);
        }
    }
    if !spec.post_processing.is_empty() {
        stages.push(JobStage::PostProcess);
    }
    stages.push(JobStage::Encode);
    stages
}

/// The text conditioning of each pipeline (and of the hires pass, whose guidance may
/// differ).
pub(crate) struct Prompts {
    pub base: PromptEmbeds,
    pub refiner: Option<PromptEmbeds>,
    pub hires: Option<PromptEmbeds>,
}

/// One denoising run of the batch on its way through the stages.
pub(crate) struct Run {
    pub params: GenerateParams,
    /// Index of its first image in the request.
    pub first_index: usize,
    /// Latents [N, C, h, w] after the noise stages.
    pub latents: Option<Tensor>,
    /// Decoded images after the decode stage.
    pub images: Vec<RgbImage>,
}

/// A job on its way through its stages.
pub(crate) struct JobRun<'a> {
    pub engine: &'a mut Engine,
    pub spec: &'a JobSpec,
    pub sink: &'a mut dyn JobSink,
    pub metrics: &'a Metrics,
    pub clock: StageClock,
    pub options: RunOptions,
    pub admitted_at: Instant,
    pub report: JobReport,
    pub loaded: Option<Loaded>,
    /// Each unit's control maps at the output size after the preprocess stage: [1, 3, H,
    /// W] float32 in [0, 1] on the CPU.
    pub control_maps: Vec<Vec<Tensor>>,
    pub prompts: Option<Prompts>,
}

/// Runs `spec` on `engine`: its report, or why it did not complete. The caller's span
/// (the job's) is the parent of one span per stage.
pub fn run_job(
    engine: &mut Engine,
    spec: &JobSpec,
    options: RunOptions,
    sink: &mut dyn JobSink,
    metrics: &Metrics,
    admitted_at: Instant,
) -> Result<JobReport, JobError> {
    let mut job = JobRun {
        clock: StageClock::starting_at(Stage::Queued, admitted_at),
        options,
        engine,
        spec,
        sink,
        metrics,
        admitted_at,
        report: JobReport::default(),
        loaded: None,
        control_maps: Vec::new(),
        prompts: None,
    };
    job.check()?;
    // The UNets and the VAE pad as the request asks for as long as the job runs.
    let _seamless = seamless::request(spec.params.seamless);
    let stages = plan(spec);
    for stage in stages.iter().filter(|s| !s.per_run()) {
        job.run_stage(*stage)?;
    }
    let per_run: Vec<JobStage> = stages.into_iter().filter(|s| s.per_run()).collect();
    for run in job.runs(options.batch)? {
        job.run_through(run, &per_run)?;
    }
    Ok(job.finish())
}

impl JobRun<'_> {
    /// Stops the job if its sink says so.
    pub(crate) fn check(&mut self) -> Result<(), JobError> {
        match self.sink.stopped() {
            Some(reason) => Err(JobError::Stopped(reason)),
            None => Ok(()),
        }
    }

    pub(crate) fn loaded(&self) -> Result<&Loaded, JobError> {
        self.loaded.as_ref().ok_or_else(|| {
            EngineError::Internal("a stage ran before the models loaded".into()).into()
        })
    }

    /// A job-level stage.
    fn run_stage(&mut self, stage: JobStage) -> Result<(), JobError> {
        self.check()?;
        self.clock.enter(stage.reported_as(), self.metrics);
        match stage {
            JobStage::LoadModels => self.load_models(),
            JobStage::Preprocess => self.preprocess(),
            JobStage::EncodePrompts => self.encode_prompts(),
            _ => Err(EngineError::Internal(format!("{stage:?} runs per image")).into()),
        }
    }

    /// The denoising runs of the batch.
    fn runs(&self, mode: BatchMode) -> Result<Vec<Run>, JobError> {
        let p = &self.spec.params;
        let continued = self.spec.refiner.is_some() || self.spec.hires.is_some();
        let own = continued || self.loaded()?.base.needs_own_generators(p)?;
        let mut first_index = 0;
        Ok(batch_runs(p, own, mode)
            .into_iter()
            .map(|params| {
                let run = Run {
                    first_index,
                    latents: None,
                    images: Vec::new(),
                    params,
                };
                first_index += run.params.num_images;
                run
            })
            .collect())
    }

    /// Takes one run through the per-run stages.
    fn run_through(&mut self, mut run: Run, stages: &[JobStage]) -> Result<(), JobError> {
        self.check()?;
        let noise_stages: Vec<JobStage> =
            stages.iter().copied().filter(|s| s.draws_noise()).collect();
        self.noise_stages(&mut run, &noise_stages)?;
        for stage in stages.iter().filter(|s| !s.draws_noise()) {
            self.check()?;
            match stage {
                JobStage::Decode => self.decode(&mut run)?,
                JobStage::PasteBack => self.paste_back(&mut run)?,
                JobStage::PostProcess => {
                    let first = run.first_index;
                    self.post_process(&mut run.images, first)?
                }
                JobStage::Encode => self.encode(&mut run)?,
                other => {
                    return Err(
                        EngineError::Internal(format!("{other:?} is not a run stage")).into(),
                    )
                }
            }
        }
        Ok(())
    }

    /// The stages that draw from the run's generator, under one hold of it (the refiner
    /// continues where the base left it). Out of device memory, they are retried once
    /// after evicting every model the job does not use.
    fn noise_stages(&mut self, run: &mut Run, stages: &[JobStage]) -> Result<(), JobError> {
        match self.try_noise_stages(run, stages) {
            Err(JobError::Engine(e)) if e.is_out_of_memory() => {
                tracing::warn!("device out of memory; evicting idle models and retrying once");
                let keep: Vec<_> = self.spec.models().map(|m| m.path.clone()).collect();
                self.engine.free_memory(&keep);
                self.try_noise_stages(run, stages)
            }
            other => other,
        }
    }

    fn try_noise_stages(&mut self, run: &mut Run, stages: &[JobStage]) -> Result<(), JobError> {
        let mut noise = NoiseStream::lock();
        run.latents = None;
        for &stage in stages {
            self.check()?;
            self.carry_loras_for(stage)?;
            let latents = match stage {
                JobStage::Hires => self.hires_pass(run, &mut noise)?,
                _ => self.denoise_stage(stage, run, &mut noise)?,
            };
            run.latents = Some(latents);
        }
        Ok(())
    }

    /// One denoising stage of a run: its latents, or the reason it was stopped.
    fn denoise_stage(
        &mut self,
        stage: JobStage,
        run: &Run,
        noise: &mut NoiseStream,
    ) -> Result<Tensor, JobError> {
        let reported = stage.reported_as();
        self.clock.enter(reported, self.metrics);
        let _span = tracing::info_span!(
            "stage",
            otel.name = reported.label(),
            image = run.first_index,
            steps = run.params.steps,
            width = run.params.width,
            height = run.params.height,
            scheduler = %self.spec.sampler_name,
        )
        .entered();
        let base_params = self.stage_params(&run.params);
        let last_pass = self.last_pass_params(&run.params);
        let refine = self.spec.refiner.as_ref().map(|job| {
            let (_, entry) = refiner::handoff(job.params.mode);
            (refiner::refiner_params(&last_pass, &job.params), entry)
        });
        let loaded = self.loaded.as_ref().ok_or_else(|| {
            EngineError::Internal("denoising before the models loaded".to_string())
        })?;
        let prompts = self.prompts.as_ref().ok_or_else(|| {
            EngineError::Internal("denoising before the prompts were encoded".to_string())
        })?;
        let controls = controls(loaded, &self.control_maps, self.spec);
        let mut on_step = StepObserver::new(self.spec, reported, run.first_index, self.metrics);
        let sink = &mut *self.sink;
        let mut on_step = |step: Step<'_>| on_step.observe(step, sink);
        let flow = match (
            stage,
            &run.latents,
            &loaded.refiner,
            &prompts.refiner,
            refine,
        ) {
            (JobStage::Denoise, ..) => EngineError::catch(|| {
                loaded.base.denoise(
                    &base_params,
                    &prompts.base,
                    Start::Request,
                    &controls,
                    noise,
                    &mut on_step,
                )
            })?,
            (JobStage::Refine, Some(latents), Some(refiner), Some(prompt), Some((p, entry))) => {
                let mask = refiner::handoff_mask(&last_pass);
                let from = Start::Handoff {
                    latents,
                    entry,
                    mask: mask.as_ref(),
                };
                EngineError::catch(|| refiner.denoise(&p, prompt, from, &[], noise, &mut on_step))?
            }
            _ => return Err(EngineError::Internal(format!("{stage:?} cannot run here")).into()),
        };
        match flow {
            ControlFlow::Continue(latents) => Ok(latents),
            ControlFlow::Break(reason) => Err(JobError::Stopped(reason)),
        }
    }

    /// The base's first-pass parameters for a run: it hands over to a refiner (stopping
    /// at the high-noise fraction in ensemble mode) unless a hires pass follows it.
    fn stage_params(&self, run: &GenerateParams) -> GenerateParams {
        GenerateParams {
            denoising_end: self.handoff_end().filter(|_| self.spec.hires.is_none()),
            ..run.clone()
        }
    }

    /// Where the pass that hands over to the refiner stops: the high-noise fraction in
    /// ensemble mode.
    pub(crate) fn handoff_end(&self) -> Option<f64> {
        let job = self.spec.refiner.as_ref()?;
        refiner::handoff(job.params.mode).0
    }

    /// The parameters of a run's last pass, the one the refiner continues: the hires
    /// pass's when there is one.
    fn last_pass_params(&self, run: &GenerateParams) -> GenerateParams {
        match &self.spec.hires {
            Some(h) => crate::engine::hires::second_pass_params(run, &h.params),
            None => run.clone(),
        }
    }

    /// The report, once every image was handed out.
    fn finish(mut self) -> JobReport {
        self.clock.close(self.metrics);
        let mut report = std::mem::take(&mut self.report);
        for (stage, elapsed) in self.clock.take_timings() {
            report.add_time(stage, elapsed);
        }
        report.total = self.admitted_at.elapsed();
        report.peak_device_memory_bytes =
            device::memory(self.engine.placement().device).map_or(0, |m| m.peak);
        report
    }

    /// The base's and the refiner's prompt embeddings.
    fn encode_prompts(&mut self) -> Result<(), JobError> {
        let _span = tracing::info_span!("stage", otel.name = "encoding_prompt").entered();
        self.sink.progress(StepProgress {
            stage: Stage::EncodingPrompt,
            step: 0,
            total: 0,
            image_index: 0,
            preview: None,
        });
        let loaded = self.loaded()?;
        let base_params = self.stage_params(&self.spec.params);
        let tokens = EngineError::catch(|| loaded.base.prompt_tokens(&loaded.embeddings))?;
        let mut base =
            EngineError::catch(|| loaded.base.encode_prompt_with(&base_params, &tokens))?;
        let refined = match (&loaded.refiner, &self.spec.refiner) {
            (Some(pipeline), Some(job)) => {
                // The refiner continues the last pass, whose steps A1111's edits count.
                let last_pass = self.last_pass_params(&self.spec.params);
                let p = refiner::refiner_params(&last_pass, &job.params);
                Some(EngineError::catch(|| {
                    let tokens = pipeline.prompt_tokens(&loaded.embeddings)?;
                    pipeline.encode_prompt_with(&p, &tokens)
                })?)
            }
            _ => None,
        };
        let mut hires = match &self.spec.hires {
            Some(h) => {
                let p = crate::engine::hires::second_pass_params(&base_params, &h.params);
                Some(self.encode_hires_prompts(&p, &tokens)?)
            }
            None => None,
        };
        // Image prompts condition the base UNet's passes; the refiner's UNet fits none.
        base.images = self.encode_image_prompts()?;
        if let Some(hires) = hires.as_mut() {
            hires.images = base.images.clone();
        }
        // Prompts in compel's and A1111's syntax are encoded whole, in chunks.
        let dropped = match self.spec.params.prompt_syntax {
            PromptSyntax::Plain => {
                (self.loaded()?.base).prompt_overflow(&self.spec.params.prompt, &tokens)?
            }
            PromptSyntax::Compel | PromptSyntax::A1111 => 0,
        };
        if dropped > 0 {
            self.report.warnings.push(format!(
                "the prompt is {dropped} tokens longer than CLIP's 77 and was truncated"
            ));
        }
        self.prompts = Some(Prompts {
            base,
            refiner: refined,
            hires,
        });
        if self.loaded()?.offload_text_encoders {
            let mut paths = vec![self.spec.model.path.as_path()];
            paths.extend(self.spec.hires_model().map(|m| m.path.as_path()));
            paths.extend(self.spec.refiner.as_ref().map(|r| r.model.path.as_path()));
            self.engine.offload_text_encoders(&paths);
            self.metrics.set_cache(self.engine.stats());
        }
        Ok(())
    }
}

/// The job's ControlNet units as the base's denoising takes them.
fn controls<'a>(
    loaded: &'a Loaded,
    maps: &'a [Vec<Tensor>],
    spec: &'a JobSpec,
) -> Vec<Control<'a>> {
    loaded
        .controlnets
        .iter()
        .zip(maps)
        .zip(&spec.controlnets)
        .map(|((model, maps), job)| Control {
            model,
            maps,
            unit: &job.unit,
        })
        .collect()
}

/// Reports each denoising step of a run (with its preview every `preview_every` steps
/// and the step time) and says whether the job goes on.
pub(crate) struct StepObserver<'m> {
    stage: Stage,
    image_index: u32,
    preview_every: usize,
    metrics: &'m Metrics,
    last_step: Instant,
}

impl<'m> StepObserver<'m> {
    pub fn new(spec: &JobSpec, stage: Stage, image_index: usize, metrics: &'m Metrics) -> Self {
        Self {
            stage,
            image_index: image_index as u32,
            preview_every: spec.output.preview_every as usize,
            metrics,
            last_step: Instant::now(),
        }
    }

    pub fn observe(&mut self, step: Step<'_>, sink: &mut dyn JobSink) -> ControlFlow<StopReason> {
        if step.step > 0 {
            self.metrics.observe_step(self.last_step.elapsed());
        }
        self.last_step = Instant::now();
        let every = self.preview_every;
        let wants_preview = every > 0
            && step.step > 0
            && (step.step.is_multiple_of(every) || step.step == step.total);
        sink.progress(StepProgress {
            stage: self.stage,
            step: step.step as u32,
            total: step.total as u32,
            image_index: self.image_index,
            preview: wants_preview.then(|| preview(step.latents)).flatten(),
        });
        match sink.stopped() {
            Some(reason) => ControlFlow::Break(reason),
            None => ControlFlow::Continue(()),
        }
    }
}

/// A latent-space preview of the first image of `latents` [N, C, h, w].
fn preview(latents: &Tensor) -> Option<RgbImage> {
    RgbImage::from_hwc(&latent_preview(&latents.get(0))?).ok()
}
