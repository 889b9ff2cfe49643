//! RPC counts and durations as a tower layer: every call is counted once with the
//! `grpc-status` it ended with, read from the response (trailers-only answers such as
//! refusals before a handler runs) or from the body's trailers (streams), so early exits
//! are counted like any other. A stream dropped before its trailers counts as CANCELLED.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tower::{Layer, Service};

use crate::telemetry::Metrics;

/// The methods counted by name; anything else counts as `other` (labels stay few).
const METHODS: [&str; 12] = [
    "Generate",
    "GenerateImages",
    "Upscale",
    "Preprocess",
    "CancelJob",
    "ListModels",
    "LoadModel",
    "UnloadModel",
    "GetCapabilities",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// The layer.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Records one call when told its status, or as CANCELLED when dropped first.
struct Recorder {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Recorder {
    fn record(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            self.metrics
                .rpc_finished(self.method, code, self.started.elapsed());
        }
    }

    /// Records the status a header map carries, if it carries one.
    fn record_from(&mut self, headers: &http::HeaderMap) -> bool {
        match headers.get("grpc-status") {
            Some(value) => {
                self.record(tonic::Code::from_bytes(value.as_bytes()));
                true
            }
            None => false,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// A response body that records the status in its trailers.
struct MeteredBody {
    inner: tonic::body::Body,
    recorder: Recorder,
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.recorder.record_from(trailers);
                }
            }
            Poll::Ready(Some(Err(status))) => this.recorder.record(status.code()),
            Poll::Ready(None) => this.recorder.record(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let name = request.uri().path().rsplit('/').next().unwrap_or_default();
        let method = METHODS
            .iter()
            .find(|m| **m == name)
            .copied()
            .unwrap_or("other");
        let mut recorder = Recorder {
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
            done: false,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // A trailers-only answer (any status before the first message) carries the
            // status in its headers.
            if recorder.record_from(response.headers()) {
                return Ok(response);
            }
            let (parts, inner) = response.into_parts();
            let body = MeteredBody { inner, recorder };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}
