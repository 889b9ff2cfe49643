//! `sdxld.v1.GenerationService`: admission permit, validation, queueing, then the job's
//! events forwarded to the client until it completes, fails, is cancelled or the
//! deadline passes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::admission::AdmissionPermit;
use crate::api::status::ApiError;
use crate::api::validate::to_job_spec;
use crate::api::ApiState;
use crate::jobs::{Admitted, JobError, JobEvent, StopReason};
use crate::proto::v1 as pb;
use crate::proto::v1::generate_response::Event;
use crate::proto::v1::generation_service_server::GenerationService;

/// The generation service.
pub struct Generation {
    state: Arc<ApiState>,
}

impl Generation {
    /// A service over `state`.
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }

    fn retry_after(&self) -> Duration {
        Duration::from_millis(self.state.settings.jobs.retry_after_ms)
    }

    fn status(&self, method: &str, error: ApiError) -> Status {
        let status = error.into_status(self.retry_after());
        self.state.metrics.rpc_finished(method, status.code());
        status
    }

    /// Admission, validation and queueing: the accepted event and the job's events.
    fn start<T>(
        &self,
        mut request: Request<T>,
        spec: fn(T) -> Option<pb::GenerationSpec>,
    ) -> Result<(pb::JobAccepted, Admitted, Option<Instant>), ApiError> {
        let queue = &self.state.queue;
        if !queue.accepting() {
            return Err(JobError::ShuttingDown.into());
        }
        // The admission layer normally took the permit; direct callers take one here.
        let permit = match request
            .extensions_mut()
            .remove::<AdmissionPermit>()
            .and_then(|p| p.take())
        {
            Some(p) => p,
            None => queue.try_admit()?,
        };
        let deadline = grpc_timeout(request.metadata()).map(|d| Instant::now() + d);
        let spec = spec(request.into_inner());
        let job = to_job_spec(
            spec,
            &self.state.settings.limits,
            &self.state.registry,
            random_seed(),
        )?;
        let seeds: Vec<u64> = (0..job.params.num_images as u64)
            .map(|i| job.params.seed + i)
            .collect();
        let client_job_id = job.client_job_id.clone().unwrap_or_default();
        let admitted = queue.submit(job, permit, self.state.settings.jobs.stream_buffer)?;
        self.state.metrics.set_queue_depth(queue.depth());
        let accepted = pb::JobAccepted {
            job_id: admitted.id.clone(),
            client_job_id,
            queue_position: admitted.queue_position,
            seeds,
        };
        tracing::info!(job = %admitted.id, position = admitted.queue_position, "job accepted");
        Ok((accepted, admitted, deadline))
    }
}

/// The client's `grpc-timeout` header ("<digits><H|M|S|m|u|n>").
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A seed for requests that name none (below 2^53).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish() & crate::api::validate::MAX_SEED
}

/// What ended a forwarded job.
enum Ending {
    Completed,
    Failed(JobError),
}

/// Waits for the next job event, stopping the job when the deadline passes or the client
/// leaves (`closed`).
async fn next_event(
    admitted: &mut Admitted,
    deadline: Option<Instant>,
    closed: impl std::future::Future<Output = ()>,
    state: &ApiState,
) -> Option<JobEvent> {
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        event = admitted.events.recv() => event,
        () = sleep => {
            state.queue.cancel(&admitted.id, "", StopReason::DeadlineExceeded);
            admitted.control.stop(StopReason::DeadlineExceeded);
            Some(JobEvent::Failed(JobError::Stopped(StopReason::DeadlineExceeded)))
        }
        () = closed => {
            state.queue.cancel(&admitted.id, "", StopReason::ClientGone);
            admitted.control.stop(StopReason::ClientGone);
            None
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GenerationService for Generation {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let (accepted, mut admitted, deadline) = self
            .start(request, |r| r.spec)
            .map_err(|e| self.status("Generate", e))?;
        let (tx, rx) = mpsc::channel(self.state.settings.jobs.stream_buffer);
        let state = self.state.clone();
        let retry_after = self.retry_after();
        tokio::spawn(async move {
            let accepted = pb::GenerateResponse {
                event: Some(Event::Accepted(accepted)),
            };
            if tx.send(Ok(accepted)).await.is_err() {
                state.queue.cancel(&admitted.id, "", StopReason::ClientGone);
                return;
            }
            let ending = loop {
                let closed_tx = tx.clone();
                let Some(event) = next_event(
                    &mut admitted,
                    deadline,
                    async move { closed_tx.closed().await },
                    &state,
                )
                .await
                else {
                    break Ending::Failed(JobError::Stopped(StopReason::ClientGone));
                };
                let message = match event {
                    JobEvent::Progress(p) => Event::Progress(p),
                    JobEvent::Image(i) => Event::Image(i),
                    JobEvent::Completed(c) => {
                        let _ = tx
                            .send(Ok(pb::GenerateResponse {
                                event: Some(Event::Completed(c)),
                            }))
                            .await;
                        break Ending::Completed;
                    }
                    JobEvent::Failed(e) => break Ending::Failed(e),
                };
                if tx
                    .send(Ok(pb::GenerateResponse {
                        event: Some(message),
                    }))
                    .await
                    .is_err()
                {
                    state.queue.cancel(&admitted.id, "", StopReason::ClientGone);
                    admitted.control.stop(StopReason::ClientGone);
                    break Ending::Failed(JobError::Stopped(StopReason::ClientGone));
                }
            };
            match ending {
                Ending::Completed => state.metrics.rpc_finished("Generate", tonic::Code::Ok),
                Ending::Failed(e) => {
                    let status = ApiError::Job(e).into_status(retry_after);
                    state.metrics.rpc_finished("Generate", status.code());
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn generate_images(
        &self,
        request: Request<pb::GenerateImagesRequest>,
    ) -> Result<Response<pb::GenerateImagesResponse>, Status> {
        let (accepted, mut admitted, deadline) = self
            .start(request, |r| r.spec)
            .map_err(|e| self.status("GenerateImages", e))?;
        let mut response = pb::GenerateImagesResponse {
            accepted: Some(accepted),
            images: Vec::new(),
            completed: None,
        };
        // If the client leaves, tonic drops this future: the guard stops the job.
        let guard = StopOnDrop {
            state: self.state.clone(),
            id: admitted.id.clone(),
            control: admitted.control.clone(),
            armed: true,
        };
        let mut guard = guard;
        loop {
            let event =
                next_event(&mut admitted, deadline, std::future::pending(), &self.state).await;
            match event {
                Some(JobEvent::Progress(_)) => {}
                Some(JobEvent::Image(image)) => response.images.push(image),
                Some(JobEvent::Completed(completed)) => {
                    response.completed = Some(completed);
                    guard.armed = false;
                    self.state
                        .metrics
                        .rpc_finished("GenerateImages", tonic::Code::Ok);
                    return Ok(Response::new(response));
                }
                Some(JobEvent::Failed(e)) => {
                    guard.armed = false;
                    return Err(self.status("GenerateImages", ApiError::Job(e)));
                }
                None => {
                    guard.armed = false;
                    return Err(self.status(
                        "GenerateImages",
                        ApiError::Job(JobError::Stopped(StopReason::ClientGone)),
                    ));
                }
            }
        }
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let request = request.into_inner();
        if request.job_id.is_empty() && request.client_job_id.is_empty() {
            return Err(self.status(
                "CancelJob",
                ApiError::invalid("job_id", "one of `job_id` and `client_job_id` is required"),
            ));
        }
        let result = self.state.queue.cancel(
            &request.job_id,
            &request.client_job_id,
            StopReason::Cancelled,
        );
        self.state
            .metrics
            .rpc_finished("CancelJob", tonic::Code::Ok);
        let (job_id, cancelled) = result.unwrap_or((request.job_id, false));
        Ok(Response::new(pb::CancelJobResponse { job_id, cancelled }))
    }
}

/// Stops a unary job whose client went away.
struct StopOnDrop {
    state: Arc<ApiState>,
    id: String,
    control: Arc<crate::jobs::JobControl>,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.control.stop(StopReason::ClientGone);
            self.state
                .queue
                .cancel(&self.id, "", StopReason::ClientGone);
        }
    }
}
