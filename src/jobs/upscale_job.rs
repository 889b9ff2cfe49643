//! An upscale job (the Upscale RPC): the upscaler loaded into the cache, the client's
//! image through it tile by tile, then handed out for encoding, with the same progress,
//! stop checks, timings and report as a generation.

use std::time::Instant;

use crate::engine::preprocess::hwc3;
use crate::engine::registry::ModelKind;
use crate::jobs::clock::StageClock;
use crate::jobs::engine::Engine;
use crate::jobs::events::{FinishedImage, ImageContent, JobReport, RgbImage, Stage};
use crate::jobs::postprocess::{upscale_image, Target};
use crate::jobs::runner::JobSink;
use crate::jobs::single::{load, report, stop_check};
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
    // The upscaler's tiles are sized to the budget as it runs.
    let upscaler = load(engine, sink, (&spec.step.model, 0), Engine::upscaler)?;
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
            seed: spec.seed,
        };
        let output = upscale_image(engine, target, &upscaler, &spec.step, &input)?;
        RgbImage::from(output)
    };
    metrics.image_produced();
    sink.image(finished(spec, image, upscaler.draws_noise()));
    clock.close(metrics);
    Ok(report(
        engine,
        &mut clock,
        &[&spec.step.model],
        ModelKind::Upscaler,
        admitted_at,
    ))
}

/// The upscaled image as the sink encodes it, with A1111's extras parameters; the seed
/// where the upscaler `drew_noise`.
fn finished(spec: &UpscaleSpec, image: RgbImage, drew_noise: bool) -> FinishedImage {
    let seed = if drew_noise { spec.seed } else { 0 };
    let metadata =
        (spec.output.format == OutputFormat::Png && spec.output.embed_metadata).then(|| {
            let seed_entry = match drew_noise {
                true => format!("Seed: {seed}, "),
                false => String::new(),
            };
            PngMetadata {
                parameters: format!(
                    "Postprocess upscale by: {}, Postprocess upscaler: {}, {seed_entry}Version: sdxld {}",
                    spec.step.factor,
                    spec.step.model.name,
                    env!("CARGO_PKG_VERSION")
                ),
                request_json: String::new(),
            }
        });
    FinishedImage {
        index: 0,
        seed,
        variation_seed: None,
        width: image.width,
        height: image.height,
        content: ImageContent::Rgb(image),
        format: spec.output.format,
        quality: spec.output.quality,
        metadata,
        latents: None,
    }
}
