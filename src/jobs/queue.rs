//! The queue shared by the RPC handlers and the worker thread: a global admission bound
//! (places, not connections), a FIFO of jobs, admin requests, cancellation by job id or
//! client job id, and the lifecycle counters.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::engine::error::EngineError;
use crate::engine::registry::ModelEntry;
use crate::jobs::{JobControl, JobError, JobEvent, JobSpec, StopReason};
use crate::telemetry::Metrics;

/// A place in the admission bound. Dropping it frees the place and updates the queue
/// depth gauge, whichever path frees it (a refused request, a cancelled queued job, a
/// finished one).
pub struct QueuePlace {
    permit: Option<OwnedSemaphorePermit>,
    depth: Arc<Depth>,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.depth.publish();
    }
}

/// The admission bound and the gauge that shows how much of it is taken.
struct Depth {
    admission: Arc<Semaphore>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl Depth {
    fn current(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    fn publish(&self) {
        self.metrics.set_queue_depth(self.current());
    }
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
    /// The span of the request that submitted it: the job's span is its child.
    pub span: tracing::Span,
    /// Its place in the admission bound, released when the job is dropped.
    _place: QueuePlace,
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
    depth: Arc<Depth>,
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
    /// A queue admitting at most `capacity` jobs at once, its depth shown in `metrics`.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            admin: Mutex::new(VecDeque::new()),
            wakeup: Condvar::new(),
            depth: Arc::new(Depth {
                admission: Arc::new(Semaphore::new(capacity)),
                capacity,
                metrics,
            }),
            in_flight: Mutex::new(HashMap::new()),
            client_ids: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            counters: JobCounters::default(),
        })
    }

    /// Takes a place in the admission bound without waiting.
    pub fn try_admit(&self) -> Result<QueuePlace, JobError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(JobError::ShuttingDown);
        }
        let permit = self
            .depth
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| JobError::QueueFull(self.depth.capacity))?;
        Ok(QueuePlace {
            permit: Some(permit),
            depth: self.depth.clone(),
        })
    }

    /// Jobs queued or running (places taken).
    pub fn depth(&self) -> usize {
        self.depth.current()
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

    /// Enqueues a job holding `place`, as a child of the current span.
    pub fn submit(
        &self,
        spec: JobSpec,
        place: QueuePlace,
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
            span: tracing::Span::current(),
            _place: place,
        };
        let position = {
            let mut queue = lock(&self.queue);
            queue.push_back(job);
            queue.len() - 1
        };
        self.counters.admitted.fetch_add(1, Ordering::SeqCst);
        self.depth.publish();
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
