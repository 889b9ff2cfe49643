//! Jobs: global admission, a bounded FIFO queue, cancellation, deadlines and the events a
//! job sends back. One worker thread ([`worker`]) owns the engine and runs jobs in order.

pub mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::engine::error::EngineError;
use crate::engine::pipeline::GenerateParams;
use crate::engine::registry::ModelEntry;
use crate::output::OutputFormat;
use crate::proto::v1 as pb;

/// Pipeline stages, as events report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Waiting in the queue.
    Queued,
    /// Loading models.
    LoadingModels,
    /// Text encoders.
    EncodingPrompt,
    /// Base denoising.
    Denoising,
    /// Refiner denoising.
    Refining,
    /// VAE decoding.
    Decoding,
    /// Post-processing (encoding the outputs).
    PostProcessing,
}

impl Stage {
    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::LoadingModels => "loading_models",
            Stage::Refining => "refining",
            Stage::EncodingPrompt => "encoding_prompt",
            Stage::Denoising => "denoising",
            Stage::Decoding => "decoding",
            Stage::PostProcessing => "post_processing",
        }
    }
}

/// Why a job stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Cancelled by the cancel RPC.
    Cancelled = 1,
    /// The client's deadline passed.
    DeadlineExceeded = 2,
    /// The client dropped its stream.
    ClientGone = 3,
    /// The server is shutting down and the grace period ended.
    ShuttingDown = 4,
}

/// Shared between a job's producer, its consumer and the cancel RPC.
#[derive(Debug, Default)]
pub struct JobControl {
    stop: AtomicU8,
}

impl JobControl {
    /// Asks the job to stop; the first reason wins.
    pub fn stop(&self, reason: StopReason) {
        let _ = self
            .stop
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the job must stop, if it must.
    pub fn stopped(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::DeadlineExceeded),
            3 => Some(StopReason::ClientGone),
            4 => Some(StopReason::ShuttingDown),
            _ => None,
        }
    }
}

/// Errors of the jobs layer.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job was stopped.
    #[error("job stopped: {0:?}")]
    Stopped(StopReason),
    /// The queue is full.
    #[error("the queue is full ({0} jobs queued or running); retry later")]
    QueueFull(usize),
    /// The server is not accepting work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Another job in flight has this client job id.
    #[error("client_job_id {0:?} is already in use by a job in flight")]
    DuplicateClientJobId(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl JobError {
    /// A stable snake_case name for metrics labels and ErrorInfo reasons.
    pub fn error_type(&self) -> &'static str {
        match self {
            JobError::Stopped(StopReason::Cancelled) => "cancelled",
            JobError::Stopped(StopReason::DeadlineExceeded) => "deadline_exceeded",
            JobError::Stopped(StopReason::ClientGone) => "client_gone",
            JobError::Stopped(StopReason::ShuttingDown) => "shutting_down",
            JobError::QueueFull(_) => "queue_full",
            JobError::ShuttingDown => "shutting_down",
            JobError::DuplicateClientJobId(_) => "duplicate_client_job_id",
            JobError::Engine(e) => e.error_type(),
        }
    }
}

/// Output options of a job.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    /// Encoding.
    pub format: OutputFormat,
    /// JPEG/WebP quality.
    pub quality: u8,
    /// PNG metadata chunks.
    pub embed_metadata: bool,
    /// Preview every n denoising steps (0: none).
    pub preview_every: u32,
}

/// A validated job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Pipeline parameters, fully resolved (seed, size, steps).
    pub params: GenerateParams,
    /// The base model.
    pub model: ModelEntry,
    /// SHA-256 of the base model's files.
    pub model_sha256: String,
    /// Output options.
    pub output: OutputSpec,
    /// The fully resolved request (for the PNG metadata; seed = image 0's).
    pub resolved: pb::GenerationSpec,
    /// The scheduler's name for the A1111 parameters.
    pub sampler_name: String,
    /// The client's job id.
    pub client_job_id: Option<String>,
    /// The refiner stage, if any.
    pub refiner: Option<RefinerJob>,
    /// A VAE replacing the models' own, if any.
    pub vae: Option<VaeJob>,
    /// LoRA adapters, in request order.
    pub loras: Vec<LoraJob>,
}

/// A LoRA adapter of a job.
#[derive(Debug, Clone)]
pub struct LoraJob {
    /// The LoRA file.
    pub model: ModelEntry,
    /// SHA-256 of the file.
    pub sha256: String,
    /// The request's weight, in [-2, 2].
    pub weight: f32,
}

/// The VAE a job uses in place of the models' own.
#[derive(Debug, Clone)]
pub struct VaeJob {
    /// The VAE model.
    pub model: ModelEntry,
    /// SHA-256 of its files.
    pub sha256: String,
}

/// The refiner stage of a job.
#[derive(Debug, Clone)]
pub struct RefinerJob {
    /// The refiner model.
    pub model: ModelEntry,
    /// SHA-256 of its files.
    pub sha256: String,
    /// Its parameters.
    pub params: crate::engine::pipeline::RefinerParams,
}

/// What a job reports.
#[derive(Debug)]
pub enum JobEvent {
    /// Progress.
    Progress(pb::JobProgress),
    /// One finished image.
    Image(pb::GeneratedImage),
    /// The job finished.
    Completed(pb::JobCompleted),
    /// The job failed.
    Failed(JobError),
}

/// A job in the queue.
pub struct Job {
    /// The server's id.
    pub id: String,
    /// What to do.
    pub spec: JobSpec,
    /// Where events go.
    pub events: mpsc::Sender<JobEvent>,
    /// Stop requests.
    pub control: Arc<JobControl>,
    /// When it was admitted.
    pub admitted_at: Instant,
    /// Its place in the admission bound, released when the job is dropped.
    _permit: OwnedSemaphorePermit,
}

/// Counters of the job lifecycle (started = completed + cancelled + failed, once idle).
#[derive(Debug, Default)]
pub struct JobCounters {
    /// Jobs admitted.
    pub admitted: AtomicU64,
    /// Jobs that finished successfully.
    pub completed: AtomicU64,
    /// Jobs stopped (cancel, deadline, disconnect, shutdown).
    pub stopped: AtomicU64,
    /// Jobs that failed.
    pub failed: AtomicU64,
}

/// An administrative request for the worker (load or unload a model), answered before
/// the next job starts.
pub struct AdminRequest {
    /// What to do.
    pub op: AdminOp,
    /// The model.
    pub model: ModelEntry,
    /// The answer: for a load, success; for an unload, whether it was resident.
    pub reply: tokio::sync::oneshot::Sender<Result<bool, EngineError>>,
}

/// What an admin request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOp {
    /// Load the model (making room within the memory budget).
    Load,
    /// Drop the model from the cache.
    Unload,
}

/// Work for the worker thread.
pub enum Work {
    /// A generation.
    Job(Box<Job>),
    /// A load or unload.
    Admin(AdminRequest),
}

/// The queue shared by the RPC handlers and the worker thread.
pub struct JobQueue {
    queue: Mutex<VecDeque<Job>>,
    admin: Mutex<VecDeque<AdminRequest>>,
    wakeup: Condvar,
    admission: Arc<Semaphore>,
    capacity: usize,
    in_flight: Mutex<HashMap<String, Arc<JobControl>>>,
    client_ids: Mutex<HashMap<String, String>>,
    accepting: AtomicBool,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Lifecycle counters.
    pub counters: JobCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (queues and maps) stays consistent for our uses.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A job handed out at admission: its id, its queue position and the events to forward.
pub struct Admitted {
    /// The job id.
    pub id: String,
    /// Jobs ahead of it.
    pub queue_position: u32,
    /// Events from the worker.
    pub events: mpsc::Receiver<JobEvent>,
    /// Stop control.
    pub control: Arc<JobControl>,
}

impl JobQueue {
    /// A queue admitting at most `capacity` jobs at once.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            admin: Mutex::new(VecDeque::new()),
            wakeup: Condvar::new(),
            admission: Arc::new(Semaphore::new(capacity)),
            capacity,
            in_flight: Mutex::new(HashMap::new()),
            client_ids: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            counters: JobCounters::default(),
        })
    }

    /// Takes a place in the admission bound without waiting.
    pub fn try_admit(&self) -> Result<OwnedSemaphorePermit, JobError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(JobError::ShuttingDown);
        }
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| JobError::QueueFull(self.capacity))
    }

    /// Jobs queued or running.
    pub fn depth(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    /// Jobs waiting (not running).
    pub fn queued(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Whether new work is accepted.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Stops accepting new jobs (shutdown).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Enqueues a job holding `permit`.
    pub fn submit(
        &self,
        spec: JobSpec,
        permit: OwnedSemaphorePermit,
        buffer: usize,
    ) -> Result<Admitted, JobError> {
        let id = format!(
            "job-{:x}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            self.next_id.fetch_add(1, Ordering::SeqCst)
        );
        if let Some(client_id) = &spec.client_job_id {
            let mut ids = lock(&self.client_ids);
            if ids.contains_key(client_id) {
                return Err(JobError::DuplicateClientJobId(client_id.clone()));
            }
            ids.insert(client_id.clone(), id.clone());
        }
        let control = Arc::new(JobControl::default());
        lock(&self.in_flight).insert(id.clone(), control.clone());
        let (tx, rx) = mpsc::channel(buffer);
        let job = Job {
            id: id.clone(),
            spec,
            events: tx,
            control: control.clone(),
            admitted_at: Instant::now(),
            _permit: permit,
        };
        let position = {
            let mut queue = lock(&self.queue);
            queue.push_back(job);
            queue.len() - 1
        };
        self.counters.admitted.fetch_add(1, Ordering::SeqCst);
        self.wakeup.notify_one();
        Ok(Admitted {
            id,
            queue_position: position as u32,
            events: rx,
            control,
        })
    }

    /// Stops a job by server or client id. Returns the job id and whether it was in
    /// flight. A queued job leaves the queue at once and frees its place.
    pub fn cancel(
        &self,
        job_id: &str,
        client_job_id: &str,
        reason: StopReason,
    ) -> Option<(String, bool)> {
        let id = if !job_id.is_empty() {
            job_id.to_string()
        } else {
            lock(&self.client_ids).get(client_job_id)?.clone()
        };
        let control = lock(&self.in_flight).get(&id).cloned();
        match control {
            Some(control) => {
                control.stop(reason);
                self.remove_queued(&id, reason);
                Some((id, true))
            }
            None => None,
        }
    }

    /// Removes a queued (not running) job, telling its client why.
    fn remove_queued(&self, id: &str, reason: StopReason) {
        let removed = {
            let mut queue = lock(&self.queue);
            let index = queue.iter().position(|j| j.id == id);
            index.and_then(|i| queue.remove(i))
        };
        if let Some(job) = removed {
            let _ = job
                .events
                .try_send(JobEvent::Failed(JobError::Stopped(reason)));
            self.finish(&job, Outcome::Stopped);
        }
    }

    /// Stops every job (after the shutdown grace period).
    pub fn stop_all(&self, reason: StopReason) {
        let ids: Vec<String> = lock(&self.in_flight).keys().cloned().collect();
        for id in ids {
            self.cancel(&id, "", reason);
        }
    }

    /// Jobs in flight (queued or running).
    pub fn in_flight(&self) -> usize {
        lock(&self.in_flight).len()
    }

    /// Blocks the worker until a job is queued or the queue is closed.
    pub fn next_work(&self) -> Option<Work> {
        let mut queue = lock(&self.queue);
        loop {
            // Admin requests go first: they are quick next to a generation.
            if let Some(request) = lock(&self.admin).pop_front() {
                return Some(Work::Admin(request));
            }
            if let Some(job) = queue.pop_front() {
                return Some(Work::Job(Box::new(job)));
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            queue = self
                .wakeup
                .wait_timeout(queue, Duration::from_millis(500))
                .map(|(q, _)| q)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Queues an admin request for the worker.
    pub fn submit_admin(&self, request: AdminRequest) -> Result<(), JobError> {
        if !self.accepting() {
            return Err(JobError::ShuttingDown);
        }
        let _queue = lock(&self.queue);
        lock(&self.admin).push_back(request);
        self.wakeup.notify_all();
        Ok(())
    }

    /// Ends the worker loop once the queue is empty.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wakeup.notify_all();
    }

    /// Records a finished job and forgets its ids.
    pub fn finish(&self, job: &Job, outcome: Outcome) {
        lock(&self.in_flight).remove(&job.id);
        if let Some(client_id) = &job.spec.client_job_id {
            lock(&self.client_ids).remove(client_id);
        }
        let counter = match outcome {
            Outcome::Completed => &self.counters.completed,
            Outcome::Stopped => &self.counters.stopped,
            Outcome::Failed => &self.counters.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All images delivered.
    Completed,
    /// Stopped by cancel, deadline, disconnect or shutdown.
    Stopped,
    /// An error.
    Failed,
}
