//! Per-call guards as a tower layer: a panic while handling a call becomes INTERNAL for
//! that call alone (never a reset stream, never the process), and a request message over
//! the size limit is RESOURCE_EXHAUSTED, as gRPC's status-code guidance says (tonic
//! answers OUT_OF_RANGE; sdxld itself never does); each call is stamped with its arrival.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// When a call arrived, stamped before tonic starts the `grpc-timeout` timer around the
/// handler: a deadline counted from here passes no later than tonic's, so the handler
/// answers DEADLINE_EXCEEDED itself instead of being dropped as if its client had left.
#[derive(Clone, Copy, Debug)]
pub struct CallArrival(pub Instant);

/// The layer.
#[derive(Clone, Copy, Default)]
pub struct CallGuardLayer;

impl<S> Layer<S> for CallGuardLayer {
    type Service = CallGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallGuard { inner }
    }
}

/// The service.
#[derive(Clone)]
pub struct CallGuard<S> {
    inner: S,
}

/// The answer to a call whose handling panicked.
fn panicked() -> http::Response<tonic::body::Body> {
    tracing::error!("a call's handler panicked; the call fails alone");
    let details = tonic_types::ErrorDetails::with_error_info(
        "INTERNAL",
        "sdxld",
        std::collections::HashMap::<String, String>::new(),
    );
    use tonic_types::StatusExt;
    Status::with_error_details(
        Code::Internal,
        "the server failed handling this call",
        details,
    )
    .into_http()
}

/// A trailers-only answer of tonic's message-size limit, as RESOURCE_EXHAUSTED.
fn size_limit_as_resource_exhausted(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == (Code::OutOfRange as i32).to_string().as_bytes());
    if !out_of_range {
        return response;
    }
    let message = response
        .headers()
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Status::resource_exhausted(message).into_http()
}

/// The `grpc-message` header's percent-encoding undone.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A future whose panics are caught.
struct Guarded<F> {
    inner: Pin<Box<F>>,
}

impl<F, E> Future for Guarded<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(Ok(response))) => {
                Poll::Ready(Ok(size_limit_as_resource_exhausted(response)))
            }
            Ok(other) => other,
            Err(_) => Poll::Ready(Ok(panicked())),
        }
    }
}

impl<S, B> Service<http::Request<B>> for CallGuard<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(CallArrival(Instant::now()));
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
            Ok(future) => Box::pin(Guarded {
                inner: Box::pin(future),
            }),
            Err(_) => Box::pin(async { Ok(panicked()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b%25c"), "a b%c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
