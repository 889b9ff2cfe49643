//! Errors of the engine layer.

use std::path::PathBuf;

/// Everything that can go wrong while loading models or generating images.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model file or folder could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A config.json (or similar) is missing, malformed or names something unsupported.
    #[error("bad model config `{path}`: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weight file is not a valid safetensors file (truncated, bad header, ...).
    #[error("bad weight file `{path}`: {message}")]
    WeightFile {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is absent from its weight files.
    #[error("missing tensor `{name}` in `{path}`")]
    MissingTensor {
        /// The weight file (the first one, for sharded weights).
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor in a weight file that the model does not have.
    #[error("unknown tensor `{name}` in `{path}`")]
    UnknownTensor {
        /// The weight file holding it.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor whose shape differs from the one the config implies.
    #[error("tensor `{name}` in `{path}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The weight file holding it.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<i64>,
        /// The shape in the file.
        actual: Vec<i64>,
    },
    /// The tokenizer files cannot be used.
    #[error("tokenizer `{path}`: {message}")]
    Tokenizer {
        /// The tokenizer folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A generation parameter is out of range for this model.
    #[error("{0}")]
    InvalidRequest(String),
    /// Models or a request that cannot work together (a refiner as the base model, ...).
    #[error("{0}")]
    Incompatible(String),
    /// A request's textual inversion token that the model's tokenizer cannot take.
    #[error("{message}")]
    EmbeddingToken {
        /// The embedding's index in the request.
        index: usize,
        /// What is wrong with its token.
        message: String,
    },
    /// A LoRA that is not in a known format, or that does not fit the model it is
    /// applied to (another architecture, a key that names no layer).
    #[error("LoRA `{lora}`: key `{key}` {message}")]
    Lora {
        /// The LoRA's name.
        lora: String,
        /// The first key that did not fit.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A job that cannot fit the memory budget even with every other model evicted.
    #[error("memory budget: {0}")]
    MemoryBudget(String),
    /// The device ran out of memory (after the engine's own recovery).
    #[error("device out of memory: {0}")]
    DeviceOutOfMemory(String),
    /// An unexpected failure inside libtorch or the engine (the process keeps serving).
    #[error("internal error: {0}")]
    Internal(String),
    /// The requested device or dtype is not available here.
    #[error("device: {0}")]
    Device(String),
    /// Denoising produced NaN or infinite latents (some scheduler settings do, in
    /// diffusers too; a non-finite image is never returned).
    #[error("denoising produced non-finite latents: {0}")]
    NonFinite(String),
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl EngineError {
    /// A stable snake_case name for metrics labels and error reasons.
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::Io { .. } => "io",
            EngineError::Config { .. } => "model_config",
            EngineError::WeightFile { .. } => "weight_file",
            EngineError::MissingTensor { .. } => "missing_tensor",
            EngineError::UnknownTensor { .. } => "unknown_tensor",
            EngineError::ShapeMismatch { .. } => "shape_mismatch",
            EngineError::Tokenizer { .. } => "tokenizer",
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::Incompatible(_) => "incompatible_models",
            EngineError::EmbeddingToken { .. } => "embedding_token",
            EngineError::Lora { .. } => "lora_incompatible",
            EngineError::MemoryBudget(_) => "memory_budget",
            EngineError::DeviceOutOfMemory(_) => "device_out_of_memory",
            EngineError::Internal(_) => "internal",
            EngineError::Device(_) => "device",
            EngineError::NonFinite(_) => "non_finite_latents",
            EngineError::Torch(_) => "torch",
        }
    }
}

impl EngineError {
    /// Whether this is the device running out of memory (as libtorch reports it).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            EngineError::DeviceOutOfMemory(_) => true,
            EngineError::Torch(e) => e.to_string().contains("out of memory"),
            _ => false,
        }
    }

    /// Runs `work`, turning a panic (libtorch raises through panics in tch's infallible
    /// calls) into an error: out of memory into [`EngineError::DeviceOutOfMemory`],
    /// anything else into [`EngineError::Internal`].
    pub fn catch<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
            Ok(result) => result,
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                if message.contains("out of memory") {
                    Err(EngineError::DeviceOutOfMemory(message))
                } else {
                    Err(EngineError::Internal(message))
                }
            }
        }
    }
}

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;
