//! `sdxld serve`: the engine thread, the gRPC server with its middleware, health,
//! reflection, metrics, and a graceful drain on SIGTERM.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tonic::codegen::http;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::admission::AdmissionLayer;
use crate::api::auth::{Access, AccessLayer};
use crate::api::generation::Generation;
use crate::api::guard::CallGuardLayer;
use crate::api::models::Models;
use crate::api::redact::Redactor;
use crate::api::rpc_metrics::RpcMetricsLayer;
use crate::api::tls::server_tls;
use crate::api::ApiState;
use crate::config::Settings;
use crate::engine::device::{self, Placement};
use crate::engine::error::EngineError;
use crate::engine::hashes::FileHashes;
use crate::engine::registry::{ModelEntry, ModelFormat, ModelKind, Registry};
use crate::engine::sdpa::{self, AttentionBackend};
use crate::engine::weights::WeightLayout;
use crate::jobs::engine::Engine;
use crate::jobs::worker::run_worker;
use crate::jobs::{JobQueue, StopReason};
use crate::proto::v1::generation_service_server::GenerationServiceServer;
use crate::proto::v1::model_service_server::ModelServiceServer;
use crate::telemetry::Metrics;

/// The HTTP/2 header list a call may send, in bytes.
const MAX_HEADER_LIST_BYTES: u32 = 256 << 10;

/// The gRPC service name whose health means "ready for generations".
pub const READINESS_SERVICE: &str = "sdxld.v1.GenerationService";

/// The cache folder (`SDXLD_CACHE`, else ~/.cache/sdxld).
pub fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SDXLD_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|_| std::env::temp_dir());
    base.join("sdxld")
}

/// The device and precision the configuration asks for.
pub fn placement(settings: &Settings) -> anyhow::Result<Placement> {
    let device = settings.engine.device.as_str();
    let on_cuda = match device {
        "auto" => tch::Cuda::is_available(),
        "cpu" => false,
        _ => true,
    };
    let dtype = match settings.engine.dtype.as_str() {
        "auto" if on_cuda => "float16",
        "auto" => "float32",
        other => other,
    };
    let layout = WeightLayout {
        channels_last: settings.engine.channels_last,
        fused_projections: settings.engine.fused_projections,
    };
    Placement::parse(device, dtype)
        .map(|placement| {
            placement
                .with_layout(layout)
                .with_cuda_graphs(settings.engine.cuda_graphs)
                .with_vae_band_rows(settings.engine.vae_band_rows)
        })
        .map_err(|e| anyhow!("configuration: `engine.device`/`engine.dtype`: {e}"))
}

/// The built-in demo model, written to `dir` on first use.
fn demo_model(dir: &Path) -> anyhow::Result<ModelEntry> {
    if !dir.join("model_index.json").is_file() {
        tracing::info!(dir = %dir.display(), "writing the built-in demo model");
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        crate::engine::demo::write_demo_model(&tmp, 0)?;
        // Another process may have written it meanwhile: theirs is identical.
        if std::fs::rename(&tmp, dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dir.join("model_index.json").is_file() {
                return Err(anyhow!("cannot write the demo model to {}", dir.display()));
            }
        }
    }
    ModelEntry::from_folder("demo", dir)
        .ok_or_else(|| anyhow!("{} is not a diffusers folder", dir.display()))
}

/// The default model: `--model` or `engine.default_model` (a name under a root or a
/// folder), else the built-in demo model, written on first use.
pub fn default_model(settings: &Settings, model: Option<&str>) -> anyhow::Result<ModelEntry> {
    let wanted = model
        .map(str::to_string)
        .unwrap_or_else(|| settings.engine.default_model.clone());
    if wanted.is_empty() {
        let dir = if settings.engine.demo_model_dir.is_empty() {
            cache_dir().join("demo-model")
        } else {
            PathBuf::from(&settings.engine.demo_model_dir)
        };
        return demo_model(&dir);
    }
    let path = Path::new(&wanted);
    if path.is_dir() || path.is_file() {
        return ModelEntry::from_path(path).ok_or_else(|| {
            anyhow!("`{wanted}` is neither a diffusers folder nor a single-file SDXL checkpoint")
        });
    }
    let placeholder = ModelEntry {
        name: String::new(),
        kind: ModelKind::Base,
        format: ModelFormat::Diffusers,
        path: PathBuf::new(),
        size_bytes: 0,
        pipeline: None,
        controlnet: None,
        upscaler: None,
    };
    Registry::new(settings.models.roots(), placeholder)
        .resolve(&wanted)
        .map_err(|e| anyhow!("configuration: `engine.default_model`: {e}"))
}

/// A W3C trace-context extractor over HTTP headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One span per RPC, named after the method, child of the caller's `traceparent`.
fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or(("", path));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        enduser.id = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

/// How the engine's start-up went: the default model loaded and warmed up, or why not.
type Readiness = tokio::sync::oneshot::Receiver<Result<(), EngineError>>;

/// Starts the engine thread: it loads (and warms up) the default model, reports the
/// outcome through the returned channel, then runs the worker loop.
fn start_engine(
    settings: &Settings,
    placement: Placement,
    default: ModelEntry,
    state: &ApiState,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(std::thread::JoinHandle<()>, Readiness)> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let queue = state.queue.clone();
    let hashes = state.hashes.clone();
    let resident = state.resident.clone();
    let engine = settings.engine.clone();
    let stall = Duration::from_secs(settings.server.stalled_client_timeout_seconds);
    let handle = std::thread::Builder::new()
        .name("sdxld-engine".into())
        .spawn(move || {
            if engine.cudnn_benchmark {
                tch::Cuda::cudnn_set_benchmark(true);
            }
            let attention = engine.attention_backend;
            if !sdpa::set_attention_backend(attention) && attention != AttentionBackend::Flash {
                tracing::warn!(
                    ?attention,
                    "engine.attention_backend: this build cannot set it"
                );
            }
            let fraction = engine.cuda_memory_fraction;
            if fraction > 0.0 && !device::set_memory_fraction(placement.device, fraction) {
                tracing::warn!(fraction, "engine.cuda_memory_fraction applies only on CUDA");
            }
            let budget = Some(engine.memory_budget_bytes).filter(|b| *b > 0);
            let host_budget = engine.host_memory_budget_bytes;
            let mut worker = Engine::new(placement, budget, host_budget, hashes, resident)
                .with_lora_mode(engine.lora_mode);
            let result = if engine.warmup {
                worker.warm_up(&default)
            } else {
                worker.load(&default)
            };
            let ok = result.is_ok();
            let _ = ready_tx.send(result);
            if ok {
                run_worker(queue, worker, metrics, stall);
            }
        })
        .context("starting the engine thread")?;
    Ok((handle, ready_rx))
}

/// Marks the server ready once the engine reports its warm-up done; a failed warm-up is
/// sent to `fatal`.
fn report_readiness(
    ready: Readiness,
    health: HealthReporter,
    fatal: tokio::sync::mpsc::Sender<String>,
) {
    tokio::spawn(async move {
        let message = match ready.await {
            Ok(Ok(())) => {
                health
                    .set_service_status(READINESS_SERVICE, ServingStatus::Serving)
                    .await;
                tracing::info!("ready");
                return;
            }
            Ok(Err(e)) => format!("loading the default model failed: {e}"),
            Err(_) => "the engine thread ended during start-up".to_string(),
        };
        let _ = fatal.send(message).await;
    });
}

/// Serves the health service alone, in plaintext, when `server.health_listen` is set
/// (kubelet probes speak neither TLS nor tokens).
async fn start_health_endpoint<S>(settings: &Settings, health: S) -> anyhow::Result<()>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let address = &settings.server.health_listen;
    if address.is_empty() {
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("configuration: `server.health_listen`: binding {address}"))?;
    println!("sdxld health on {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let served = Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the health endpoint stopped");
        }
    });
    Ok(())
}

/// Serves `/metrics` when an address is configured.
async fn start_metrics_endpoint(settings: &Settings, metrics: &Arc<Metrics>) {
    let address = &settings.server.metrics_listen;
    if address.is_empty() {
        return;
    }
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            if let Ok(a) = listener.local_addr() {
                println!("sdxld metrics on http://{a}/metrics");
            }
            tokio::spawn(crate::telemetry::serve_metrics(listener, metrics.clone()));
        }
        Err(e) => tracing::warn!(%address, error = %e, "metrics endpoint disabled"),
    }
}

/// Resolves on SIGTERM or SIGINT after draining (in-flight jobs get `grace` to finish,
/// then are stopped), or at once on a fatal start-up error, which goes to `fatal_slot`.
async fn drain_on_signal(
    queue: Arc<JobQueue>,
    health: HealthReporter,
    grace: Duration,
    mut fatal: tokio::sync::mpsc::Receiver<String>,
    fatal_slot: Arc<Mutex<Option<String>>>,
) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
        Some(message) = fatal.recv() => {
            tracing::error!(%message, "stopping");
            if let Ok(mut slot) = fatal_slot.lock() {
                *slot = Some(message);
            }
            queue.stop_accepting();
            return;
        }
    }
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    queue.stop_accepting();
    let start = Instant::now();
    while queue.in_flight() > 0 && start.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if queue.in_flight() > 0 {
        tracing::warn!(jobs = queue.in_flight(), "grace period over: aborting jobs");
        queue.stop_all(StopReason::ShuttingDown);
        let abort_start = Instant::now();
        while queue.in_flight() > 0 && abort_start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let the final statuses reach their clients.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The shared state of the services.
fn api_state(
    settings: &Settings,
    placement: Placement,
    default: ModelEntry,
    metrics: &Arc<Metrics>,
) -> Arc<ApiState> {
    let roots = settings.models.roots();
    let redactor = Redactor::new(&roots.all(), (&default.path, &default.name));
    Arc::new(ApiState {
        queue: JobQueue::new(settings.jobs.max_queued, metrics.clone()),
        registry: Arc::new(Registry::new(roots, default)),
        redactor,
        hashes: FileHashes::new(),
        settings: settings.clone(),
        device: placement.device_name(),
        dtype: placement.dtype_name().to_string(),
        resident: Arc::new(Mutex::new(HashSet::new())),
        preprocess_slots: crate::api::preprocess::slots(),
    })
}

/// Runs the server until SIGTERM or SIGINT, then drains.
pub async fn serve(settings: Settings, model: Option<&str>) -> anyhow::Result<()> {
    let placement = placement(&settings)?;
    let access = Access::from_settings(&settings.server)?;
    let tls = server_tls(&settings.server.tls)?;
    let default = default_model(&settings, model)?;
    let metrics = Metrics::new();
    let state = api_state(&settings, placement, default.clone(), &metrics);
    let queue = state.queue.clone();

    // Health: live now, ready after the default model is loaded and warmed up.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    let (worker, ready) = start_engine(
        &settings,
        placement,
        default.clone(),
        &state,
        metrics.clone(),
    )?;

    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection_builder()
        .build_v1()
        .context("building reflection")?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .context("building reflection")?;
    let generation = GenerationServiceServer::new(Generation::new(state.clone()))
        .max_decoding_message_size(settings.server.max_request_bytes)
        .max_encoding_message_size(settings.server.max_response_bytes);
    let models = ModelServiceServer::new(Models::new(state.clone()))
        .max_decoding_message_size(settings.server.max_request_bytes);

    let addr: SocketAddr = settings
        .server
        .listen
        .parse()
        .context("configuration: `server.listen`")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    start_metrics_endpoint(&settings, &metrics).await;
    start_health_endpoint(&settings, health_service.clone()).await?;
    println!("sdxld listening on {local}");
    tracing::info!(address = %local, model = %default.name, device = %state.device, dtype = %state.dtype, tls = tls.is_some(), client_auth = %settings.server.tls.client_auth, "listening");
    tracing::info!(access = %access.describe(), "access");

    // Readiness once the warm-up is done; a failed warm-up stops the server.
    let (fatal_tx, fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    report_readiness(ready, health.clone(), fatal_tx);
    let fatal = Arc::new(Mutex::new(None::<String>));
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    let shutdown = drain_on_signal(queue.clone(), health, grace, fatal_rx, fatal.clone());

    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    builder
        .trace_fn(rpc_span)
        // Headers up to this size are decoded (a larger list fails its call alone, with
        // 431/REFUSED_STREAM); below it, one huge header value would make h2 close the
        // whole connection to keep its HPACK state (GOAWAY COMPRESSION_ERROR).
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        // Outermost: every call is counted, those refused by admission included.
        .layer(RpcMetricsLayer::new(metrics.clone()))
        .layer(CallGuardLayer)
        // Before admission: a call that may not run takes no place.
        .layer(AccessLayer::new(access))
        .layer(AdmissionLayer::new(
            queue.clone(),
            Duration::from_millis(settings.jobs.retry_after_ms),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(generation)
        .add_service(models)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small event messages wait for delayed ACKs (~40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .context("serving")?;

    queue.close();
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    let counters = &queue.counters;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    tracing::info!(
        admitted = count(&counters.admitted),
        completed = count(&counters.completed),
        stopped = count(&counters.stopped),
        failed = count(&counters.failed),
        "stopped"
    );
    let fatal = fatal.lock().ok().and_then(|f| f.clone());
    match fatal {
        Some(message) => Err(anyhow!(message)),
        None => Ok(()),
    }
}
