//! What leaves the process about its work: RPC counts (also of calls refused before a
//! handler runs), the queue depth gauge, and the trace of a job (its span a child of the
//! RPC's, which continues the caller's `traceparent`), received by an OTLP collector the
//! test runs itself.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::{quick_spec, slow_spec, TestServer};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use sdxld::proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

/// Polls `condition` for up to 20 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_a_handler_runs_are_counted_with_their_code() {
    let server = TestServer::start(&[("SDXLD__JOBS__MAX_QUEUED", "1")]).await;
    let mut client = server.generation().await;
    let count = |method: &str, code: &str| {
        let prefix = format!("sdxld_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}}");
        server.metric(&prefix)
    };
    // A bad request: refused by validation.
    let mut bad = quick_spec(1);
    bad.width = 65;
    client
        .generate_images(pb::GenerateImagesRequest { spec: Some(bad) })
        .await
        .expect_err("invalid");
    // A full queue: refused by the admission layer, before the service.
    let mut blocker = slow_spec(2);
    blocker.client_job_id = "blocker".into();
    let mut stream = server.admitted(blocker).await;
    let full = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(3)),
        })
        .await
        .expect_err("the queue is full");
    assert_eq!(full.code(), Code::ResourceExhausted);
    // An early exit in the models service.
    let mut models = server.models().await;
    models
        .list_models(pb::ListModelsRequest { kind: 99 })
        .await
        .expect_err("unknown kind");
    models
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("capabilities");
    client
        .cancel_job(pb::CancelJobRequest {
            client_job_id: "blocker".into(),
            ..Default::default()
        })
        .await
        .expect("cancel");
    while stream.next().await.is_some() {}
    eventually("every call counted", || {
        count("GenerateImages", "InvalidArgument") == 1.0
            && count("GenerateImages", "ResourceExhausted") == 1.0
            && count("ListModels", "InvalidArgument") == 1.0
            && count("GetCapabilities", "Ok") == 1.0
            && count("Generate", "Cancelled") == 1.0
            && count("CancelJob", "Ok") == 1.0
    })
    .await;
    let text = server.metrics();
    assert!(
        text.contains("sdxld_rpc_duration_seconds_count{method=\"GenerateImages\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_job_updates_the_queue_depth_at_once() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    let mut running = Vec::new();
    for (i, id) in ["running", "queued"].into_iter().enumerate() {
        let mut spec = slow_spec(i as u64);
        spec.client_job_id = id.into();
        running.push(server.admitted(spec).await);
    }
    let depth = || server.metric("sdxld_queue_depth_jobs");
    eventually("two jobs in the gauge", || depth() == 2.0).await;
    client
        .cancel_job(pb::CancelJobRequest {
            client_job_id: "queued".into(),
            ..Default::default()
        })
        .await
        .expect("cancel");
    // The running job is still running: only the queued one's place was freed.
    eventually("the cancelled job out of the gauge", || depth() == 1.0).await;
    client
        .cancel_job(pb::CancelJobRequest {
            client_job_id: "running".into(),
            ..Default::default()
        })
        .await
        .expect("cancel");
    eventually("an empty queue", || depth() == 0.0).await;
}

/// An OTLP trace collector that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_spans_are_children_of_the_rpc_that_continues_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{address}");
    let server = TestServer::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::GenerateImagesRequest {
        spec: Some(quick_spec(7)),
    });
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    let mut client = server.generation().await;
    client.generate_images(request).await.expect("generates");

    let spans = collector.spans.clone();
    let named = |name: &str| -> Option<Span> {
        let spans = spans.lock().expect("spans");
        spans
            .iter()
            .find(|s| s.name == name && hex(&s.trace_id) == trace_id)
            .cloned()
    };
    eventually("the job's spans exported", || {
        named("sdxld.job").is_some() && named("decoding").is_some()
    })
    .await;
    let rpc = named("sdxld.v1.GenerationService/GenerateImages").expect("the RPC span");
    assert_eq!(
        hex(&rpc.parent_span_id),
        caller_span,
        "the RPC continues the caller"
    );
    let job = named("sdxld.job").expect("the job span");
    assert_eq!(
        hex(&job.parent_span_id),
        hex(&rpc.span_id),
        "the job is the RPC's child"
    );
    for stage in ["loading_models", "encoding_prompt", "denoising", "decoding"] {
        let span = named(stage).unwrap_or_else(|| panic!("no {stage} span"));
        assert_eq!(
            hex(&span.parent_span_id),
            hex(&job.span_id),
            "{stage} is the job's child"
        );
    }
    let denoising = named("denoising").expect("denoising");
    assert!(
        denoising.attributes.iter().any(|a| a.key == "steps"),
        "{:?}",
        denoising.attributes
    );
}

/// The string value of a span's attribute `key`.
fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .clone()?;
    match value.value? {
        Value::StringValue(s) => Some(s),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_tls_collector_with_identity_stages_failures_and_a_flush_on_sigterm() {
    use common::certs::{write, Ca};
    use tonic::transport::{Identity, ServerTlsConfig};

    // A collector behind TLS, its CA given to the exporter as the OTLP spec's variable.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("collector CA");
    let (cert, key) = ca.sign("collector", &["localhost"]);
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("tls")
        .add_service(TraceServiceServer::new(collector.clone()));
    tokio::spawn(
        server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let root = common::broken_model_root();
    let endpoint = format!("https://localhost:{port}");
    let mut sdxld = TestServer::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_path.as_str()),
        // No periodic export: what arrives was flushed at shutdown.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("SDXLD__SERVER__TOKENS", "alice:generate:a-secret"),
        (
            "SDXLD__MODELS__BASE_ROOTS",
            root.path().to_str().expect("utf-8"),
        ),
    ])
    .await;
    let (done, failed) = (
        "5bf92f3577b34da6a3ce929d0e0e4736",
        "6bf92f3577b34da6a3ce929d0e0e4736",
    );
    let mut client = sdxld.generation().await;
    for (trace, model) in [(done, ""), (failed, "broken")] {
        let mut spec = quick_spec(3);
        spec.model = model.into();
        let mut request = tonic::Request::new(pb::GenerateImagesRequest { spec: Some(spec) });
        let metadata = request.metadata_mut();
        let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
        metadata.insert("traceparent", traceparent.parse().expect("ascii"));
        metadata.insert("authorization", "Bearer a-secret".parse().expect("ascii"));
        let result = client.generate_images(request).await;
        assert_eq!(result.is_ok(), model.is_empty(), "{model}: {result:?}");
    }
    assert!(
        collector.spans.lock().expect("spans").is_empty(),
        "nothing exported yet"
    );
    sdxld.terminate();
    let exit = tokio::task::spawn_blocking(move || sdxld.child.wait())
        .await
        .expect("join")
        .expect("exit");
    assert!(exit.success(), "{exit:?}");

    let spans = collector.spans.lock().expect("spans").clone();
    let named = |trace: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && hex(&s.trace_id) == trace)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} span in trace {trace}"))
    };
    let rpc = named(done, "sdxld.v1.GenerationService/GenerateImages");
    assert_eq!(
        attribute(&rpc, "enduser.id").as_deref(),
        Some("token:alice")
    );
    assert_eq!(
        attribute(&rpc, "rpc.method").as_deref(),
        Some("GenerateImages")
    );
    let job = named(done, "sdxld.job");
    assert_eq!(hex(&job.parent_span_id), hex(&rpc.span_id));
    let denoising = named(done, "denoising");
    assert_eq!(hex(&denoising.parent_span_id), hex(&job.span_id));
    for (key, value) in [("steps", "2"), ("width", "64"), ("height", "64")] {
        assert_eq!(attribute(&denoising, key).as_deref(), Some(value), "{key}");
    }
    let broken = named(failed, "sdxld.job");
    let status = broken.status.expect("a status");
    assert_eq!(status.code, 2, "ERROR: {status:?}");
    assert!(status.message.contains("broken"), "{}", status.message);
}
