//! The per-run stages that turn a run's latents into images handed out: the VAE decode
//! (tile by tile when the device runs out of memory), the paste-back of a masked area
//! into the original image, and the hand-off of each image, or its latents, to the sink
//! for encoding.

use tch::Tensor;

use crate::engine::error::EngineError;
use crate::engine::inpaint_area::paste_back;
use crate::engine::pipeline::SdxlPipeline;
use crate::jobs::events::{FinishedImage, ImageContent, RgbImage, Stage, StepProgress};
use crate::jobs::interrupt::interruptible;
use crate::jobs::runner::{JobRun, JobSink, Run};
use crate::jobs::JobError;
use crate::output::OutputFormat;

impl JobRun<'_> {
    /// Decodes each image of the run, with the refiner's VAE when there is a refiner (as
    /// diffusers' recipe decodes).
    pub(crate) fn decode(&mut self, run: &mut Run) -> Result<(), JobError> {
        let latents = run
            .latents
            .take()
            .ok_or_else(|| EngineError::Internal("decoding before denoising".into()))?;
        let decoder = self.loaded()?.decoder();
        for i in 0..latents.size()[0] {
            self.check()?;
            let index = run.first_index + i as usize;
            self.clock.enter(Stage::Decoding, self.metrics);
            let _span =
                tracing::info_span!("stage", otel.name = "decoding", image = index).entered();
            self.sink.progress(StepProgress {
                stage: Stage::Decoding,
                step: 0,
                total: 0,
                image_index: index as u32,
                preview: None,
            });
            let image = self.vae_decode(&decoder, &latents.get(i), index)?;
            run.images.push(image);
        }
        run.latents = Some(latents);
        Ok(())
    }

    /// One image's latents [C, h, w] through `decoder`'s VAE: tile by tile where the job
    /// fits the memory budget only so, or after running out of device memory.
    pub(crate) fn vae_decode(
        &mut self,
        decoder: &SdxlPipeline,
        latents: &Tensor,
        index: usize,
    ) -> Result<RgbImage, JobError> {
        let decode = |tiled, sink: &mut dyn JobSink| {
            interruptible(sink, |between| {
                let codec = decoder.vae_codec();
                EngineError::catch(|| codec.decode_with(latents, tiled, between))
            })
        };
        let budget_tiles = self.loaded()?.tiled_decode;
        if budget_tiles && decoder.vae_codec().tiles(latents) {
            self.report.warnings.push(format!(
                "image {index}: decoded tile by tile (VAE tiling), as a whole decode would not fit the memory budget"
            ));
        }
        let decoded = match decode(budget_tiles, &mut *self.sink) {
            Err(JobError::Engine(e))
                if e.is_out_of_memory() && !budget_tiles && self.spec.params.seamless.is_none() =>
            {
                tracing::warn!("device out of memory while decoding; retrying with VAE tiling");
                let keep: Vec<_> = self.spec.models().map(|m| m.path.clone()).collect();
                self.engine.free_memory(&keep);
                decode(true, &mut *self.sink)?
            }
            other => other?,
        };
        if decoded.redone_in_float32 {
            self.report.warnings.push(format!(
                "image {index}: the VAE's half-precision decode was not finite; it was decoded again in float32"
            ));
        }
        Ok(RgbImage::from_hwc(&decoded.image)?)
    }

    /// Puts each image of the run (of the masked area only) back into the original image.
    pub(crate) fn paste_back(&mut self, run: &mut Run) -> Result<(), JobError> {
        let Some(back) = self.spec.paste_back.as_ref() else {
            return Ok(());
        };
        for image in &mut run.images {
            self.check()?;
            let generated = std::mem::take(image).into_image()?;
            *image = paste_back(back, &generated).into();
        }
        Ok(())
    }

    /// Hands each image of the run to the sink for encoding.
    pub(crate) fn encode(&mut self, run: &mut Run) -> Result<(), JobError> {
        let count = run.params.num_images;
        let latents = run.latents.take();
        let mut images = std::mem::take(&mut run.images).into_iter();
        for i in 0..count {
            let index = run.first_index + i;
            let seed = self.spec.params.seed + index as u64;
            let denoised = self.spec.denoised_size();
            let mut size = (denoised.0 as u32, denoised.1 as u32);
            let content = match self.spec.output.format {
                OutputFormat::Latents => {
                    let latents = latents
                        .as_ref()
                        .ok_or_else(|| EngineError::Internal("no latents to encode".to_string()))?;
                    ImageContent::Latents(latents.get(i as i64))
                }
                _ => {
                    let image = images.next().ok_or_else(|| {
                        EngineError::Internal("no decoded image to encode".to_string())
                    })?;
                    // Post-processing may have resized it.
                    size = (image.width, image.height);
                    ImageContent::Rgb(image)
                }
            };
            let metadata = self.png_metadata(index, seed);
            let kept = latents
                .as_ref()
                .filter(|_| self.options.keep_latents)
                .map(|l| l.get(i as i64));
            self.metrics.image_produced();
            self.sink.image(FinishedImage {
                index: index as u32,
                seed,
                variation_seed: self.spec.params.variation.map(|v| v.nth(index as u64).seed),
                width: size.0,
                height: size.1,
                content,
                format: self.spec.output.format,
                quality: self.spec.output.quality,
                metadata,
                latents: kept,
            });
        }
        Ok(())
    }
}
