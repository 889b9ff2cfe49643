//! A preprocessing job (the Preprocess RPC for a preprocessor that runs a network): the
//! detector loaded into the cache, the client's image through it, the control map handed
//! out as a PNG, with the progress, stop checks, timings and report of every job.

use std::time::Instant;

use crate::engine::preprocess::pose::DetectedPeople;
use crate::engine::preprocess::ControlMap;
use crate::engine::registry::ModelKind;
use crate::jobs::clock::StageClock;
use crate::jobs::detectors::NetworkFiles;
use crate::jobs::engine::Engine;
use crate::jobs::events::{FinishedImage, ImageContent, JobReport, RgbImage, Stage};
use crate::jobs::interrupt::interruptible;
use crate::jobs::runner::JobSink;
use crate::jobs::single::{make_room, progress, report, stop_check};
use crate::jobs::{JobError, PreprocessSpec};
use crate::output::OutputFormat;
use crate::telemetry::Metrics;

/// Runs the preprocessing job `spec`: its report, or why it did not complete.
pub fn run_preprocess(
    engine: &mut Engine,
    spec: &PreprocessSpec,
    sink: &mut dyn JobSink,
    metrics: &Metrics,
    admitted_at: Instant,
) -> Result<JobReport, JobError> {
    let mut clock = StageClock::starting_at(Stage::Queued, admitted_at);
    stop_check(sink)?;
    clock.enter(Stage::LoadingModels, metrics);
    let image = &spec.image.0;
    let files = NetworkFiles::of_job(spec);
    let activations =
        files.activations(engine, spec.preprocessing, (image.width(), image.height()));
    let models: Vec<_> = files.files().map(|file| &file.model).collect();
    make_room(engine, sink, &models, activations)?;
    let networks = files.load(engine)?;
    metrics.set_cache(engine.stats());
    stop_check(sink)?;
    clock.enter(Stage::Preprocessing, metrics);
    let map = {
        let _span = tracing::info_span!("stage", otel.name = "preprocessing", units = 1).entered();
        sink.progress(progress(Stage::Preprocessing, 0, 1));
        let map = interruptible(sink, |between_passes| {
            let networks = networks.networks();
            spec.preprocessing
                .control_map(&spec.image.0, networks, between_passes)
        })?;
        sink.progress(progress(Stage::Preprocessing, 1, 1));
        map
    };
    let ControlMap { map, people } = map;
    let (width, height) = map.dimensions();
    sink.image(FinishedImage {
        index: 0,
        seed: 0,
        variation_seed: None,
        width,
        height,
        content: ImageContent::Rgb(RgbImage::from(map)),
        format: OutputFormat::Png,
        quality: 100,
        metadata: None,
        latents: None,
    });
    clock.close(metrics);
    let mut report = report(
        engine,
        &mut clock,
        &models,
        ModelKind::Preprocessor,
        admitted_at,
    );
    report.detected_poses = people.as_ref().map(DetectedPeople::poses);
    Ok(report)
}
