//! A raw HTTP/2 gRPC client, for what tonic's client will not do: never read a response
//! (a stalled client), or send malformed headers.

use bytes::Bytes;
use prost::Message;
use tonic::codegen::http;

/// A connection whose streams may receive at most `window` bytes before the client
/// reads them (0: not even one message).
pub async fn connect(addr: &str, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A gRPC call of `method` (`/package.Service/Method`) with extra `headers`.
pub fn request(addr: &str, method: &str, headers: &[(&str, String)]) -> http::Request<()> {
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder.body(()).expect("request")
}

/// One length-prefixed gRPC message.
pub fn frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    framed.into()
}

/// Sends one call with one message; the response's head.
pub async fn call(
    client: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    message: Bytes,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let (response, mut body) = client.send_request(request, false)?;
    body.send_data(message, true)?;
    response.await
}

/// The `grpc-status` of a trailers-only answer.
pub fn status_of(response: &http::Response<h2::RecvStream>) -> Option<i32> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
