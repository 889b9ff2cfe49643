//! Global admission as tower middleware: generation RPCs take a place in the job bound
//! before anything else runs, across all connections; beyond it they are answered
//! RESOURCE_EXHAUSTED with RetryInfo at once (and counted by the RPC metrics layer).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tower::{Layer, Service};

use crate::api::status::ApiError;
use crate::jobs::{JobQueue, QueuePlace};

/// A place in the job bound, handed to the RPC handler through request extensions.
#[derive(Clone)]
pub struct AdmissionPermit(Arc<Mutex<Option<QueuePlace>>>);

impl AdmissionPermit {
    /// Takes the place out (once).
    pub fn take(&self) -> Option<QueuePlace> {
        self.0.lock().ok().and_then(|mut p| p.take())
    }
}

/// Paths of the RPCs that create jobs.
const JOB_PATHS: [&str; 3] = [
    "/sdxld.v1.GenerationService/Generate",
    "/sdxld.v1.GenerationService/GenerateImages",
    "/sdxld.v1.GenerationService/Upscale",
];

/// The admission layer.
#[derive(Clone)]
pub struct AdmissionLayer {
    queue: Arc<JobQueue>,
    retry_after: Duration,
}

impl AdmissionLayer {
    /// Admits into `queue`; refusals suggest retrying after `retry_after`.
    pub fn new(queue: Arc<JobQueue>, retry_after: Duration) -> Self {
        Self { queue, retry_after }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

/// The admission service.
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        if JOB_PATHS.contains(&path.as_str()) {
            match self.layer.queue.try_admit() {
                Ok(permit) => {
                    request
                        .extensions_mut()
                        .insert(AdmissionPermit(Arc::new(Mutex::new(Some(permit)))));
                }
                Err(e) => {
                    let status = ApiError::Job(e).into_status(self.layer.retry_after);
                    let response = status.into_http();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        let future = self.inner.call(request);
        Box::pin(future)
    }
}
