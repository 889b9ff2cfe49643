//! Jobs: admission, the queue, cancellation and deadlines, and the runner that takes a
//! job through its stages on the engine thread, reporting domain events that the API
//! layer turns into the contract's messages. One worker thread ([`worker`]) owns the
//! engine and runs jobs in order.

pub mod clock;
pub mod control;
pub mod detectors;
pub mod emit;
pub mod encode;
pub mod engine;
pub mod error;
pub mod events;
mod hires;
mod image_prompts;
mod images;
mod interrupt;
mod load;
mod loaded;
mod lora_sets;
pub mod metadata;
mod postprocess;
mod preprocess;
mod preprocess_job;
pub mod queue;
pub mod runner;
mod single;
pub mod spec;
mod upscale_job;
pub mod worker;

pub use control::{JobControl, StopReason};
pub use error::JobError;
pub use events::{JobEvent, Stage};
pub use queue::{
    AdminOp, AdminRequest, Admitted, Job, JobCounters, JobQueue, Outcome, QueuePlace, Work,
};
pub use spec::{
    ConditioningImage, ControlInput, ControlNetJob, EmbeddingJob, HiresJob, IpAdapterJob, JobSpec,
    JobWork, LoraJob, OutputSpec, PostStep, PreprocessSpec, PromptImage, RefinerJob, UpscaleJob,
    UpscaleSpec,
};
