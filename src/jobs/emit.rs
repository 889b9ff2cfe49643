//! The server's side of a running job: a sink the runner reports to without ever
//! waiting, and a thread beside the engine thread that encodes images and previews and
//! forwards every event to the job's client in order, so that encoding one image
//! overlaps the denoising of the next.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::jobs::encode::{encode, encode_preview};
use crate::jobs::events::{
    FinishedImage, ImageEvent, JobEvent, JobReport, ProgressEvent, Stage, StepProgress,
};
use crate::jobs::runner::JobSink;
use crate::jobs::{JobControl, JobError, StopReason};
use crate::telemetry::Metrics;

/// What the runner hands the emitter thread, in order.
pub enum Emit {
    /// A progress event (its preview still raw).
    Progress(StepProgress),
    /// A finished image to encode.
    Image(FinishedImage),
    /// The job's report, after its last image.
    Completed(JobReport),
    /// Why the job ended early.
    Failed(JobError),
}

/// The sink of a server job: hands everything to the emitter thread.
pub struct ServerSink<'a> {
    /// To the emitter thread.
    pub emit: mpsc::Sender<Emit>,
    /// The job's stop flag.
    pub control: &'a JobControl,
    /// The client's channel, watched for the client leaving.
    pub events: &'a tokio::sync::mpsc::Sender<JobEvent>,
}

impl JobSink for ServerSink<'_> {
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
        // A closed channel means the emitter stopped forwarding: `stopped` says why.
        let _ = self.emit.send(Emit::Progress(progress));
    }

    fn image(&mut self, image: FinishedImage) {
        let _ = self.emit.send(Emit::Image(image));
    }
}

/// How forwarding ended.
pub enum Forwarded {
    /// Every event reached the client's channel.
    All,
    /// The client left.
    ClientGone,
    /// An image could not be encoded (the client was told): the error's type.
    Failed(&'static str),
}

/// The emitter thread's loop: encodes and forwards what `items` brings until the runner
/// is done, the client leaves or an image fails to encode. Encoding time is the
/// post-processing stage of the report.
pub fn forward(
    items: mpsc::Receiver<Emit>,
    events: &tokio::sync::mpsc::Sender<JobEvent>,
    control: &JobControl,
    admitted_at: Instant,
    metrics: &Metrics,
    span: &tracing::Span,
) -> Forwarded {
    let mut encoding = Duration::ZERO;
    for item in items {
        let event = match item {
            Emit::Progress(p) => JobEvent::Progress(ProgressEvent {
                stage: p.stage,
                step: p.step,
                total: p.total,
                image_index: p.image_index,
                preview: p.preview.as_ref().and_then(encode_preview),
            }),
            Emit::Image(image) => {
                let _span = tracing::info_span!(
                    parent: span,
                    "stage",
                    otel.name = "post_processing",
                    image = image.index,
                )
                .entered();
                let start = Instant::now();
                let encoded = encode(&image);
                let elapsed = start.elapsed();
                encoding += elapsed;
                metrics.observe_stage(Stage::PostProcessing.label(), elapsed);
                match encoded {
                    Ok(encoded) => JobEvent::Image(ImageEvent {
                        index: image.index,
                        seed: image.seed,
                        image: encoded,
                        ready_after: admitted_at.elapsed(),
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "an image could not be encoded");
                        // The runner stops at its next check; what it sends after is
                        // dropped with this thread's end.
                        control.stop(StopReason::ClientGone);
                        let error_type = e.error_type();
                        let _ = events.blocking_send(JobEvent::Failed(JobError::Engine(e)));
                        return Forwarded::Failed(error_type);
                    }
                }
            }
            Emit::Completed(mut report) => {
                report.add_time(Stage::PostProcessing, encoding);
                JobEvent::Completed(report)
            }
            Emit::Failed(error) => JobEvent::Failed(error),
        };
        if events.blocking_send(event).is_err() {
            control.stop(StopReason::ClientGone);
            return Forwarded::ClientGone;
        }
    }
    Forwarded::All
}
