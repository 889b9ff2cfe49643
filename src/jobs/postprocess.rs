//! The post-process stage: every image of a run through the job's steps in order, before
//! it is encoded. An upscale step runs its model tile by tile, reporting each tile and
//! stopping between tiles when the job must stop; a tile out of device memory is retried
//! at half the size; a factor below the model's own resizes its output down with Pillow's
//! Lanczos filter, as A1111 does.

use std::rc::Rc;

use crate::engine::error::EngineError;
use crate::engine::resample::lanczos_resize;
use crate::engine::upscale::tiles::Tiling;
use crate::engine::upscale::Upscaler;
use crate::jobs::engine::Engine;
use crate::jobs::events::{RgbImage, Stage, StepProgress};
use crate::jobs::runner::{JobRun, JobSink};
use crate::jobs::{JobError, PostStep, StopReason, UpscaleJob};

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

    /// One upscale step on one image.
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
            index,
            keep: &keep,
        };
        upscale_image(self.engine, target, upscaler, job, image)
    }
}

/// Where an upscale reports to: the job's sink, the image's index, and the models to
/// keep when memory is freed.
pub(crate) struct Target<'a> {
    pub sink: &'a mut dyn JobSink,
    pub index: u32,
    pub keep: &'a [std::path::PathBuf],
}

/// `image` through `job`'s upscaler, tile by tile, retried with halved tiles while the
/// device runs out of memory; resized down with Lanczos below the model's own factor.
pub(crate) fn upscale_image(
    engine: &mut Engine,
    target: Target<'_>,
    upscaler: &Upscaler,
    job: &UpscaleJob,
    image: &RgbImage,
) -> Result<RgbImage, JobError> {
    let input = image::RgbImage::from_raw(image.width, image.height, image.pixels.clone())
        .ok_or_else(|| EngineError::Internal("an image of the wrong size".into()))?;
    let mut tiling = job.tiling;
    let upscaled = loop {
        match tiled(&mut *target.sink, upscaler, &input, tiling, target.index) {
            Err(JobError::Engine(e)) if e.is_out_of_memory() && tiling.tile > MIN_TILE => {
                tiling = halved(tiling);
                tracing::warn!(
                    tile = tiling.tile,
                    "device out of memory while upscaling; retrying with smaller tiles"
                );
                engine.free_memory(target.keep);
            }
            other => break other?,
        }
    };
    let (width, height) = (image.width * job.factor, image.height * job.factor);
    let resized = if upscaled.dimensions() == (width, height) {
        upscaled
    } else {
        lanczos_resize(&upscaled, width, height)
    };
    Ok(RgbImage {
        width,
        height,
        pixels: resized.into_raw(),
    })
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

/// The upscaler over `input` tile by tile, each tile reported to `sink`, stopping when
/// the sink says so.
fn tiled(
    sink: &mut dyn JobSink,
    upscaler: &Upscaler,
    input: &image::RgbImage,
    tiling: Tiling,
    index: u32,
) -> Result<image::RgbImage, JobError> {
    let mut stopped: Option<StopReason> = None;
    let result = EngineError::catch(|| {
        upscaler.upscale(input, tiling, &mut |done, total| {
            if let Some(reason) = sink.stopped() {
                stopped = Some(reason);
                return Err(EngineError::Internal("stopped between tiles".into()));
            }
            sink.progress(StepProgress {
                stage: Stage::PostProcessing,
                step: done as u32,
                total: total as u32,
                image_index: index,
                preview: None,
            });
            Ok(())
        })
    });
    match (stopped, result) {
        (Some(reason), _) => Err(JobError::Stopped(reason)),
        (None, result) => Ok(result?),
    }
}
