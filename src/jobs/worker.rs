//! The worker thread: owns the device, takes work from the queue in order, and runs each
//! job through the runner with the emitter thread beside it.

use std::sync::{mpsc, Arc};

use crate::engine::error::EngineError;
use crate::engine::request::BatchMode;
use crate::jobs::emit::{forward, Emit, Forwarded, ServerSink};
use crate::jobs::engine::Engine;
use crate::jobs::runner::{run_job, RunOptions};
use crate::jobs::{AdminOp, AdminRequest, Job, JobError, JobQueue, Outcome, Work};
use crate::telemetry::Metrics;

/// Runs work until the queue is closed. Call on a dedicated OS thread.
pub fn run_worker(queue: Arc<JobQueue>, mut engine: Engine, metrics: Arc<Metrics>) {
    metrics.set_cache(engine.stats());
    while let Some(work) = queue.next_work() {
        match work {
            Work::Admin(request) => admin(&mut engine, request),
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
        model = %job.spec.model.name,
        images = job.spec.params.num_images,
    );
    let _entered = span.enter();
    let (ended, forwarded) = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let emitter = std::thread::Builder::new()
            .name("sdxld-emit".into())
            .spawn_scoped(scope, || {
                forward(
                    rx,
                    &job.events,
                    &job.control,
                    job.admitted_at,
                    metrics,
                    &span,
                )
            });
        let emitter = match emitter {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the emitter thread");
                return ((Outcome::Failed, Some("internal")), Forwarded::All);
            }
        };
        let mut sink = ServerSink {
            emit: tx.clone(),
            control: &job.control,
            events: &job.events,
        };
        let options = RunOptions {
            batch: BatchMode::PerImage,
            keep_latents: false,
        };
        // A panic anywhere in the job (libtorch raises through panics) fails this job only.
        let result = EngineError::catch(|| {
            let admitted_at = job.admitted_at;
            Ok(run_job(
                engine,
                &job.spec,
                options,
                &mut sink,
                metrics,
                admitted_at,
            ))
        })
        .unwrap_or_else(|e| Err(e.into()));
        let ended = ending(&result);
        if let Err(JobError::Engine(e)) = &result {
            tracing::warn!(job = %job.id, error = %e, "job failed");
        }
        let _ = tx.send(match result {
            Ok(report) => Emit::Completed(report),
            Err(e) => Emit::Failed(e),
        });
        drop((tx, sink));
        let forwarded = emitter.join().unwrap_or(Forwarded::Failed("internal"));
        (ended, forwarded)
    });
    let (outcome, reason) = match forwarded {
        Forwarded::Failed(reason) => (Outcome::Failed, Some(reason)),
        Forwarded::ClientGone if ended.0 == Outcome::Completed => {
            (Outcome::Stopped, Some("client_gone"))
        }
        _ => ended,
    };
    if let Some(reason) = reason {
        metrics.job_failed(reason);
    }
    outcome
}

/// How a job's run ended, and the reason a failed or stopped one is counted under.
fn ending<T>(result: &Result<T, JobError>) -> (Outcome, Option<&'static str>) {
    match result {
        Ok(_) => (Outcome::Completed, None),
        Err(e @ JobError::Stopped(_)) => (Outcome::Stopped, Some(e.error_type())),
        Err(e) => (Outcome::Failed, Some(e.error_type())),
    }
}
