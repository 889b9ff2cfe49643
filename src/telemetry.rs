//! Logs, traces (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set) and Prometheus metrics.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// TLS for an `https://` OTLP endpoint: the platform's roots plus the CA of
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`, and the client certificate and key of
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` / `_CLIENT_KEY` (the OTLP exporter spec's
/// variables).
fn otlp_tls() -> Option<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    if !endpoint.starts_with("https://") {
        return None;
    }
    let read = |name: &str| {
        let path = var(name)?;
        std::fs::read(&path)
            .map_err(|e| eprintln!("{name}: cannot read {path}: {e}"))
            .ok()
    };
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = read("OTEL_EXPORTER_OTLP_CERTIFICATE") {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    let client = (
        read("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
        read("OTEL_EXPORTER_OTLP_CLIENT_KEY"),
    );
    if let (Some(cert), Some(key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Some(tls)
}

/// Installs the global subscriber: text or JSON logs, plus OTLP spans when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. h2, hyper, tower and tonic log at warn so the
/// exporter does not trace itself.
pub fn init_telemetry(format: &str, level: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level))
        .add_directive("h2=warn".parse().expect("static directive"))
        .add_directive("hyper=warn".parse().expect("static directive"))
        .add_directive("tower=warn".parse().expect("static directive"))
        .add_directive("tonic=warn".parse().expect("static directive"));
    let provider = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .and_then(|_| {
            use opentelemetry_otlp::WithTonicConfig;
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(tls) = otlp_tls() {
                builder = builder.with_tls_config(tls);
            }
            let exporter = builder
                .build()
                .map_err(|e| eprintln!("OTLP exporter disabled: {e}"))
                .ok()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("sdxld")
                .build();
            Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        });
    let otel_layer = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing_opentelemetry::layer().with_tracer(p.tracer("sdxld"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
    TelemetryGuard { provider }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

/// The service's Prometheus metrics (`sdxld_<area>_<what>_<unit>`, low-cardinality labels).
pub struct Metrics {
    registry: Registry,
    requests: Family<MethodCode, Counter>,
    rpc_seconds: Family<Method, Histogram>,
    failures: Family<Reason, Counter>,
    jobs_started: Counter,
    jobs_ended: Family<OutcomeLabel, Counter>,
    queue_depth: Gauge,
    step_seconds: Histogram,
    stage_seconds: Family<StageLabel, Histogram>,
    images: Counter,
    resident_bytes: Gauge,
    host_bytes: Gauge,
    component_loads: Counter,
    evictions: Counter,
    text_encoder_offloads: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<MethodCode, Counter>::default();
        registry.register(
            "sdxld_rpc_requests",
            "RPCs by method and status code",
            requests.clone(),
        );
        let rpc_seconds = Family::<Method, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
        });
        registry.register(
            "sdxld_rpc_duration_seconds",
            "RPC durations by method, until the final status",
            rpc_seconds.clone(),
        );
        let failures = Family::<Reason, Counter>::default();
        registry.register(
            "sdxld_job_failures",
            "Jobs that failed or stopped, by reason",
            failures.clone(),
        );
        let jobs_started = Counter::default();
        registry.register("sdxld_jobs_started", "Jobs admitted", jobs_started.clone());
        let jobs_ended = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "sdxld_jobs_ended",
            "Jobs ended, by outcome (completed, cancelled, dropped, deadline, shutdown, failed); at a quiet moment their sum is sdxld_jobs_started",
            jobs_ended.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "sdxld_queue_depth_jobs",
            "Jobs queued or running",
            queue_depth.clone(),
        );
        let buckets = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let step_seconds = Histogram::new(buckets);
        registry.register(
            "sdxld_denoise_step_duration_seconds",
            "Time per denoising step",
            step_seconds.clone(),
        );
        let stage_seconds = Family::<StageLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
        });
        registry.register(
            "sdxld_stage_duration_seconds",
            "Time per pipeline stage",
            stage_seconds.clone(),
        );
        let images = Counter::default();
        registry.register("sdxld_images_produced", "Images produced", images.clone());
        let resident_bytes = Gauge::default();
        registry.register(
            "sdxld_model_cache_resident_bytes",
            "Bytes of model components resident on the device",
            resident_bytes.clone(),
        );
        let host_bytes = Gauge::default();
        registry.register(
            "sdxld_model_cache_host_bytes",
            "Bytes of model components in host memory: evicted ones parked, and text encoders offloaded for a job",
            host_bytes.clone(),
        );
        let component_loads = Counter::default();
        registry.register(
            "sdxld_model_component_loads",
            "Model components (text encoders, UNets, VAEs) loaded from disk",
            component_loads.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "sdxld_model_evictions",
            "Models evicted to stay within the memory budget",
            evictions.clone(),
        );
        let text_encoder_offloads = Counter::default();
        registry.register(
            "sdxld_text_encoder_offloads",
            "Text encoders moved to the host once a job's prompts were encoded, so that the job fits the memory budget",
            text_encoder_offloads.clone(),
        );
        Arc::new(Self {
            resident_bytes,
            text_encoder_offloads,
            host_bytes,
            component_loads,
            evictions,
            registry,
            requests,
            rpc_seconds,
            failures,
            jobs_started,
            jobs_ended,
            queue_depth,
            step_seconds,
            stage_seconds,
            images,
        })
    }

    /// Publishes the model cache's state (counters advance to the cache's totals).
    pub fn set_cache(&self, stats: crate::engine::cache::CacheStats) {
        self.resident_bytes.set(stats.resident_bytes as i64);
        self.host_bytes.set(stats.host_bytes as i64);
        let loads = self.component_loads.get();
        self.component_loads
            .inc_by(stats.component_loads.saturating_sub(loads));
        let evictions = self.evictions.get();
        self.evictions
            .inc_by(stats.evictions.saturating_sub(evictions));
        let offloads = self.text_encoder_offloads.get();
        self.text_encoder_offloads
            .inc_by(stats.text_encoder_offloads.saturating_sub(offloads));
    }

    /// Counts one finished RPC and its duration.
    pub fn rpc_finished(&self, method: &str, code: tonic::Code, duration: Duration) {
        self.requests
            .get_or_create(&MethodCode {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.rpc_seconds
            .get_or_create(&Method {
                method: method.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts an admitted job.
    pub fn job_started(&self) {
        self.jobs_started.inc();
    }

    /// Counts a job's end by outcome, and a failed or stopped one by its reason.
    pub fn job_ended(&self, outcome: &str, reason: Option<&str>) {
        self.jobs_ended
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(reason) = reason {
            self.failures
                .get_or_create(&Reason {
                    reason: reason.to_string(),
                })
                .inc();
        }
    }

    /// Sets the queue depth.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }

    /// Records one denoising step.
    pub fn observe_step(&self, duration: Duration) {
        self.step_seconds.observe(duration.as_secs_f64());
    }

    /// Records one stage (by its label: `denoising`, `decoding`, ...).
    pub fn observe_stage(&self, stage: &str, duration: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts one image.
    pub fn image_produced(&self) {
        self.images.inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` over HTTP/1.1 on `listener` until the process ends.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buffer[..n]);
            let response = if request.starts_with("GET /metrics") {
                let body = metrics.encode();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
