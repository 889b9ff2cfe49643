//! The one place where errors become gRPC statuses (with google.rpc details).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::error::EngineError;
use crate::engine::registry::RegistryError;
use crate::jobs::{JobError, StopReason};

/// Errors of the API layer, each mapped to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Fields that break the contract: (proto field path, description).
    #[error("invalid request: {}", summary(.0))]
    InvalidArgument(Vec<(String, String)>),
    /// A job id or client job id no job of the caller's has.
    #[error("no job of yours has the id {0:?}")]
    JobNotFound(String),
    /// A valid request for a feature this server does not implement yet.
    #[error("`{0}`: {1}")]
    Unimplemented(String, String),
    /// A model name no root holds.
    #[error("model `{0}` not found")]
    ModelNotFound(String),
    /// A model stored in a pickle-based format, never loaded at request time.
    #[error("model `{name}` is a pickle file ({file}), which is never loaded at request time: convert it with `sdxld convert IN OUT.safetensors` first")]
    PickleModel {
        /// The name.
        name: String,
        /// The file under its root.
        file: String,
    },
    /// A model with a file that leads outside every model root.
    #[error("model `{name}` has `{file}` leading outside the model roots; it is not served")]
    ModelOutsideRoots {
        /// The name.
        name: String,
        /// The file, relative to the model.
        file: String,
    },
    /// A network preprocessor's default detector is not configured or not installed.
    #[error("{}", missing_detector(key, name, expected))]
    PreprocessorModelMissing {
        /// The configuration key of the default.
        key: &'static str,
        /// The model name it holds ("" for none).
        name: String,
        /// What the server looks for under the preprocessor roots.
        expected: String,
    },
    /// A network preprocessor's default detector holds another network.
    #[error(
        "`{key}` names `{name}`, which holds the {holds} network; this preprocessor runs {runs}"
    )]
    PreprocessorModelMismatch {
        /// The configuration key of the default.
        key: &'static str,
        /// The model name it holds.
        name: String,
        /// The network the file holds.
        holds: &'static str,
        /// The network the preprocessor runs.
        runs: &'static str,
    },
    /// The jobs layer refused or stopped the job.
    #[error(transparent)]
    Job(#[from] JobError),
    /// A failure of the server itself (a task that did not finish).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a missing default detector's status says: the key, and the file it expects.
fn missing_detector(key: &str, name: &str, expected: &str) -> String {
    if name.is_empty() {
        return format!(
            "this preprocessor has no default detector (`{key}` is empty): name one in preprocessor_params.model"
        );
    }
    format!(
        "this preprocessor's detector `{name}` (`{key}`) is not installed: expected `{expected}` under models.preprocessor_roots (weights published as `.pth` convert with `sdxld convert`)"
    )
}

/// Most field violations a status lists; one more says how many were left out, so that
/// the status (message and details) stays far below the 16 KiB clients accept.
const MAX_VIOLATIONS: usize = 20;
/// Longest description a violation keeps.
const MAX_DESCRIPTION: usize = 200;
/// Longest status message.
const MAX_MESSAGE: usize = 1024;

/// `text` cut at a character boundary to at most `max` bytes.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The violations a status lists: the first ones, each cut short, and a count of the rest.
fn listed(violations: &[(String, String)]) -> Vec<(String, String)> {
    let mut listed: Vec<(String, String)> = violations
        .iter()
        .take(MAX_VIOLATIONS)
        .map(|(field, description)| {
            (
                cut(field, MAX_DESCRIPTION),
                cut(description, MAX_DESCRIPTION),
            )
        })
        .collect();
    if violations.len() > MAX_VIOLATIONS {
        let more = violations.len() - MAX_VIOLATIONS;
        listed.push((
            "spec".into(),
            format!("`spec` has {more} more invalid fields"),
        ));
    }
    listed
}

/// The status message of a list of violations.
fn summary(violations: &[(String, String)]) -> String {
    let descriptions: Vec<String> = listed(violations).into_iter().map(|(_, d)| d).collect();
    cut(&descriptions.join("; "), MAX_MESSAGE)
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::InvalidName { name, reason } => ApiError::invalid(
                "name",
                &format!("`name` {name:?} is not a valid model name ({reason})"),
            ),
            RegistryError::NotFound(name) => ApiError::ModelNotFound(name),
            RegistryError::Pickle { name, file } => ApiError::PickleModel { name, file },
            RegistryError::OutsideRoots { name, file } => {
                ApiError::ModelOutsideRoots { name, file }
            }
        }
    }
}

impl ApiError {
    /// One invalid field.
    pub fn invalid(field: &str, description: &str) -> Self {
        ApiError::InvalidArgument(vec![(field.to_string(), description.to_string())])
    }

    /// A stable snake_case name (metrics label, ErrorInfo reason).
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::JobNotFound(_) => "job_not_found",
            ApiError::Unimplemented(..) => "unimplemented",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::PickleModel { .. } => "pickle_model",
            ApiError::ModelOutsideRoots { .. } => "model_outside_roots",
            ApiError::PreprocessorModelMissing { .. } => "preprocessor_model_missing",
            ApiError::PreprocessorModelMismatch { .. } => "preprocessor_model_mismatch",
            ApiError::Job(e) => e.error_type(),
            ApiError::Internal(_) => "internal",
        }
    }

    /// The wire status.
    pub fn into_status(self, retry_after: Duration) -> Status {
        let message = self.to_string();
        match self {
            ApiError::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for (field, description) in listed(&violations) {
                    details.add_bad_request_violation(field, description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::JobNotFound(id) => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_error_info("JOB_NOT_FOUND", "sdxld", [("job".to_string(), id)]),
            ),
            ApiError::Unimplemented(field, _) => Status::with_error_details(
                Code::Unimplemented,
                message,
                ErrorDetails::with_error_info(
                    "FEATURE_NOT_IMPLEMENTED",
                    "sdxld",
                    [("field".to_string(), field)],
                ),
            ),
            ApiError::ModelNotFound(name) => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_error_info(
                    "MODEL_NOT_FOUND",
                    "sdxld",
                    [("model".to_string(), name)],
                ),
            ),
            ApiError::PickleModel { name, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(
                    "PICKLE_NOT_LOADED",
                    "sdxld",
                    [("model".to_string(), name)],
                ),
            ),
            ApiError::ModelOutsideRoots { name, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(
                    "MODEL_OUTSIDE_ROOTS",
                    "sdxld",
                    [("model".to_string(), name)],
                ),
            ),
            ApiError::PreprocessorModelMissing {
                key,
                name,
                expected,
            } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(
                    "PREPROCESSOR_MODEL_MISSING",
                    "sdxld",
                    [
                        ("config_key".to_string(), key.to_string()),
                        ("expected_file".to_string(), expected),
                        ("model".to_string(), name),
                    ],
                ),
            ),
            ApiError::PreprocessorModelMismatch { key, name, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(
                    "PREPROCESSOR_MODEL_MISMATCH",
                    "sdxld",
                    [
                        ("config_key".to_string(), key.to_string()),
                        ("model".to_string(), name),
                    ],
                ),
            ),
            ApiError::Job(job) => job_status(job, message, retry_after),
            ApiError::Internal(_) => Status::with_error_details(
                Code::Internal,
                message,
                ErrorDetails::with_error_info(
                    "INTERNAL",
                    "sdxld",
                    std::collections::HashMap::<String, String>::new(),
                ),
            ),
        }
    }
}

fn job_status(error: JobError, message: String, retry_after: Duration) -> Status {
    match error {
        JobError::QueueFull(_) => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        JobError::ShuttingDown | JobError::Stopped(StopReason::ShuttingDown) => {
            Status::unavailable(message)
        }
        JobError::Stopped(StopReason::Cancelled | StopReason::ClientGone) => {
            Status::cancelled("the job was cancelled")
        }
        JobError::Stopped(StopReason::DeadlineExceeded) => {
            Status::deadline_exceeded("the deadline passed before the job finished")
        }
        JobError::DuplicateClientJobId(_) => {
            let mut details = ErrorDetails::new();
            // The admission names the request's own field; this is the fallback.
            details.add_bad_request_violation("client_job_id", message.clone());
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        JobError::Engine(engine) => engine_status(engine),
    }
}

/// The first line of an error, at most 512 bytes: libtorch's messages carry C++
/// backtraces that would not fit in a gRPC status header (the full text is logged).
fn concise(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    if line.len() <= 512 {
        return line.to_string();
    }
    let mut end = 512;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

fn engine_status(error: EngineError) -> Status {
    if let EngineError::EmbeddingToken { index, message } = &error {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation(format!("spec.embeddings[{index}].token"), message);
        return Status::with_error_details(Code::InvalidArgument, message.clone(), details);
    }
    let reason = error.error_type().to_uppercase();
    let message = concise(&error.to_string());
    let code = match &error {
        EngineError::InvalidRequest(_) | EngineError::EmbeddingToken { .. } => {
            Code::InvalidArgument
        }
        EngineError::Io { .. }
        | EngineError::Config { .. }
        | EngineError::WeightFile { .. }
        | EngineError::MissingTensor { .. }
        | EngineError::UnknownTensor { .. }
        | EngineError::ShapeMismatch { .. }
        | EngineError::Tokenizer { .. }
        | EngineError::Incompatible(_)
        | EngineError::Lora { .. }
        | EngineError::MemoryBudget(_) => Code::FailedPrecondition,
        EngineError::Torch(_) if error.is_out_of_memory() => Code::ResourceExhausted,
        EngineError::DeviceOutOfMemory(_) => Code::ResourceExhausted,
        EngineError::Device(_)
        | EngineError::Torch(_)
        | EngineError::NonFinite(_)
        | EngineError::Internal(_) => Code::Internal,
    };
    let reason = if error.is_out_of_memory() {
        "DEVICE_OUT_OF_MEMORY".to_string()
    } else {
        reason
    };
    let metadata: std::collections::HashMap<String, String> = match &error {
        EngineError::Lora { lora, key, .. } => {
            [("lora".into(), lora.clone()), ("key".into(), key.clone())].into()
        }
        _ => Default::default(),
    };
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, "sdxld", metadata),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_messages_are_cut_to_one_short_line() {
        let long = format!(
            "CUDA out of memory. Tried to allocate 4.00 GiB {}\nException raised from malloc at ...\nframe #0: ...",
            "x".repeat(2000)
        );
        let status = engine_status(EngineError::DeviceOutOfMemory(long));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().len() < 600 && !status.message().contains('\n'));
        assert_eq!(
            status.get_details_error_info().expect("ErrorInfo").reason,
            "DEVICE_OUT_OF_MEMORY"
        );
    }
}
