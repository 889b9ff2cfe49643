//! The image prompts of a job, encoded once (in the encode-prompts stage) for every run.

use std::sync::Arc;

use image::RgbImage;

use crate::engine::error::EngineError;
use crate::engine::ip_adapter::ImagePrompt;
use crate::jobs::runner::JobRun;
use crate::jobs::{IpAdapterJob, JobError};

impl JobRun<'_> {
    /// Each image prompt's tokens: its images through its image encoder and adapter.
    pub(crate) fn encode_image_prompts(&self) -> Result<Vec<ImagePrompt>, JobError> {
        let loaded = self.loaded()?;
        let _span = (!self.spec.ip_adapters.is_empty()).then(|| {
            tracing::info_span!("image_prompts", count = self.spec.ip_adapters.len()).entered()
        });
        self.spec
            .ip_adapters
            .iter()
            .zip(&loaded.ip_adapters)
            .map(|(job, models)| {
                let images: Vec<_> = job.images.iter().map(|i| &*i.0).collect();
                Ok(EngineError::catch(|| {
                    Ok(ImagePrompt::encode(
                        models.adapter.clone(),
                        &models.encoder,
                        &images,
                        job.scale,
                        job.layers,
                    )
                    .with_masks(self.masks_of(job)))
                })?)
            })
            .collect()
    }

    /// An image prompt's masks as the generation sees them (cut to the masked area when
    /// only that area is generated).
    fn masks_of(&self, job: &IpAdapterJob) -> Vec<Arc<RgbImage>> {
        let area = |mask: &Arc<RgbImage>| self.spec.masked_area_of(mask).map(Arc::new);
        job.masks
            .iter()
            .map(|m| area(&m.0).unwrap_or_else(|| m.0.clone()))
            .collect()
    }
}
