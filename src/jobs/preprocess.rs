//! The preprocess stage: each ControlNet unit's images through their preprocessors, then
//! fitted to the output size by the unit's resize mode (or, inpainting only the masked
//! area, cut to that area as the init image was); once per job, before the prompts are
//! encoded.

use image::RgbImage as Picture;

use crate::engine::control::{fit, ResizeMode};
use crate::engine::error::EngineError;
use crate::engine::pixels::unit_range;
use crate::jobs::detectors::LoadedNetworks;
use crate::jobs::events::{RgbImage, Stage, StepProgress};
use crate::jobs::interrupt::interruptible;
use crate::jobs::runner::JobRun;
use crate::jobs::JobError;

impl JobRun<'_> {
    /// Computes every unit's control maps, reporting one step per map.
    pub(crate) fn preprocess(&mut self) -> Result<(), JobError> {
        let units = &self.spec.controlnets;
        let _span = tracing::info_span!("stage", otel.name = "preprocessing", units = units.len())
            .entered();
        let (width, height) = (self.spec.params.width, self.spec.params.height);
        let (Ok(width), Ok(height)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(EngineError::Internal(format!("output size {width}x{height}")).into());
        };
        let total = units.iter().map(|u| u.inputs.len()).sum::<usize>() as u32;
        let mut done = 0;
        let mut maps = Vec::with_capacity(units.len());
        for (i, unit) in units.iter().enumerate() {
            let mut unit_maps = Vec::with_capacity(unit.inputs.len());
            for (j, input) in unit.inputs.iter().enumerate() {
                if let Some(reason) = self.sink.stopped() {
                    return Err(JobError::Stopped(reason));
                }
                self.sink.progress(StepProgress {
                    stage: Stage::Preprocessing,
                    step: done,
                    total,
                    image_index: 0,
                    preview: None,
                });
                let networks = self
                    .loaded
                    .as_ref()
                    .and_then(|l| l.detectors.get(i)?.get(j))
                    .map(LoadedNetworks::networks)
                    .unwrap_or_default();
                let map = interruptible(&mut *self.sink, |between_passes| {
                    let preprocessing = input.preprocessing;
                    preprocessing.run_interruptible(&input.image.0, networks, between_passes)
                })?;
                let fitted = self.fitted(&map, (width, height), unit.resize);
                unit_maps.push(unit_range(&fitted));
                if self.spec.output.return_control_maps {
                    self.sink
                        .control_map(i as u32, j as u32, RgbImage::from(fitted));
                }
                done += 1;
            }
            maps.push(unit_maps);
        }
        self.sink.progress(StepProgress {
            stage: Stage::Preprocessing,
            step: total,
            total,
            image_index: 0,
            preview: None,
        });
        self.control_maps = maps;
        Ok(())
    }

    /// A control map at the output size: cut to the masked area when only that area is
    /// generated, else fitted the unit's way.
    fn fitted(&self, map: &Picture, size: (u32, u32), resize: ResizeMode) -> Picture {
        self.spec
            .masked_area_of(map)
            .unwrap_or_else(|| fit(map, size.0, size.1, resize))
    }
}
