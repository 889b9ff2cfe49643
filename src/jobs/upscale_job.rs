//! An upscale job (the Upscale RPC): the upscaler loaded into the cache, the client's
//! image through it tile by tile, then handed out for encoding, with the same progress,
//! stop checks, timings and report as a generation.

use std::rc::Rc;
use std::time::Instant;

use crate::engine::device;
use crate::engine::preprocess::hwc3;
use crate::engine::registry::{ModelEntry, ModelKind};
use crate::engine::upscale::Upscaler;
use crate::jobs::clock::StageClock;
use crate::jobs::engine::{model_path, Engine};
use crate::jobs::events::{
    FinishedImage, ImageContent, JobReport, ModelUsed, RgbImage, Stage, StepProgress,
};
use crate::jobs::postprocess::{upscale_image, Target};
use crate::jobs::runner::JobSink;
use crate::jobs::{JobError, UpscaleSpec};
use crate::output::{OutputFormat, PngMetadata};
use crate::telemetry::Metrics;

/// Runs the upscale job `spec`: its report, or why it did not complete.
pub fn run_upscale(
    engine: &mut Engine,
    spec: &UpscaleSpec,
    sink: &mut dyn JobSink,
    metrics: &Metrics,
    admitted_at: Instant,
) -> Result<JobReport, JobError> {
    let mut clock = StageClock::starting_at(Stage::Queued, admitted_at);
    stop_check(sink)?;
    clock.enter(Stage::LoadingModels, metrics);
    device::reset_peak(engine.placement().device);
    let upscaler = load(engine, sink, &spec.step.model)?;
    metrics.set_cache(engine.stats());
    stop_check(sink)?;
    clock.enter(Stage::PostProcessing, metrics);
    let image = {
        let _span =
            tracing::info_span!("stage", otel.name = "post_processing", image = 0).entered();
        let input = hwc3(&spec.image.0);
        let keep = [spec.step.model.path.clone()];
        let target = Target {
            sink: &mut *sink,
            stage: Stage::PostProcessing,
            index: 0,
            keep: &keep,
        };
        let output = upscale_image(engine, target, &upscaler, &spec.step, &input)?;
        let (width, height) = output.dimensions();
        RgbImage {
            width,
            height,
            pixels: output.into_raw(),
        }
    };
    metrics.image_produced();
    sink.image(finished(spec, image));
    clock.close(metrics);
    let model = &spec.step.model;
    let mut report = JobReport {
        models: vec![ModelUsed {
            name: model.name.clone(),
            kind: ModelKind::Upscaler,
            sha256: engine.hashes().model(model),
            weight: 0.0,
        }],
        ..Default::default()
    };
    for (stage, elapsed) in clock.take_timings() {
        report.add_time(stage, elapsed);
    }
    report.total = admitted_at.elapsed();
    report.peak_device_memory_bytes =
        device::memory(engine.placement().device).map_or(0, |m| m.peak);
    Ok(report)
}

/// Stops the job if its sink says so.
fn stop_check(sink: &mut dyn JobSink) -> Result<(), JobError> {
    sink.stopped().map_or(Ok(()), |r| Err(JobError::Stopped(r)))
}

/// The upscaler in the cache, room made for it within the budget.
fn load(
    engine: &mut Engine,
    sink: &mut dyn JobSink,
    model: &ModelEntry,
) -> Result<Rc<Upscaler>, JobError> {
    let _span =
        tracing::info_span!("stage", otel.name = "loading_models", model = %model.name).entered();
    if !engine.is_resident(model) {
        sink.progress(progress(Stage::LoadingModels, 0, 0));
    }
    engine.make_room(&[model_path(model)], &Default::default(), 0)?;
    Ok(engine.upscaler(model)?)
}

/// The upscaled image as the sink encodes it, with A1111's extras parameters.
fn finished(spec: &UpscaleSpec, image: RgbImage) -> FinishedImage {
    let metadata =
        (spec.output.format == OutputFormat::Png && spec.output.embed_metadata).then(|| {
            PngMetadata {
                parameters: format!(
                    "Postprocess upscale by: {}, Postprocess upscaler: {}, Version: sdxld {}",
                    spec.step.factor,
                    spec.step.model.name,
                    env!("CARGO_PKG_VERSION")
                ),
                request_json: String::new(),
            }
        });
    FinishedImage {
        index: 0,
        seed: 0,
        width: image.width,
        height: image.height,
        content: ImageContent::Rgb(image),
        format: spec.output.format,
        quality: spec.output.quality,
        metadata,
        latents: None,
    }
}

fn progress(stage: Stage, step: u32, total: u32) -> StepProgress {
    StepProgress {
        stage,
        step,
        total,
        image_index: 0,
        preview: None,
    }
}
