//! The hires stage of a run: the first pass's latents enlarged (interpolated, or decoded
//! and run through the upscaler model tile by tile, as A1111's Hires. fix does), then
//! denoised again at the final size as image to image, on the run's generator as it
//! stands after the first pass (diffusers' two-pipeline recipe). With a refiner stage the
//! hires pass is the one that hands over to it.

use std::ops::ControlFlow;

use tch::Tensor;

use crate::engine::error::EngineError;
use crate::engine::hires::{
    enlarge_image, enlarge_latents, entry, image_tensor, second_pass_params, Enlarge, Enlarged,
};
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::{GenerateParams, PromptEmbeds, PromptTokens, Step};
use crate::jobs::events::{Stage, StepProgress};
use crate::jobs::lora_sets::LoraPass;
use crate::jobs::postprocess::{model_pass, Target};
use crate::jobs::runner::{JobRun, Run, StepObserver};
use crate::jobs::{HiresJob, JobError};

impl JobRun<'_> {
    /// The hires pass of one run (of one image): its final latents, or why it stopped.
    pub(crate) fn hires_pass(
        &mut self,
        run: &Run,
        noise: &mut NoiseStream,
    ) -> Result<Tensor, JobError> {
        let spec = self.spec;
        let (job, latents) = match (&spec.hires, &run.latents) {
            (Some(job), Some(latents)) => (job, latents),
            _ => return Err(EngineError::Internal("a hires pass without its input".into()).into()),
        };
        let index = run.first_index;
        self.clock.enter(Stage::HiresUpscaling, self.metrics);
        let enlarged = {
            let _span = tracing::info_span!("stage", otel.name = "hires_upscaling", image = index)
                .entered();
            self.enlarge(job, latents, index, run.params.seed, noise)?
        };
        self.check()?;
        self.clock.enter(Stage::HiresDenoising, self.metrics);
        let params = GenerateParams {
            denoising_end: self.handoff_end(),
            ..second_pass_params(&run.params, &job.params)
        };
        let _span = tracing::info_span!(
            "stage",
            otel.name = "hires_denoising",
            image = index,
            steps = params.steps,
            width = params.width,
            height = params.height,
            scheduler = %job.sampler_name,
        )
        .entered();
        let second = self.loaded()?.hires_pipeline().clone();
        let prompt = self
            .prompts
            .as_ref()
            .and_then(|p| p.hires.as_ref())
            .ok_or_else(|| EngineError::Internal("a hires pass without its prompts".into()))?;
        let mut observer = StepObserver::new(spec, Stage::HiresDenoising, index, self.metrics);
        let sink = &mut *self.sink;
        let mut on_step = |step: Step<'_>| observer.observe(step, sink);
        let from = enlarged.start(entry(&job.params));
        let flow =
            EngineError::catch(|| second.denoise(&params, prompt, from, &[], noise, &mut on_step))?;
        match flow {
            ControlFlow::Continue(latents) => Ok(latents),
            ControlFlow::Break(reason) => Err(JobError::Stopped(reason)),
        }
    }

    /// The hires pass's prompts (`p`'s), encoded with its LoRAs on the text encoders of
    /// the pipeline that runs it (the base's `tokens` serve the base).
    pub(crate) fn encode_hires_prompts(
        &mut self,
        p: &GenerateParams,
        tokens: &PromptTokens,
    ) -> Result<PromptEmbeds, JobError> {
        let loaded = self.loaded.as_mut().ok_or_else(|| {
            EngineError::Internal("encoding before the models loaded".to_string())
        })?;
        if let Some(own) = &loaded.hires_model {
            // Its set is on it throughout; its tokenizers read the embeddings anew.
            let embeddings = &loaded.embeddings;
            return Ok(EngineError::catch(|| {
                let tokens = own.pipeline.prompt_tokens(embeddings)?;
                own.pipeline.encode_prompt_with(p, &tokens)
            })?);
        }
        loaded
            .loras
            .text_encoders_for(&loaded.base, LoraPass::Hires)?;
        Ok(EngineError::catch(|| {
            loaded.base.encode_prompt_with(p, tokens)
        })?)
    }

    /// The first pass's latents [1, C, h, w] enlarged to the final size; an upscaler that
    /// draws noise draws it from a generator of the image's `seed`, leaving the job's
    /// `noise` stream where it was.
    fn enlarge(
        &mut self,
        job: &HiresJob,
        latents: &Tensor,
        index: usize,
        seed: u64,
        noise: &mut NoiseStream,
    ) -> Result<Enlarged, JobError> {
        let base = self.loaded()?.base.clone();
        let (width, height) = (job.params.width, job.params.height);
        let tiling = match job.params.enlarge {
            Enlarge::Latent(mode) => {
                self.sink.progress(StepProgress {
                    stage: Stage::HiresUpscaling,
                    step: 0,
                    total: 0,
                    image_index: index as u32,
                    preview: None,
                });
                let f = base.vae_scale_factor();
                let enlarged = enlarge_latents(latents, mode, height / f, width / f)?;
                return Ok(Enlarged::Latents(enlarged));
            }
            Enlarge::Model(tiling) => tiling,
        };
        let upscaler = self
            .loaded()?
            .hires_upscaler
            .clone()
            .ok_or_else(|| EngineError::Internal("a hires pass without its upscaler".into()))?;
        let decoded = self.vae_decode(&base, &latents.get(0), index)?;
        let image = decoded.into_image()?;
        let keep: Vec<_> = self.spec.models().map(|m| m.path.clone()).collect();
        let mut target = Target {
            sink: &mut *self.sink,
            stage: Stage::HiresUpscaling,
            index: index as u32,
            keep: &keep,
            seed,
        };
        let engine = &mut *self.engine;
        let upscaled = enlarge_image(image, width as u32, height as u32, |pass_input| {
            model_pass(
                engine,
                &mut target,
                &upscaler,
                tiling,
                pass_input,
                Some(noise),
            )
        })?;
        Ok(Enlarged::Image(image_tensor(&upscaled)))
    }
}
