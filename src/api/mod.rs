//! The gRPC API: services, proto-to-domain validation, admission and the status mapping.

pub mod admission;
pub mod generation;
pub mod models;
pub mod status;
pub mod validate;

/// Shared by the services.
pub struct ApiState {
    /// The job queue.
    pub queue: std::sync::Arc<crate::jobs::JobQueue>,
    /// Model names.
    pub registry: std::sync::Arc<crate::engine::registry::Registry>,
    /// Configuration.
    pub settings: crate::config::Settings,
    /// Metrics.
    pub metrics: std::sync::Arc<crate::telemetry::Metrics>,
    /// Device and dtype names.
    pub device: String,
    /// Compute dtype name.
    pub dtype: String,
    /// Which models are loaded (folder paths), reported by the worker.
    pub resident: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>>,
}
