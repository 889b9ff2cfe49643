//! `sdxld serve`: the worker thread, the gRPC server with its middleware, health,
//! reflection, metrics, and a graceful drain on SIGTERM.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tonic::codegen::http;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::api::admission::AdmissionLayer;
use crate::api::generation::Generation;
use crate::api::models::Models;
use crate::api::ApiState;
use crate::config::Settings;
use crate::engine::pipeline::Placement;
use crate::engine::registry::{ModelEntry, ModelFormat, ModelKind, Registry};
use crate::jobs::worker::{run_worker, Engine};
use crate::jobs::{JobQueue, StopReason};
use crate::proto::v1::generation_service_server::GenerationServiceServer;
use crate::proto::v1::model_service_server::ModelServiceServer;
use crate::telemetry::Metrics;

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
    Placement::parse(device, dtype)
        .map_err(|e| anyhow!("configuration: `engine.device`/`engine.dtype`: {e}"))
}

/// The default model: `--model` or `engine.default_model` (a name under a root or a
/// folder), else the built-in demo model, written on first use.
fn default_model(settings: &Settings, model: Option<&str>) -> anyhow::Result<ModelEntry> {
    let wanted = model
        .map(str::to_string)
        .unwrap_or_else(|| settings.engine.default_model.clone());
    if wanted.is_empty() {
        let dir = if settings.engine.demo_model_dir.is_empty() {
            cache_dir().join("demo-model")
        } else {
            PathBuf::from(&settings.engine.demo_model_dir)
        };
        if !dir.join("model_index.json").is_file() {
            tracing::info!(dir = %dir.display(), "writing the built-in demo model");
            let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
            crate::engine::demo::write_demo_model(&tmp, 0)?;
            // Another process may have written it meanwhile: theirs is identical.
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.join("model_index.json").is_file() {
                    return Err(anyhow!("cannot write the demo model to {}", dir.display()));
                }
            }
        }
        return ModelEntry::from_folder("demo", &dir)
            .ok_or_else(|| anyhow!("{} is not a diffusers folder", dir.display()));
    }
    let path = Path::new(&wanted);
    if path.is_dir() || path.is_file() {
        let name = path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into());
        return ModelEntry::from_folder(&name, path).ok_or_else(|| {
            anyhow!("`{wanted}` is neither a diffusers folder nor a single-file SDXL checkpoint")
        });
    }
    let registry = Registry::new(
        settings.models.roots(),
        ModelEntry {
            name: String::new(),
            kind: ModelKind::Base,
            format: ModelFormat::Diffusers,
            path: PathBuf::new(),
            default_size: 1024,
            size_bytes: 0,
        },
    );
    registry
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
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

/// Runs the server until SIGTERM or SIGINT, then drains.
pub async fn serve(settings: Settings, model: Option<&str>) -> anyhow::Result<()> {
    let placement = placement(&settings)?;
    let default = default_model(&settings, model)?;
    let registry = Arc::new(Registry::new(settings.models.roots(), default.clone()));
    let metrics = Metrics::new();
    let queue = JobQueue::new(settings.jobs.max_queued);
    let resident = Arc::new(Mutex::new(HashSet::new()));
    let device = match placement.device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let dtype = match placement.kind {
        tch::Kind::Half => "float16",
        tch::Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
    .to_string();

    // Health: live now, ready after the default model is loaded and warmed up.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;

    // The worker thread owns the device.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let worker = {
        let queue = queue.clone();
        let metrics = metrics.clone();
        let resident = resident.clone();
        let default = default.clone();
        let warmup = settings.engine.warmup;
        let budget = Some(settings.engine.memory_budget_bytes).filter(|b| *b > 0);
        let fraction = settings.engine.cuda_memory_fraction;
        let host_budget = settings.engine.host_memory_budget_bytes;
        let lora_mode = settings.engine.lora_mode;
        std::thread::Builder::new()
            .name("sdxld-engine".into())
            .spawn(move || {
                if fraction > 0.0
                    && !crate::engine::cuda::set_memory_fraction(placement.device, fraction)
                {
                    tracing::warn!(fraction, "engine.cuda_memory_fraction applies only on CUDA");
                }
                let mut engine =
                    Engine::new(placement, budget, host_budget, resident).with_lora_mode(lora_mode);
                let result = if warmup {
                    engine.warm_up(&default)
                } else {
                    engine.pipeline(&default).map(|_| ())
                };
                let ok = result.is_ok();
                let _ = ready_tx.send(result);
                if ok {
                    run_worker(queue, engine, metrics);
                }
            })
            .context("starting the engine thread")?
    };

    let state = Arc::new(ApiState {
        queue: queue.clone(),
        registry,
        settings: settings.clone(),
        metrics: metrics.clone(),
        device,
        dtype,
        resident,
    });
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
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
    if !settings.server.metrics_listen.is_empty() {
        match tokio::net::TcpListener::bind(&settings.server.metrics_listen).await {
            Ok(l) => {
                if let Ok(a) = l.local_addr() {
                    println!("sdxld metrics on http://{a}/metrics");
                }
                tokio::spawn(crate::telemetry::serve_metrics(l, metrics.clone()));
            }
            Err(e) => {
                tracing::warn!(address = %settings.server.metrics_listen, error = %e, "metrics endpoint disabled")
            }
        }
    }
    println!("sdxld listening on {local}");
    tracing::info!(address = %local, model = %default.name, device = %state.device, dtype = %state.dtype, "listening");

    // Readiness once the warm-up is done; a failed warm-up stops the server.
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    {
        let health = health.clone();
        tokio::spawn(async move {
            match ready_rx.await {
                Ok(Ok(())) => {
                    health
                        .set_service_status(READINESS_SERVICE, ServingStatus::Serving)
                        .await;
                    tracing::info!("ready");
                }
                Ok(Err(e)) => {
                    let _ = fatal_tx
                        .send(format!("loading the default model failed: {e}"))
                        .await;
                }
                Err(_) => {
                    let _ = fatal_tx
                        .send("the engine thread ended during start-up".into())
                        .await;
                }
            }
        });
    }

    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    let drain_queue = queue.clone();
    let drain_health = health.clone();
    let fatal = Arc::new(Mutex::new(None::<String>));
    let fatal_slot = fatal.clone();
    let shutdown = async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
            Some(message) = fatal_rx.recv() => {
                tracing::error!(%message, "stopping");
                if let Ok(mut slot) = fatal_slot.lock() {
                    *slot = Some(message);
                }
                drain_queue.stop_accepting();
                return;
            }
        }
        drain_health
            .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
            .await;
        drain_queue.stop_accepting();
        let start = Instant::now();
        while drain_queue.in_flight() > 0 && start.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if drain_queue.in_flight() > 0 {
            tracing::warn!(
                jobs = drain_queue.in_flight(),
                "grace period over: aborting jobs"
            );
            drain_queue.stop_all(StopReason::ShuttingDown);
            let abort_start = Instant::now();
            while drain_queue.in_flight() > 0 && abort_start.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Let the final statuses reach their clients.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    Server::builder()
        .trace_fn(rpc_span)
        .layer(AdmissionLayer::new(
            queue.clone(),
            Duration::from_millis(settings.jobs.retry_after_ms),
            metrics.clone(),
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
    tracing::info!(
        admitted = counters.admitted.load(std::sync::atomic::Ordering::SeqCst),
        completed = counters.completed.load(std::sync::atomic::Ordering::SeqCst),
        stopped = counters.stopped.load(std::sync::atomic::Ordering::SeqCst),
        failed = counters.failed.load(std::sync::atomic::Ordering::SeqCst),
        "stopped"
    );
    let fatal = fatal.lock().ok().and_then(|f| f.clone());
    match fatal {
        Some(message) => Err(anyhow!(message)),
        None => Ok(()),
    }
}
