//! The queue shared by the RPC handlers and the worker thread: a global admission bound
//! (places, not connections), a FIFO of jobs, admin requests, the jobs in flight with
//! their owners (a job can be found and cancelled only by its caller), and the one place
//! where a job's end is counted.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::engine::error::EngineError;
use crate::engine::registry::ModelEntry;
use crate::jobs::{JobControl, JobError, JobEvent, JobWork, StopReason};
use crate::telemetry::Metrics;

/// How many finished jobs are remembered (so that cancelling one answers "finished").
const REMEMBERED: usize = 1024;

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
    /// The server's id: 128 random bits.
    pub id: String,
    /// Who submitted it (see [`JobQueue::cancel`]).
    pub owner: String,
    /// What to do.
    pub work: JobWork,
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

/// Counters of the job lifecycle (admitted = completed + stopped + failed, once idle).
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
    Admin(Box<AdminRequest>),
}

/// Who asks for a job by id.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// The server itself (deadlines, departed clients, shutdown): any job.
    Server,
    /// A client: only its own jobs.
    Client(&'a str),
}

/// What a cancel found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The job was queued or running and is stopped now.
    Stopped(String),
    /// The caller's job had finished already.
    Finished(String),
    /// No job of the caller's has that id.
    Unknown,
}

/// A job in flight, as lookups see it.
struct Tracked {
    owner: String,
    control: Arc<JobControl>,
}

/// The jobs in flight and those finished lately, by id.
#[derive(Default)]
struct Ledger {
    in_flight: HashMap<String, Tracked>,
    /// (owner, client job id) -> job id.
    client_ids: HashMap<(String, String), String>,
    /// (job id, owner, client job id) of the last jobs to finish, oldest first.
    finished: VecDeque<(String, String, Option<String>)>,
}

/// The queue shared by the RPC handlers and the worker thread.
pub struct JobQueue {
    queue: Mutex<VecDeque<Job>>,
    admin: Mutex<VecDeque<AdminRequest>>,
    wakeup: Condvar,
    depth: Arc<Depth>,
    ledger: Mutex<Ledger>,
    accepting: AtomicBool,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
    /// Lifecycle counters.
    pub counters: JobCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (queues and maps) stays consistent for our uses.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new job id: "job-" and 128 random bits in hex.
fn new_job_id() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Without the kernel's generator, the process's random hasher keys still make
        // ids no client can guess from its own.
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(Instant::now().elapsed().as_nanos());
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("job-{hex}")
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
    /// A queue admitting at most `capacity` jobs at once, counting into `metrics`.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            admin: Mutex::new(VecDeque::new()),
            wakeup: Condvar::new(),
            depth: Arc::new(Depth {
                admission: Arc::new(Semaphore::new(capacity)),
                capacity,
                metrics: metrics.clone(),
            }),
            ledger: Mutex::new(Ledger::default()),
            accepting: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            metrics,
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

    /// Enqueues `owner`'s job holding `place`, as a child of the current span.
    pub fn submit(
        &self,
        work: JobWork,
        owner: &str,
        place: QueuePlace,
        buffer: usize,
    ) -> Result<Admitted, JobError> {
        let id = new_job_id();
        let control = Arc::new(JobControl::default());
        {
            let mut ledger = lock(&self.ledger);
            if let Some(client_id) = work.client_job_id() {
                let key = (owner.to_string(), client_id.clone());
                if ledger.client_ids.contains_key(&key) {
                    return Err(JobError::DuplicateClientJobId(client_id.clone()));
                }
                ledger.client_ids.insert(key, id.clone());
            }
            let tracked = Tracked {
                owner: owner.to_string(),
                control: control.clone(),
            };
            ledger.in_flight.insert(id.clone(), tracked);
        }
        let (tx, rx) = mpsc::channel(buffer);
        let job = Job {
            id: id.clone(),
            owner: owner.to_string(),
            work,
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
        self.metrics.job_started();
        self.depth.publish();
        self.wakeup.notify_one();
        Ok(Admitted {
            id,
            queue_position: position as u32,
            events: rx,
            control,
        })
    }

    /// Stops a job by server id or by the caller's client job id. A client finds only
    /// its own jobs; a stranger's look unknown. A queued job leaves the queue at once and
    /// frees its place.
    pub fn cancel(
        &self,
        job_id: &str,
        client_job_id: &str,
        reason: StopReason,
        caller: Caller<'_>,
    ) -> Cancelled {
        let control = {
            let ledger = lock(&self.ledger);
            let id = match (job_id, caller) {
                ("", Caller::Client(owner)) => ledger
                    .client_ids
                    .get(&(owner.to_string(), client_job_id.to_string()))
                    .cloned(),
                ("", Caller::Server) => None,
                (id, _) => Some(id.to_string()),
            };
            let owns = |owner: &str| match caller {
                Caller::Server => true,
                Caller::Client(caller) => caller == owner,
            };
            let tracked = id
                .as_ref()
                .and_then(|id| ledger.in_flight.get(id))
                .filter(|t| owns(&t.owner));
            match (id, tracked) {
                (Some(id), Some(tracked)) => Some((id, tracked.control.clone())),
                (id, None) => {
                    let finished = ledger.finished.iter().find(|(done, owner, client)| {
                        owns(owner)
                            && match &id {
                                Some(id) => done == id,
                                None => client.as_deref() == Some(client_job_id),
                            }
                    });
                    return match finished {
                        Some((done, ..)) => Cancelled::Finished(done.clone()),
                        None => Cancelled::Unknown,
                    };
                }
                (None, Some(_)) => None,
            }
        };
        match control {
            Some((id, control)) => {
                let first = control.stop(reason);
                self.remove_queued(&id, reason);
                // A job already stopping (cancelled before, past its deadline) is over.
                if first {
                    Cancelled::Stopped(id)
                } else {
                    Cancelled::Finished(id)
                }
            }
            None => Cancelled::Unknown,
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
            self.finish(&job, Outcome::Stopped(reason));
        }
    }

    /// Stops every job (after the shutdown grace period).
    pub fn stop_all(&self, reason: StopReason) {
        let ids: Vec<String> = lock(&self.ledger).in_flight.keys().cloned().collect();
        for id in ids {
            self.cancel(&id, "", reason, Caller::Server);
        }
    }

    /// Jobs in flight (queued, running, or delivering their last events).
    pub fn in_flight(&self) -> usize {
        lock(&self.ledger).in_flight.len()
    }

    /// Blocks the worker until a job is queued or the queue is closed.
    pub fn next_work(&self) -> Option<Work> {
        let mut queue = lock(&self.queue);
        loop {
            // Admin requests go first: they are quick next to a generation.
            if let Some(request) = lock(&self.admin).pop_front() {
                return Some(Work::Admin(Box::new(request)));
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

    /// Records how a job ended (the one place a job's end is counted, exactly once) and
    /// forgets its ids but for a short memory of finished jobs.
    pub fn finish(&self, job: &Job, outcome: Outcome) {
        {
            let mut ledger = lock(&self.ledger);
            if ledger.in_flight.remove(&job.id).is_none() {
                return;
            }
            if let Some(client_id) = job.work.client_job_id() {
                ledger
                    .client_ids
                    .remove(&(job.owner.clone(), client_id.clone()));
            }
            ledger.finished.push_back((
                job.id.clone(),
                job.owner.clone(),
                job.work.client_job_id().cloned(),
            ));
            while ledger.finished.len() > REMEMBERED {
                ledger.finished.pop_front();
            }
        }
        let counter = match outcome {
            Outcome::Completed => &self.counters.completed,
            Outcome::Stopped(_) => &self.counters.stopped,
            Outcome::Failed(_) => &self.counters.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.metrics.job_ended(outcome.label(), outcome.reason());
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All images delivered.
    Completed,
    /// Stopped by cancel, deadline, a departed or stalled client, or shutdown.
    Stopped(StopReason),
    /// An error, by its type.
    Failed(&'static str),
}

impl Outcome {
    /// The outcome label of the jobs-ended counter.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Stopped(StopReason::Cancelled) => "cancelled",
            Outcome::Stopped(StopReason::ClientGone) => "dropped",
            Outcome::Stopped(StopReason::DeadlineExceeded) => "deadline",
            Outcome::Stopped(StopReason::ShuttingDown) => "shutdown",
            Outcome::Failed(_) => "failed",
        }
    }

    /// Why it did not complete (the failures counter's reason).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Outcome::Completed => None,
            Outcome::Stopped(reason) => Some(JobError::Stopped(reason).error_type()),
            Outcome::Failed(reason) => Some(reason),
        }
    }
}
