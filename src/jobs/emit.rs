//! The server's side of a running job: a sink the runner reports to without ever
//! waiting, and a thread of the job's own that encodes images and previews and forwards
//! every event to the job's client in order, so that encoding one image overlaps the
//! denoising of the next and no client, however slow, holds the engine thread.
//!
//! What waits for a slow client is bounded: progress events coalesce (the latest waits
//! in place of the one before), images and the final event wait in order (at most the
//! request's images). A client that takes nothing for the stall timeout has its job
//! stopped and counted as dropped. The job's end is counted when its last event is
//! delivered (or given up), and only then is its admission place freed.

use std::collections::VecDeque;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;

use crate::engine::error::EngineError;
use crate::jobs::encode::{encode, encode_preview};
use crate::jobs::events::{
    ControlMapEvent, FinishedImage, ImageEvent, JobEvent, JobReport, ProgressEvent, RgbImage,
    Stage, StepProgress,
};
use crate::jobs::runner::JobSink;
use crate::jobs::{Job, JobControl, JobError, JobQueue, Outcome, StopReason};
use crate::telemetry::Metrics;

/// How often a thread with events its client has not taken looks again.
const POLL: Duration = Duration::from_millis(5);

/// What the runner hands the job's thread, in order.
pub enum Emit {
    /// A progress event (its preview still raw).
    Progress(StepProgress),
    /// A finished image to encode.
    Image(FinishedImage),
    /// A ControlNet unit's control map to encode: unit, condition, map.
    ControlMap(u32, u32, RgbImage),
    /// The job itself with how its run ended, after its last image.
    End(Box<Job>, Result<JobReport, JobError>),
}

/// The sink of a server job: hands everything to the job's thread.
pub struct ServerSink {
    /// To the job's thread.
    pub emit: mpsc::Sender<Emit>,
    /// The job's stop flag (its thread raises it for a stalled client).
    pub control: Arc<JobControl>,
    /// The client's channel, watched for the client leaving.
    pub events: tokio::sync::mpsc::Sender<JobEvent>,
}

impl JobSink for ServerSink {
    fn stopped(&mut self) -> Option<StopReason> {
        if let Some(reason) = self.control.stopped() {
            return Some(reason);
        }
        if self.events.is_closed() {
            self.control.stop(StopReason::ClientGone);
            return Some(StopReason::ClientGone);
        }
        None
    }

    fn progress(&mut self, progress: StepProgress) {
        // A closed channel means the job's thread gave up its client: `stopped` says why.
        let _ = self.emit.send(Emit::Progress(progress));
    }

    fn image(&mut self, image: FinishedImage) {
        let _ = self.emit.send(Emit::Image(image));
    }

    fn control_map(&mut self, unit_index: u32, condition_index: u32, map: RgbImage) {
        let _ = self
            .emit
            .send(Emit::ControlMap(unit_index, condition_index, map));
    }
}

/// The job's thread: what it needs from the server.
pub struct Forwarder {
    /// The client's channel.
    pub events: tokio::sync::mpsc::Sender<JobEvent>,
    /// The job's stop flag.
    pub control: Arc<JobControl>,
    /// Where the job's end is counted.
    pub queue: Arc<JobQueue>,
    /// Stage timings.
    pub metrics: Arc<Metrics>,
    /// The job's span (parent of the encoding spans).
    pub span: tracing::Span,
    /// When the job was admitted.
    pub admitted_at: Instant,
    /// How long a client may take nothing before its job is stopped.
    pub stall_timeout: Duration,
}

/// The events waiting for the client, in order.
#[derive(Default)]
struct Backlog {
    events: VecDeque<JobEvent>,
    /// Time spent encoding (the post-processing stage).
    encoding: Duration,
    /// The job, once its run ended, and how it ended.
    end: Option<(Box<Job>, Outcome)>,
    /// A failure is queued: nothing after it reaches the client.
    failed: bool,
}

impl Backlog {
    /// Queues `event`; a progress event replaces one the client has not taken yet.
    fn push(&mut self, event: JobEvent) {
        if self.failed {
            return;
        }
        self.failed = matches!(event, JobEvent::Failed(_));
        if matches!(event, JobEvent::Progress(_))
            && matches!(self.events.back(), Some(JobEvent::Progress(_)))
        {
            self.events.pop_back();
        }
        self.events.push_back(event);
    }
}

impl Forwarder {
    /// Forwards what `items` brings until the job's last event reached its client (or
    /// the client left or stalled), then counts the job's end.
    pub fn run(self, items: mpsc::Receiver<Emit>) {
        let mut backlog = Backlog::default();
        let mut open = true;
        let mut last_taken = Instant::now();
        let gone = loop {
            // One item at a time, each offered to the client at once: progress coalesces
            // only while the client takes nothing.
            if open {
                open = self.take(&items, &mut backlog);
            }
            match self.deliver(&mut backlog) {
                Delivery::Gone => break Some(StopReason::ClientGone),
                Delivery::Some => last_taken = Instant::now(),
                Delivery::None if backlog.events.is_empty() => last_taken = Instant::now(),
                Delivery::None if last_taken.elapsed() > self.stall_timeout => {
                    tracing::warn!(parent: &self.span, "the client took no event for the stall timeout: stopping its job");
                    break Some(StopReason::ClientGone);
                }
                Delivery::None => {}
            }
            if !open && backlog.events.is_empty() {
                break None;
            }
            if !open {
                std::thread::sleep(POLL);
            }
        };
        if gone.is_some() {
            self.control.stop(StopReason::ClientGone);
            // The run stops at its next step; its end still comes through `items`.
            while open {
                open = self.take(&items, &mut backlog);
            }
        }
        if let Some((job, outcome)) = backlog.end.take() {
            let outcome = match (gone, outcome) {
                (Some(reason), Outcome::Completed) => Outcome::Stopped(reason),
                (_, outcome) => outcome,
            };
            self.queue.finish(&job, outcome);
        }
    }

    /// Takes one item the runner sent (waiting for it when there is nothing to deliver,
    /// a moment otherwise); false once the runner is done.
    fn take(&self, items: &mpsc::Receiver<Emit>, backlog: &mut Backlog) -> bool {
        let item = if backlog.events.is_empty() {
            items.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            items.recv_timeout(POLL)
        };
        match item {
            Ok(item) => {
                self.accept(item, backlog);
                true
            }
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Encodes what needs it and queues it.
    fn accept(&self, item: Emit, backlog: &mut Backlog) {
        let event = match item {
            Emit::Progress(p) => JobEvent::Progress(ProgressEvent {
                stage: p.stage,
                step: p.step,
                total: p.total,
                image_index: p.image_index,
                preview: p.preview.as_ref().and_then(encode_preview),
            }),
            Emit::ControlMap(unit_index, condition_index, map) => match encode_preview(&map) {
                Some(image) => JobEvent::ControlMap(ControlMapEvent {
                    unit_index,
                    condition_index,
                    image,
                }),
                None => {
                    tracing::warn!(parent: &self.span, "a control map could not be encoded");
                    self.control.stop(StopReason::Cancelled);
                    JobEvent::Failed(JobError::Engine(EngineError::Internal(
                        "a control map could not be encoded".into(),
                    )))
                }
            },
            Emit::Image(image) => match self.encode(&image, backlog) {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(parent: &self.span, error = %e, "an image could not be encoded");
                    // The run stops at its next step; its own ending is not delivered.
                    self.control.stop(StopReason::Cancelled);
                    JobEvent::Failed(e)
                }
            },
            Emit::End(job, result) => {
                let (outcome, event) = match result {
                    Ok(mut report) => {
                        report.add_time(Stage::PostProcessing, backlog.encoding);
                        (Outcome::Completed, JobEvent::Completed(report))
                    }
                    Err(e @ JobError::Stopped(reason)) => {
                        (Outcome::Stopped(reason), JobEvent::Failed(e))
                    }
                    Err(e) => (Outcome::Failed(e.error_type()), JobEvent::Failed(e)),
                };
                let outcome = if backlog.failed {
                    Outcome::Failed("encoding")
                } else {
                    backlog.push(event);
                    outcome
                };
                backlog.end = Some((job, outcome));
                return;
            }
        };
        backlog.push(event);
    }

    fn encode(&self, image: &FinishedImage, backlog: &mut Backlog) -> Result<JobEvent, JobError> {
        let _span = tracing::info_span!(
            parent: &self.span,
            "stage",
            otel.name = "post_processing",
            image = image.index,
        )
        .entered();
        let start = Instant::now();
        let encoded = encode(image);
        let elapsed = start.elapsed();
        backlog.encoding += elapsed;
        self.metrics
            .observe_stage(Stage::PostProcessing.label(), elapsed);
        Ok(JobEvent::Image(ImageEvent {
            index: image.index,
            seed: image.seed,
            variation_seed: image.variation_seed,
            image: encoded?,
            ready_after: self.admitted_at.elapsed(),
        }))
    }

    /// Hands the client what its channel has room for, in order; after a failure,
    /// nothing more. The job's end is counted (its place, ids and gauges freed) once its
    /// last event has room and before it is sent, so that whatever the client asks after
    /// seeing the end (the metrics, the same client job id) finds the job gone.
    fn deliver(&self, backlog: &mut Backlog) -> Delivery {
        let mut delivered = Delivery::None;
        while let Some(event) = backlog.events.pop_front() {
            let last = matches!(event, JobEvent::Failed(_));
            let permit = match self.events.try_reserve() {
                Ok(permit) => permit,
                Err(TrySendError::Full(())) => {
                    backlog.events.push_front(event);
                    break;
                }
                Err(TrySendError::Closed(())) => return Delivery::Gone,
            };
            if last || backlog.events.is_empty() {
                if let Some((job, outcome)) = backlog.end.take() {
                    self.queue.finish(&job, outcome);
                    drop(job);
                }
            }
            permit.send(event);
            delivered = Delivery::Some;
            if last {
                backlog.events.clear();
            }
        }
        delivered
    }
}

/// What one delivery round did.
enum Delivery {
    /// The client took nothing (its channel is full, or there was nothing).
    None,
    /// The client took events.
    Some,
    /// The client left.
    Gone,
}
