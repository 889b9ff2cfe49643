//! The post-process stage: every image of a run through the job's steps in order, before
//! it is encoded. An upscale step runs its model tile by tile, reporting each tile and
//! stopping between tiles when the job must stop; a tile out of device memory is retried
//! at half the size; a factor below the model's own resizes its output down with Pillow's
//! Lanczos filter, as A1111 does.

use std::rc::Rc;

use crate::engine::error::EngineError;
use crate::engine::noise::NoiseStream;
use crate::engine::resample::lanczos_resize;
use crate::engine::upscale::tiles::{Checkpoint, TilePlan, Tiling};
use crate::engine::upscale::{UpscaleNoise, Upscaler};
use crate::jobs::engine::Engine;
use crate::jobs::events::{RgbImage, Stage, StepProgress};
use crate::jobs::interrupt::PassGate;
use crate::jobs::runner::{JobRun, JobSink};
use crate::jobs::{JobError, PostStep, UpscaleJob};

/// The smallest tile an out-of-memory retry halves down to.
const MIN_TILE: i64 = 64;

impl JobRun<'_> {
    /// Runs the post-processing steps on `images` (the first being image `first_index`
    /// of the request).
    pub(crate) fn post_process(
        &mut self,
        images: &mut [RgbImage],
        first_index: usize,
    ) -> Result<(), JobError> {
        let upscalers: Vec<Rc<Upscaler>> = self
            .loaded
            .as_ref()
            .map(|l| l.upscalers.clone())
            .ok_or_else(|| EngineError::Internal("post-processing before loading".into()))?;
        for (i, image) in images.iter_mut().enumerate() {
            let index = (first_index + i) as u32;
            let _span = tracing::info_span!("stage", otel.name = "post_processing", image = index)
                .entered();
            for (step, upscaler) in self.spec.post_processing.iter().zip(&upscalers) {
                let PostStep::Upscale(job) = step;
                *image = self.upscale(image, job, upscaler, index)?;
            }
        }
        Ok(())
    }

    /// One upscale step on one image (image `index` of the request, whose seed seeds
    /// any noise the upscaler draws).
    fn upscale(
        &mut self,
        image: &RgbImage,
        job: &UpscaleJob,
        upscaler: &Upscaler,
        index: u32,
    ) -> Result<RgbImage, JobError> {
        let keep: Vec<_> = self.spec.models().map(|m| m.path.clone()).collect();
        let target = Target {
            sink: &mut *self.sink,
            stage: Stage::PostProcessing,
            index,
            keep: &keep,
            seed: self.spec.params.seed.wrapping_add(u64::from(index)),
        };
        let input = image.clone().into_image()?;
        let output = upscale_image(self.engine, target, upscaler, job, &input)?;
        Ok(output.into())
    }
}

/// Where an upscale reports to: the job's sink, the stage and image its tiles count for,
/// the models to keep when memory is freed, and the image's seed (the noise of an
/// upscaler that draws noise).
pub(crate) struct Target<'a> {
    pub sink: &'a mut dyn JobSink,
    pub stage: Stage,
    pub index: u32,
    pub keep: &'a [std::path::PathBuf],
    pub seed: u64,
}

/// `input` through `job`'s upscaler ([`model_pass`]), resized down with Lanczos below
/// the model's own factor.
pub(crate) fn upscale_image(
    engine: &mut Engine,
    mut target: Target<'_>,
    upscaler: &Upscaler,
    job: &UpscaleJob,
    input: &image::RgbImage,
) -> Result<image::RgbImage, JobError> {
    let upscaled = model_pass(engine, &mut target, upscaler, job.tiling, input, None)?;
    let (width, height) = (input.width() * job.factor, input.height() * job.factor);
    Ok(if upscaled.dimensions() == (width, height) {
        upscaled
    } else {
        lanczos_resize(&upscaled, width, height)
    })
}

/// One pass of `upscaler` over `input`, tile by tile (tiles fitted to the device
/// memory the budget leaves free unless the request sized them), retried with halved
/// tiles while the device runs out of memory; any noise drawn from the target's seed,
/// through `stream` where the job holds its noise stream.
pub(crate) fn model_pass(
    engine: &mut Engine,
    target: &mut Target<'_>,
    upscaler: &Upscaler,
    plan: TilePlan,
    input: &image::RgbImage,
    mut stream: Option<&mut NoiseStream>,
) -> Result<image::RgbImage, JobError> {
    let mut tiling = upscaler.tiling(plan, engine.free_bytes());
    loop {
        let noise = UpscaleNoise {
            seed: target.seed,
            stream: stream.as_deref_mut(),
        };
        match tiled(target, upscaler, input, tiling, noise) {
            Err(JobError::Engine(e)) if e.is_out_of_memory() && tiling.tile > MIN_TILE => {
                tiling = halved(tiling);
                tracing::warn!(
                    tile = tiling.tile,
                    "device out of memory while upscaling; retrying with smaller tiles"
                );
                engine.free_memory(target.keep);
            }
            other => return other,
        }
    }
}

/// Half the tile and overlap (the overlap kept below half the tile).
fn halved(tiling: Tiling) -> Tiling {
    let tile = (tiling.tile / 2).max(MIN_TILE);
    Tiling {
        tile,
        overlap: (tiling.overlap / 2).min(tile / 2 - 1),
        ..tiling
    }
}

/// The upscaler over `input` tile by tile, each tile reported to the target's sink,
/// stopping between tiles and between the network's blocks when the sink says so.
fn tiled(
    target: &mut Target<'_>,
    upscaler: &Upscaler,
    input: &image::RgbImage,
    tiling: Tiling,
    noise: UpscaleNoise<'_>,
) -> Result<image::RgbImage, JobError> {
    let mut gate = PassGate::default();
    let (stage, index) = (target.stage, target.index);
    let sink = &mut *target.sink;
    let result = EngineError::catch(|| {
        upscaler.upscale(input, tiling, noise, &mut |checkpoint| {
            gate.check(sink)?;
            if let Checkpoint::Tile { done, total } = checkpoint {
                sink.progress(StepProgress {
                    stage,
                    step: done as u32,
                    total: total as u32,
                    image_index: index,
                    preview: None,
                });
            }
            Ok(())
        })
    });
    gate.outcome(result)
}
