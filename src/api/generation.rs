//! `sdxld.v1.GenerationService`: admission place, validation (on the blocking pool),
//! queueing, then the job's events, converted to the contract's messages, until it
//! completes, fails, is cancelled or its deadline passes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::admission::AdmissionPermit;
use crate::api::caller::caller;
use crate::api::convert;
use crate::api::guard::CallArrival;
use crate::api::status::ApiError;
use crate::api::validate::{to_job_spec, to_upscale_spec, Context, MAX_SEED};
use crate::api::ApiState;
use crate::jobs::queue::{Caller, Cancelled};
use crate::jobs::{Admitted, JobError, JobEvent, JobWork, StopReason};
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

    /// The stream of an admitted job's events, each as `wrap` makes it; the relay
    /// continues the RPC's span.
    fn stream<M: Send + 'static>(
        &self,
        (accepted, admitted, deadline): (pb::JobAccepted, Admitted, Option<Instant>),
        wrap: Wrap<M>,
    ) -> Response<Events<M>> {
        let (tx, rx) = mpsc::channel(self.state.settings.jobs.stream_buffer);
        let task = relay(admitted, accepted, deadline, tx, self.state.clone(), wrap);
        tokio::spawn(task.instrument(tracing::Span::current()));
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }

    fn status(&self, error: ApiError) -> Status {
        self.state.status(error)
    }

    /// Admission, validation (`convert`, on the blocking pool) and queueing: the accepted
    /// event and the job's events.
    async fn start<T: Send + 'static>(
        &self,
        mut request: Request<T>,
        convert: fn(T, &Context) -> Result<JobWork, ApiError>,
    ) -> Result<(pb::JobAccepted, Admitted, Option<Instant>), ApiError> {
        let queue = &self.state.queue;
        if !queue.accepting() {
            return Err(JobError::ShuttingDown.into());
        }
        // The admission layer normally took the place; direct callers take one here.
        let place = match request
            .extensions_mut()
            .remove::<AdmissionPermit>()
            .and_then(|p| p.take())
        {
            Some(p) => p,
            None => queue.try_admit()?,
        };
        // Counted from the call's arrival; a deadline too far to represent is no deadline.
        let arrival = request
            .extensions()
            .get::<CallArrival>()
            .map_or_else(Instant::now, |a| a.0);
        let deadline = grpc_timeout(request.metadata())?.and_then(|d| arrival.checked_add(d));
        let owner = caller(&request);
        let message = request.into_inner();
        let state = self.state.clone();
        let job = tokio::task::spawn_blocking(move || {
            let ctx = Context {
                limits: &state.settings.limits,
                registry: &state.registry,
                preprocessing: &state.settings.preprocessing,
                drawn_seed: random_seed(),
            };
            convert(message, &ctx)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("validation did not finish: {e}")))??;
        let (seeds, variation_seeds) = match &job {
            JobWork::Generate(spec) => image_seeds(&spec.params),
            JobWork::Upscale(_) | JobWork::Preprocess(_) => (Vec::new(), Vec::new()),
        };
        let client_job_id = job.client_job_id().cloned().unwrap_or_default();
        let client_job_id_field = match &job {
            JobWork::Generate(_) => "spec.client_job_id",
            JobWork::Upscale(_) | JobWork::Preprocess(_) => "client_job_id",
        };
        let buffer = self.state.settings.jobs.stream_buffer;
        let admitted = queue
            .submit(job, &owner, place, buffer)
            .map_err(|e| match e {
                JobError::DuplicateClientJobId(id) => ApiError::invalid(
                    client_job_id_field,
                    &format!("{id:?} is already in use by one of your jobs in flight"),
                ),
                other => other.into(),
            })?;
        let accepted = pb::JobAccepted {
            job_id: admitted.id.clone(),
            client_job_id,
            queue_position: admitted.queue_position,
            seeds,
            variation_seeds,
        };
        tracing::info!(job = %admitted.id, position = admitted.queue_position, "job accepted");
        Ok((accepted, admitted, deadline))
    }
}

/// Each image's seed and, where the request varies its noise, its variation seed.
fn image_seeds(params: &crate::engine::request::GenerateParams) -> (Vec<u64>, Vec<u64>) {
    let images = 0..params.num_images as u64;
    let seeds = images.clone().map(|i| params.seed + i).collect();
    let variation_seeds = match params.variation {
        Some(variation) => images.map(|i| variation.nth(i).seed).collect(),
        None => Vec::new(),
    };
    (seeds, variation_seeds)
}

impl Generation {
    /// Every event of an admitted job gathered for a unary answer: its images, control
    /// maps and completed event, or its error as a status.
    async fn collect(
        &self,
        (_, mut admitted, deadline): (pb::JobAccepted, Admitted, Option<Instant>),
    ) -> Result<Collected, Status> {
        let mut collected = Collected::default();
        // If the client leaves, tonic drops this future: the guard stops the job.
        let mut guard = StopOnDrop {
            state: self.state.clone(),
            id: admitted.id.clone(),
            control: admitted.control.clone(),
            deadline,
            armed: true,
        };
        loop {
            let event =
                next_event(&mut admitted, deadline, std::future::pending(), &self.state).await;
            let error = match event {
                Some(JobEvent::Progress(_)) => continue,
                Some(JobEvent::Image(image)) => {
                    collected.images.push(convert::image(image));
                    continue;
                }
                Some(JobEvent::ControlMap(map)) => {
                    collected.control_maps.push(convert::control_map(map));
                    continue;
                }
                Some(JobEvent::Completed(report)) => {
                    guard.armed = false;
                    collected.poses = report.detected_poses.as_ref().map(convert::poses);
                    collected.completed = convert::completed(&admitted.id, report);
                    return Ok(collected);
                }
                Some(JobEvent::Failed(e)) => e,
                None => JobError::Stopped(StopReason::ClientGone),
            };
            guard.armed = false;
            return Err(self.status(ApiError::Job(error)));
        }
    }
}

/// A unary job's images, control maps, completed event and the poses it found.
#[derive(Default)]
struct Collected {
    images: Vec<pb::GeneratedImage>,
    control_maps: Vec<pb::ControlMapImage>,
    completed: pb::JobCompleted,
    poses: Option<pb::Poses>,
}

/// A generation request's job.
fn generation(spec: Option<pb::GenerationSpec>, ctx: &Context) -> Result<JobWork, ApiError> {
    Ok(JobWork::Generate(Box::new(to_job_spec(spec, ctx)?)))
}

/// An upscale request's job.
fn upscale_job(request: pb::UpscaleRequest, ctx: &Context) -> Result<JobWork, ApiError> {
    Ok(JobWork::Upscale(Box::new(to_upscale_spec(request, ctx)?)))
}

/// The client's `grpc-timeout` header as the gRPC spec defines it: one to eight digits
/// and a unit (`H`, `M`, `S`, `m`, `u`, `n`). A malformed one is INVALID_ARGUMENT.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::invalid(
            "grpc-timeout",
            "`grpc-timeout` must be 1 to 8 digits and a unit (H, M, S, m, u or n)",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let Some(unit) = value.chars().last() else {
        return Err(malformed());
    };
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let n: u64 = digits.parse().map_err(|_| malformed())?;
    Ok(Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return Err(malformed()),
    }))
}

/// A seed for requests that name none (below 2^53).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish() & MAX_SEED
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
            stop(admitted, state, StopReason::DeadlineExceeded);
            Some(JobEvent::Failed(JobError::Stopped(StopReason::DeadlineExceeded)))
        }
        () = closed => {
            stop(admitted, state, departure(deadline));
            None
        }
    }
}

/// gRPC clients give up at their own deadline, which passes a transit time before the
/// server's: a client leaving this close to its deadline left because of it.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// Why the job of a client that left stops: its deadline, or the client itself.
fn departure(deadline: Option<Instant>) -> StopReason {
    match deadline {
        Some(d) if Instant::now() + DEADLINE_SLACK >= d => StopReason::DeadlineExceeded,
        _ => StopReason::ClientGone,
    }
}

fn stop(admitted: &Admitted, state: &ApiState, reason: StopReason) {
    state.queue.cancel(&admitted.id, "", reason, Caller::Server);
    admitted.control.stop(reason);
}

/// A stream of a job's events as messages `M`.
type Events<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;
type EventStream = Events<pb::GenerateResponse>;

/// A stream's message of each job event (`None`: the stream has no such event).
type Wrap<M> = fn(Event) -> Option<M>;

fn generate_message(event: Event) -> Option<pb::GenerateResponse> {
    Some(pb::GenerateResponse { event: Some(event) })
}

fn upscale_message(event: Event) -> Option<pb::UpscaleResponse> {
    use pb::upscale_response::Event as Up;
    let event = match event {
        Event::Accepted(a) => Up::Accepted(a),
        Event::Progress(p) => Up::Progress(p),
        Event::Image(i) => Up::Image(i),
        Event::Completed(c) => Up::Completed(c),
        Event::ControlMap(_) => return None,
    };
    Some(pb::UpscaleResponse { event: Some(event) })
}

/// Forwards a job's events to a streaming client, each as `wrap` makes it, until the job
/// ends or the client leaves.
async fn relay<M: Send + 'static>(
    mut admitted: Admitted,
    accepted: pb::JobAccepted,
    deadline: Option<Instant>,
    tx: mpsc::Sender<Result<M, Status>>,
    state: Arc<ApiState>,
    wrap: Wrap<M>,
) {
    let send = |event| wrap(event).map(Ok);
    if let Some(message) = send(Event::Accepted(accepted)) {
        if tx.send(message).await.is_err() {
            stop(&admitted, &state, departure(deadline));
            return;
        }
    }
    loop {
        let closed_tx = tx.clone();
        let closed = async move { closed_tx.closed().await };
        let event = match next_event(&mut admitted, deadline, closed, &state).await {
            Some(JobEvent::Progress(p)) => Event::Progress(convert::progress(p)),
            Some(JobEvent::Image(i)) => Event::Image(convert::image(i)),
            Some(JobEvent::ControlMap(c)) => Event::ControlMap(convert::control_map(c)),
            Some(JobEvent::Completed(report)) => {
                let completed = convert::completed(&admitted.id, report);
                if let Some(message) = send(Event::Completed(completed)) {
                    let _ = tx.send(message).await;
                }
                return;
            }
            Some(JobEvent::Failed(e)) => {
                let _ = tx.send(Err(state.status(ApiError::Job(e)))).await;
                return;
            }
            None => return,
        };
        let Some(message) = send(event) else {
            continue;
        };
        if tx.send(message).await.is_err() {
            stop(&admitted, &state, departure(deadline));
            return;
        }
    }
}

#[tonic::async_trait]
impl GenerationService for Generation {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let started = self
            .start(request, |r, ctx| generation(r.spec, ctx))
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.stream(started, generate_message))
    }

    type UpscaleStream = Events<pb::UpscaleResponse>;

    async fn upscale(
        &self,
        request: Request<pb::UpscaleRequest>,
    ) -> Result<Response<Self::UpscaleStream>, Status> {
        let started = self
            .start(request, upscale_job)
            .await
            .map_err(|e| self.status(e))?;
        Ok(self.stream(started, upscale_message))
    }

    async fn generate_images(
        &self,
        request: Request<pb::GenerateImagesRequest>,
    ) -> Result<Response<pb::GenerateImagesResponse>, Status> {
        let started = self
            .start(request, |r, ctx| generation(r.spec, ctx))
            .await
            .map_err(|e| self.status(e))?;
        let accepted = started.0.clone();
        let collected = self.collect(started).await?;
        Ok(Response::new(pb::GenerateImagesResponse {
            accepted: Some(accepted),
            images: collected.images,
            completed: Some(collected.completed),
            control_maps: collected.control_maps,
        }))
    }

    async fn preprocess(
        &self,
        request: Request<pb::PreprocessRequest>,
    ) -> Result<Response<pb::PreprocessResponse>, Status> {
        use crate::api::preprocess;
        if !preprocess::runs_network(request.get_ref()) {
            return preprocess::preprocess(self.state.clone(), request.into_inner())
                .await
                .map(Response::new)
                .map_err(|e| self.status(e));
        }
        let started = self
            .start(request, preprocess::preprocess_job)
            .await
            .map_err(|e| self.status(e))?;
        let collected = self.collect(started).await?;
        let map = collected.images.into_iter().next().ok_or_else(|| {
            self.status(ApiError::Internal("a preprocessing without its map".into()))
        })?;
        Ok(Response::new(pb::PreprocessResponse {
            control_map: map.data,
            width: map.width,
            height: map.height,
            poses: collected.poses,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let owner = caller(&request);
        let request = request.into_inner();
        if request.job_id.is_empty() && request.client_job_id.is_empty() {
            return Err(self.status(ApiError::invalid(
                "job_id",
                "one of `job_id` and `client_job_id` is required",
            )));
        }
        let found = self.state.queue.cancel(
            &request.job_id,
            &request.client_job_id,
            StopReason::Cancelled,
            Caller::Client(&owner),
        );
        let (job_id, cancelled) = match found {
            Cancelled::Stopped(id) => (id, true),
            Cancelled::Finished(id) => (id, false),
            Cancelled::Unknown => {
                let id = if request.job_id.is_empty() {
                    request.client_job_id
                } else {
                    request.job_id
                };
                return Err(self.status(ApiError::JobNotFound(id)));
            }
        };
        Ok(Response::new(pb::CancelJobResponse { job_id, cancelled }))
    }
}

/// Stops a unary job whose client went away.
struct StopOnDrop {
    state: Arc<ApiState>,
    id: String,
    control: Arc<crate::jobs::JobControl>,
    deadline: Option<Instant>,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let reason = departure(self.deadline);
            self.control.stop(reason);
            self.state
                .queue
                .cancel(&self.id, "", reason, Caller::Server);
        }
    }
}
