//! The worker thread: owns the device, takes work from the queue in order, and runs each
//! job through the runner while a thread of the job's own delivers its events, so that
//! the worker goes on to the next job without waiting for any client.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::engine::device::release_freed_host_memory;
use crate::engine::error::EngineError;
use crate::engine::request::BatchMode;
use crate::jobs::emit::{Emit, Forwarder, ServerSink};
use crate::jobs::engine::Engine;
use crate::jobs::preprocess_job::run_preprocess;
use crate::jobs::runner::{run_job, RunOptions};
use crate::jobs::upscale_job::run_upscale;
use crate::jobs::{
    AdminOp, AdminRequest, Job, JobError, JobEvent, JobQueue, JobWork, Outcome, Work,
};
use crate::telemetry::Metrics;

/// Runs work until the queue is closed. Call on a dedicated OS thread. A client that
/// takes no event for `stall_timeout` has its job stopped.
pub fn run_worker(
    queue: Arc<JobQueue>,
    mut engine: Engine,
    metrics: Arc<Metrics>,
    stall_timeout: Duration,
) {
    metrics.set_cache(engine.stats());
    while let Some(work) = queue.next_work() {
        match work {
            Work::Admin(request) => admin(&mut engine, *request),
            Work::Job(job) => run_one(&mut engine, job, &queue, &metrics, stall_timeout),
        }
        metrics.set_cache(engine.stats());
    }
}

/// A load or unload, between jobs.
fn admin(engine: &mut Engine, request: AdminRequest) {
    let result = match request.op {
        AdminOp::Load => engine.load(&request.model).map(|()| true),
        AdminOp::Unload => Ok(engine.unload(&request.model)),
    };
    release_freed_host_memory();
    if let Err(e) = &result {
        tracing::warn!(model = %request.model.name, error = %e, "admin load failed");
    }
    let _ = request.reply.send(result);
}

/// Runs one job; its thread delivers the events and counts its end.
fn run_one(
    engine: &mut Engine,
    job: Box<Job>,
    queue: &Arc<JobQueue>,
    metrics: &Arc<Metrics>,
    stall_timeout: Duration,
) {
    // The job's span continues the trace of the request that submitted it.
    let span = tracing::info_span!(
        parent: &job.span,
        "job",
        otel.name = "sdxld.job",
        job.id = %job.id,
        model = %job.work.main_model().name,
        images = job.work.images(),
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let _entered = span.enter();
    let (tx, rx) = mpsc::channel();
    let forwarder = Forwarder {
        events: job.events.clone(),
        control: job.control.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        span: span.clone(),
        admitted_at: job.admitted_at,
        stall_timeout,
    };
    let started = std::thread::Builder::new()
        .name("sdxld-job".into())
        .spawn(move || forwarder.run(rx));
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the job's thread");
        let error = EngineError::Internal(format!("cannot start the job's thread: {e}"));
        let _ = job.events.try_send(JobEvent::Failed(error.into()));
        queue.finish(&job, Outcome::Failed("internal"));
        return;
    }
    let mut sink = ServerSink {
        emit: tx.clone(),
        control: job.control.clone(),
        events: job.events.clone(),
    };
    let options = RunOptions {
        batch: BatchMode::PerImage,
        keep_latents: false,
    };
    // A panic anywhere in the job (libtorch raises through panics) fails this job only.
    let result = EngineError::catch(|| {
        let admitted_at = job.admitted_at;
        Ok(match &job.work {
            JobWork::Generate(spec) => {
                run_job(engine, spec, options, &mut sink, metrics, admitted_at)
            }
            JobWork::Upscale(spec) => run_upscale(engine, spec, &mut sink, metrics, admitted_at),
            JobWork::Preprocess(spec) => {
                run_preprocess(engine, spec, &mut sink, metrics, admitted_at)
            }
        })
    })
    .unwrap_or_else(|e| Err(e.into()));
    if let Err(JobError::Engine(e)) = &result {
        tracing::warn!(job = %job.id, error = %e, "job failed");
        span.record("otel.status_description", e.to_string());
        span.record("otel.status_code", "ERROR");
    }
    drop(sink);
    let _ = tx.send(Emit::End(job, result));
    release_freed_host_memory();
}
