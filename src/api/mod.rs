//! The gRPC API: services, proto-to-domain validation and domain-to-proto conversion (the
//! only place proto types exist), admission, RPC metrics and the status mapping.

pub mod admission;
pub mod auth;
pub mod caller;
pub mod convert;
pub mod generation;
pub mod guard;
pub mod models;
pub mod preprocess;
pub mod redact;
pub mod rpc_metrics;
pub mod status;
pub mod tls;
pub mod validate;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::engine::hashes::FileHashes;
use crate::engine::registry::Registry;
use crate::jobs::JobQueue;

/// Shared by the services.
pub struct ApiState {
    /// The job queue.
    pub queue: Arc<JobQueue>,
    /// Model names.
    pub registry: Arc<Registry>,
    /// The process's file hashes (listings read them, never compute them).
    pub hashes: Arc<FileHashes>,
    /// Configuration.
    pub settings: crate::config::Settings,
    /// Device name (`cpu`, `cuda:0`).
    pub device: String,
    /// Compute dtype name.
    pub dtype: String,
    /// Which models are loaded (folder paths), reported by the worker.
    pub resident: Arc<Mutex<HashSet<PathBuf>>>,
    /// Server paths kept out of status messages.
    pub redactor: redact::Redactor,
    /// Turns for the Preprocess RPC.
    pub preprocess_slots: Arc<tokio::sync::Semaphore>,
}

impl ApiState {
    /// The status of `error`, as clients see it (no server paths).
    pub fn status(&self, error: status::ApiError) -> tonic::Status {
        let retry_after = std::time::Duration::from_millis(self.settings.jobs.retry_after_ms);
        self.redactor.apply(error.into_status(retry_after))
    }
}
