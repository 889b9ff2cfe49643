//! What jobs of one model share (an upscale, a preprocessing): stop checks, the model
//! loaded into the cache within the budget, progress events and the report.

use std::rc::Rc;
use std::time::Instant;

use crate::engine::device;
use crate::engine::error::EngineError;
use crate::engine::registry::{ModelEntry, ModelKind};
use crate::jobs::clock::StageClock;
use crate::jobs::engine::{model_path, Engine};
use crate::jobs::events::{JobReport, ModelUsed, Stage, StepProgress};
use crate::jobs::runner::JobSink;
use crate::jobs::JobError;

/// Stops the job if its sink says so.
pub(crate) fn stop_check(sink: &mut dyn JobSink) -> Result<(), JobError> {
    sink.stopped().map_or(Ok(()), |r| Err(JobError::Stopped(r)))
}

/// The job's model in the cache, room made for it and `activations` bytes within the
/// budget, through `get` (the engine's accessor for the model's kind).
pub(crate) fn load<T>(
    engine: &mut Engine,
    sink: &mut dyn JobSink,
    (model, activations): (&ModelEntry, u64),
    get: fn(&mut Engine, &ModelEntry) -> Result<Rc<T>, EngineError>,
) -> Result<Rc<T>, JobError> {
    make_room(engine, sink, &[model], activations)?;
    Ok(get(engine, model)?)
}

/// Room made in the cache for the job's `models` (the first names the job) and
/// `activations` bytes within the budget, announcing a load where one is needed.
pub(crate) fn make_room(
    engine: &mut Engine,
    sink: &mut dyn JobSink,
    models: &[&ModelEntry],
    activations: u64,
) -> Result<(), JobError> {
    let name = models.first().map_or("", |m| m.name.as_str());
    let _span = tracing::info_span!("stage", otel.name = "loading_models", model = %name).entered();
    device::reset_peak(engine.placement().device);
    if models.iter().any(|m| !engine.is_resident(m)) {
        sink.progress(progress(Stage::LoadingModels, 0, 0));
    }
    let paths: Vec<_> = models.iter().map(|m| model_path(m)).collect();
    engine.make_room(&paths, &[], activations, 0)?;
    Ok(())
}

/// A progress event of the job's one image.
pub(crate) fn progress(stage: Stage, step: u32, total: u32) -> StepProgress {
    StepProgress {
        stage,
        step,
        total,
        image_index: 0,
        preview: None,
    }
}

/// The report of a job that used `models` as `kind`: their hashes, the stage timings,
/// the total and the device's peak memory.
pub(crate) fn report(
    engine: &mut Engine,
    clock: &mut StageClock,
    models: &[&ModelEntry],
    kind: ModelKind,
    admitted_at: Instant,
) -> JobReport {
    let mut report = JobReport {
        models: models
            .iter()
            .map(|model| ModelUsed {
                name: model.name.clone(),
                kind,
                sha256: engine.hashes().model(model),
                weight: 0.0,
            })
            .collect(),
        ..Default::default()
    };
    for (stage, elapsed) in clock.take_timings() {
        report.add_time(stage, elapsed);
    }
    report.total = admitted_at.elapsed();
    report.peak_device_memory_bytes =
        device::memory(engine.placement().device).map_or(0, |m| m.peak);
    report
}
