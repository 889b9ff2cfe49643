//! Configuration: `config/default.toml` (compiled in), an optional file, and
//! `SDXLD__SECTION__KEY` environment overrides. A bad value stops startup with a message
//! naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::preprocess::detector::DetectorNetwork;

/// The built-in defaults, every key documented.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// gRPC address.
    pub listen: String,
    /// Largest request in bytes.
    pub max_request_bytes: usize,
    /// Largest response in bytes.
    pub max_response_bytes: usize,
    /// Drain period after SIGTERM, in seconds.
    pub shutdown_grace_seconds: u64,
    /// Seconds a client may take no event before its job is stopped.
    pub stalled_client_timeout_seconds: u64,
    /// Prometheus endpoint address, "" for none.
    pub metrics_listen: String,
    /// A plaintext address serving only the health service (for kubelet probes when
    /// TLS is on); "" for none.
    pub health_listen: String,
    /// Bearer tokens, each `name:role:secret` (role `generate` or `admin`).
    pub tokens: Vec<String>,
    /// A file of tokens, one `name:role:secret` per line (# comments); "" for none.
    pub tokens_file: String,
    /// Without tokens, let every client call the admin RPCs.
    pub allow_unauthenticated_admin: bool,
    /// `[server.tls]`.
    pub tls: TlsSettings,
}

/// `[server.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain; "" (with `key`) serves plaintext.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// PEM CA bundle that client certificates must chain to; "" for none.
    pub client_ca: String,
    /// `none`, `optional` or `required` client certificates.
    pub client_auth: String,
}

impl TlsSettings {
    /// Whether the server speaks TLS.
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty()
    }
}

/// `[jobs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    /// Jobs queued or running at once.
    pub max_queued: usize,
    /// RetryInfo delay in milliseconds.
    pub retry_after_ms: u64,
    /// Events buffered per stream.
    pub stream_buffer: usize,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest width.
    pub max_width: u32,
    /// Largest height.
    pub max_height: u32,
    /// Most steps.
    pub max_steps: u32,
    /// Most images per request.
    pub max_num_images: u32,
    /// Longest prompt in characters.
    pub max_prompt_chars: u32,
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// Device name.
    pub device: String,
    /// Dtype name.
    pub dtype: String,
    /// Default model name or folder; "" for the demo model.
    pub default_model: String,
    /// Demo model folder; "" for the cache.
    pub demo_model_dir: String,
    /// Warm-up before ready.
    pub warmup: bool,
    /// Bytes of model weights plus a job's estimated activations allowed on the device at
    /// once; 0 for no limit.
    pub memory_budget_bytes: u64,
    /// Fraction of the CUDA device's memory libtorch's allocator may use; 0 for all.
    pub cuda_memory_fraction: f64,
    /// Bytes of evicted model components kept in host memory; 0 drops them.
    pub host_memory_budget_bytes: u64,
    /// How LoRA adapters are applied.
    pub lora_mode: crate::engine::lora::LoraMode,
    /// Denoisers' convolution weights channels-last.
    pub channels_last: bool,
    /// Denoisers' attention projections fused at load.
    pub fused_projections: bool,
    /// cuDNN benchmarks its convolution algorithms for each new shape.
    pub cudnn_benchmark: bool,
    /// The UNet's plain calls replayed as CUDA graphs.
    pub cuda_graphs: bool,
    /// The fused attention kernel tried first on CUDA.
    pub attention_backend: crate::engine::sdpa::AttentionBackend,
    /// The VAE decoder's layers on more rows than this run that many rows at a time; 0:
    /// whole.
    pub vae_band_rows: u32,
}

/// `[models]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Base model roots.
    pub base_roots: Vec<PathBuf>,
    /// Refiner model roots.
    pub refiner_roots: Vec<PathBuf>,
    /// VAE roots.
    pub vae_roots: Vec<PathBuf>,
    /// LoRA roots.
    pub lora_roots: Vec<PathBuf>,
    /// ControlNet roots.
    pub controlnet_roots: Vec<PathBuf>,
    /// Upscaler roots.
    pub upscaler_roots: Vec<PathBuf>,
    /// Preprocessor network roots.
    pub preprocessor_roots: Vec<PathBuf>,
    /// Textual inversion embedding roots.
    pub embedding_roots: Vec<PathBuf>,
    /// IP-Adapter roots.
    pub ip_adapter_roots: Vec<PathBuf>,
    /// CLIP image encoder roots.
    pub image_encoder_roots: Vec<PathBuf>,
}

impl ModelSettings {
    /// The roots of every kind.
    pub fn roots(&self) -> crate::engine::registry::ModelRoots {
        crate::engine::registry::ModelRoots {
            base: self.base_roots.clone(),
            refiner: self.refiner_roots.clone(),
            vae: self.vae_roots.clone(),
            lora: self.lora_roots.clone(),
            controlnet: self.controlnet_roots.clone(),
            upscaler: self.upscaler_roots.clone(),
            preprocessor: self.preprocessor_roots.clone(),
            embedding: self.embedding_roots.clone(),
            ip_adapter: self.ip_adapter_roots.clone(),
            image_encoder: self.image_encoder_roots.clone(),
        }
    }
}

/// `[preprocessing]`: the default detector of each network preprocessor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessingSettings {
    /// The line-art generator's model name; "" for none.
    pub lineart_model: String,
    /// The anime line-art U-Net's model name; "" for none.
    pub lineart_anime_model: String,
    /// The depth model's name (a Depth Anything folder); "" for none.
    pub depth_model: String,
    /// The HED edge network's model name; "" for none.
    pub hed_model: String,
    /// The segmentation model's name (a UperNet folder); "" for none.
    pub segmentation_model: String,
    /// The OpenPose body network's model name; "" for none.
    pub openpose_model: String,
    /// The OpenPose face network's model name (faces drawn beside or without the
    /// bodies); "" for none.
    pub openpose_face_model: String,
    /// The OpenPose hand network's model name (hands drawn beside the bodies); "" for
    /// none.
    pub openpose_hand_model: String,
    /// The NormalBAE network's model name; "" for none.
    pub normal_model: String,
    /// The M-LSD network's model name; "" for none.
    pub mlsd_model: String,
    /// Anyline's TEED network's model name (MistoLine's MTEED); "" for none.
    pub anyline_model: String,
    /// The PiDiNet network sketches are filtered from; "" for none.
    pub sketch_model: String,
}

impl PreprocessingSettings {
    /// The configuration key and model name of the default detector of `network`.
    pub fn default_detector(&self, network: DetectorNetwork) -> (&'static str, &str) {
        match network {
            DetectorNetwork::Lineart => ("preprocessing.lineart_model", &self.lineart_model),
            DetectorNetwork::LineartAnime => (
                "preprocessing.lineart_anime_model",
                &self.lineart_anime_model,
            ),
            DetectorNetwork::DepthAnything
            | DetectorNetwork::Dpt
            | DetectorNetwork::ZoeDepth
            | DetectorNetwork::Leres => ("preprocessing.depth_model", &self.depth_model),
            // Soft edges and scribbles take a PiDiNet file in HED's place; sketches run
            // PiDiNet itself.
            DetectorNetwork::Hed => ("preprocessing.hed_model", &self.hed_model),
            DetectorNetwork::PiDiNet => ("preprocessing.sketch_model", &self.sketch_model),
            // Soft edges take a TEED file in HED's place; only Anyline runs TEED itself.
            DetectorNetwork::Teed => ("preprocessing.anyline_model", &self.anyline_model),
            DetectorNetwork::UperNet => {
                ("preprocessing.segmentation_model", &self.segmentation_model)
            }
            DetectorNetwork::OpenPose => ("preprocessing.openpose_model", &self.openpose_model),
            DetectorNetwork::FaceNet => (
                "preprocessing.openpose_face_model",
                &self.openpose_face_model,
            ),
            DetectorNetwork::HandPose => (
                "preprocessing.openpose_hand_model",
                &self.openpose_hand_model,
            ),
            DetectorNetwork::NormalBae => ("preprocessing.normal_model", &self.normal_model),
            DetectorNetwork::Mlsd => ("preprocessing.mlsd_model", &self.mlsd_model),
        }
    }

    /// Every default, with its key.
    fn all(&self) -> [(&'static str, &str); 12] {
        [
            DetectorNetwork::Lineart,
            DetectorNetwork::LineartAnime,
            DetectorNetwork::DepthAnything,
            DetectorNetwork::Hed,
            DetectorNetwork::UperNet,
            DetectorNetwork::OpenPose,
            DetectorNetwork::FaceNet,
            DetectorNetwork::HandPose,
            DetectorNetwork::NormalBae,
            DetectorNetwork::Mlsd,
            DetectorNetwork::Teed,
            DetectorNetwork::PiDiNet,
        ]
        .map(|network| self.default_detector(network))
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// text or json.
    pub log_format: String,
    /// EnvFilter directives.
    pub log_level: String,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[server]`.
    pub server: ServerSettings,
    /// `[jobs]`.
    pub jobs: JobSettings,
    /// `[limits]`.
    pub limits: Limits,
    /// `[engine]`.
    pub engine: EngineSettings,
    /// `[models]`.
    pub models: ModelSettings,
    /// `[preprocessing]`.
    pub preprocessing: PreprocessingSettings,
    /// `[telemetry]`.
    pub telemetry: TelemetrySettings,
}

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Loads the defaults, then `file`, then `SDXLD__*` variables, and checks the values.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "file `{}` does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("SDXLD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("models.base_roots")
                .with_list_parse_key("models.refiner_roots")
                .with_list_parse_key("models.vae_roots")
                .with_list_parse_key("models.lora_roots")
                .with_list_parse_key("models.controlnet_roots")
                .with_list_parse_key("models.upscaler_roots")
                .with_list_parse_key("models.preprocessor_roots")
                .with_list_parse_key("models.embedding_roots")
                .with_list_parse_key("models.ip_adapter_roots")
                .with_list_parse_key("models.image_encoder_roots")
                .with_list_parse_key("server.tokens"),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.check()?;
        Ok(settings)
    }

    /// Checks values the types alone do not.
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("`{key}` {why}")));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "server.listen",
                format!(
                    "must be host:port with an IP address, got {:?}",
                    self.server.listen
                ),
            );
        }
        if !self.server.metrics_listen.is_empty()
            && self.server.metrics_listen.parse::<SocketAddr>().is_err()
        {
            return bad(
                "server.metrics_listen",
                format!(
                    "must be host:port or \"\", got {:?}",
                    self.server.metrics_listen
                ),
            );
        }
        self.check_security()?;
        if self.server.max_request_bytes < 1024 {
            return bad("server.max_request_bytes", "must be at least 1024".into());
        }
        if self.server.stalled_client_timeout_seconds == 0 {
            return bad(
                "server.stalled_client_timeout_seconds",
                "must be at least 1".into(),
            );
        }
        if self.jobs.max_queued == 0 {
            return bad("jobs.max_queued", "must be at least 1".into());
        }
        if self.jobs.stream_buffer == 0 {
            return bad("jobs.stream_buffer", "must be at least 1".into());
        }
        for (key, value) in [
            ("limits.max_width", self.limits.max_width),
            ("limits.max_height", self.limits.max_height),
        ] {
            if value < 64 || value % 8 != 0 {
                return bad(
                    key,
                    format!("must be a multiple of 8 of at least 64, got {value}"),
                );
            }
        }
        if self.limits.max_steps == 0 || self.limits.max_num_images == 0 {
            return bad(
                "limits.max_steps",
                "and limits.max_num_images must be at least 1".into(),
            );
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return bad(
                "telemetry.log_format",
                format!("must be text or json, got {:?}", self.telemetry.log_format),
            );
        }
        if !matches!(
            self.engine.dtype.as_str(),
            "auto" | "float32" | "float16" | "bfloat16"
        ) {
            return bad(
                "engine.dtype",
                format!(
                    "must be auto, float32, float16 or bfloat16, got {:?}",
                    self.engine.dtype
                ),
            );
        }
        for (key, name) in self.preprocessing.all() {
            let checked = crate::engine::registry::check_name(name);
            if let (false, Err(e)) = (name.is_empty(), checked) {
                return bad(key, format!("is not a model name: {e}"));
            }
        }
        let fraction = self.engine.cuda_memory_fraction;
        if !(0.0..=1.0).contains(&fraction) {
            return bad(
                "engine.cuda_memory_fraction",
                format!("must be between 0 and 1, got {fraction}"),
            );
        }
        Ok(())
    }
}

impl Settings {
    /// `server.tls.*` and `server.health_listen`.
    fn check_security(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("`{key}` {why}")));
        let tls = &self.server.tls;
        if tls.cert.is_empty() != tls.key.is_empty() {
            return bad("server.tls.key", "and server.tls.cert must be set together");
        }
        if !matches!(tls.client_auth.as_str(), "none" | "optional" | "required") {
            return bad(
                "server.tls.client_auth",
                &format!(
                    "must be none, optional or required, got {:?}",
                    tls.client_auth
                ),
            );
        }
        if tls.client_auth != "none" && (tls.client_ca.is_empty() || !tls.enabled()) {
            return bad(
                "server.tls.client_auth",
                "needs server.tls.client_ca and a server certificate",
            );
        }
        let health = &self.server.health_listen;
        if !health.is_empty() && health.parse::<SocketAddr>().is_err() {
            return bad(
                "server.health_listen",
                &format!("must be host:port or \"\", got {health:?}"),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load() {
        let s = Settings::load(None).expect("defaults are valid");
        assert_eq!(s.jobs.max_queued, 16);
        assert_eq!(s.server.listen, "127.0.0.1:50051");
    }

    #[test]
    fn a_bad_file_value_names_the_key() {
        let dir = std::env::temp_dir().join(format!("sdxld-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[jobs]\nmax_queued = \"many\"\n").expect("write");
        let err = Settings::load(Some(&path))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("max_queued"), "{err}");
        std::fs::write(&path, "[server]\nlisten = \"nowhere\"\n").expect("write");
        let err = Settings::load(Some(&path))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
        std::fs::write(&path, "[server]\nlisen = \"127.0.0.1:1\"\n").expect("write");
        let err = Settings::load(Some(&path))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }
}
