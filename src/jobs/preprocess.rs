//! The preprocess stage: each ControlNet unit's image through its preprocessor, then
//! fitted to the output size by the unit's resize mode; once per job, before the
//! prompts are encoded.

use crate::engine::control::{fit, map_tensor};
use crate::engine::error::EngineError;
use crate::jobs::events::{RgbImage, Stage, StepProgress};
use crate::jobs::runner::JobRun;
use crate::jobs::JobError;

impl JobRun<'_> {
    /// Computes every unit's control map, reporting one step per unit.
    pub(crate) fn preprocess(&mut self) -> Result<(), JobError> {
        let units = &self.spec.controlnets;
        let _span = tracing::info_span!("stage", otel.name = "preprocessing", units = units.len())
            .entered();
        let (width, height) = (self.spec.params.width, self.spec.params.height);
        let (Ok(width), Ok(height)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(EngineError::Internal(format!("output size {width}x{height}")).into());
        };
        let total = units.len() as u32;
        let mut maps = Vec::with_capacity(units.len());
        for (i, unit) in units.iter().enumerate() {
            if let Some(reason) = self.sink.stopped() {
                return Err(JobError::Stopped(reason));
            }
            self.sink.progress(StepProgress {
                stage: Stage::Preprocessing,
                step: i as u32,
                total,
                image_index: 0,
                preview: None,
            });
            let map = unit.preprocessor.run(&unit.image.0);
            let fitted = fit(&map, width, height, unit.resize);
            let tensor = map_tensor(&fitted);
            if self.spec.output.return_control_maps {
                let image = RgbImage {
                    width,
                    height,
                    pixels: fitted.into_raw(),
                };
                self.sink.control_map(i as u32, image);
            }
            maps.push(tensor);
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
}
