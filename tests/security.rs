//! TLS, mutual TLS and bearer tokens with roles, with certificates made at test time:
//! only verified clients get through, a plaintext health port answers kubelet-style
//! probes, tokens without the role are PERMISSION_DENIED, and a job belongs to the
//! identity (token name or certificate subject) that submitted it.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::certs::{write, Ca};
use common::server::{quick_spec, slow_spec, TestServer};
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generation_service_client::GenerationServiceClient;
use sdxld::proto::v1::model_service_client::ModelServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

/// A TLS server whose clients must (`required`) or may (`optional`) present a
/// certificate of `ca`, with a plaintext health port.
async fn tls_server(dir: &Path, ca: &Ca, client_auth: &str) -> TestServer {
    let (cert, key) = ca.sign("sdxld", &["localhost", "127.0.0.1"]);
    let cert = write(dir, "server.pem", &cert);
    let key = write(dir, "server.key", &key);
    let client_ca = write(dir, "ca.pem", &ca.pem);
    TestServer::start(&[
        ("SDXLD__SERVER__TLS__CERT", &cert),
        ("SDXLD__SERVER__TLS__KEY", &key),
        ("SDXLD__SERVER__TLS__CLIENT_CA", &client_ca),
        ("SDXLD__SERVER__TLS__CLIENT_AUTH", client_auth),
        ("SDXLD__SERVER__HEALTH_LISTEN", "127.0.0.1:0"),
    ])
    .await
}

/// A TLS channel to `server` trusting `ca`, with a client certificate when given.
async fn tls_channel(
    server: &TestServer,
    ca: &Ca,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let port = server.addr.rsplit(':').next().expect("port");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{port}"))
        .expect("uri")
        .tls_config(tls)?
        .timeout(Duration::from_secs(60))
        .connect()
        .await
}

/// A quick generation on `channel`: its status.
async fn generate(channel: Channel) -> Result<(), tonic::Status> {
    GenerationServiceClient::new(channel)
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(5)),
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_verified_clients_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("sdxld test CA");
    let server = tls_server(dir.path(), &ca, "required").await;
    // Readiness came through the plaintext health port.
    let health = server.health_addr.clone().expect("a health port");
    assert_ne!(health, server.addr);

    let alice = ca.sign("alice", &[]);
    let channel = tls_channel(&server, &ca, Some(&alice)).await.expect("mTLS");
    generate(channel.clone())
        .await
        .expect("a verified client generates");

    // No client certificate, a certificate of another CA, plaintext: no call gets through.
    let stranger = Ca::new("another CA").sign("mallory", &[]);
    for (what, client) in [("no certificate", None), ("another CA", Some(&stranger))] {
        let refused = match tls_channel(&server, &ca, client).await {
            Err(_) => true,
            Ok(channel) => generate(channel).await.is_err(),
        };
        assert!(refused, "{what} is refused");
    }
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .timeout(Duration::from_secs(10))
        .connect()
        .await;
    if let Ok(plain) = plain {
        let status = generate(plain).await.expect_err("plaintext is refused");
        assert_ne!(status.code(), Code::Ok);
    }

    // Jobs belong to the certificate's subject: bob cannot cancel alice's job.
    let bob = ca.sign("bob", &[]);
    let mut alice_client = GenerationServiceClient::new(channel);
    let mut spec = slow_spec(2);
    spec.client_job_id = "alices-job".into();
    let mut stream = alice_client
        .generate(pb::GenerateRequest { spec: Some(spec) })
        .await
        .expect("admitted")
        .into_inner();
    stream.next().await.expect("accepted").expect("accepted");
    let by_id = || pb::CancelJobRequest {
        client_job_id: "alices-job".into(),
        ..Default::default()
    };
    let bob_channel = tls_channel(&server, &ca, Some(&bob)).await.expect("bob");
    let status = GenerationServiceClient::new(bob_channel)
        .cancel_job(by_id())
        .await
        .expect_err("not bob's job");
    assert_eq!(status.code(), Code::NotFound);
    let cancelled = alice_client
        .cancel_job(by_id())
        .await
        .expect("alice's job")
        .into_inner();
    assert!(cancelled.cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_are_verified_when_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("sdxld test CA");
    let server = tls_server(dir.path(), &ca, "optional").await;
    let anonymous = tls_channel(&server, &ca, None).await.expect("TLS");
    generate(anonymous).await.expect("no certificate is fine");
    let carol = ca.sign("carol", &[]);
    let verified = tls_channel(&server, &ca, Some(&carol)).await.expect("mTLS");
    generate(verified)
        .await
        .expect("a verified certificate is fine");
    let stranger = Ca::new("another CA").sign("mallory", &[]);
    let refused = match tls_channel(&server, &ca, Some(&stranger)).await {
        Err(_) => true,
        Ok(channel) => generate(channel).await.is_err(),
    };
    assert!(refused, "a certificate of another CA is refused");

    // `sdxld health`, as a container's health check runs it: the plaintext health port,
    // the TLS port with the CA, and a port nobody serves.
    let health = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sdxld"))
            .arg("health")
            .args(args)
            .output()
            .expect("run");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string(),
        )
    };
    let plain = server.health_addr.clone().expect("a health port");
    let (ok, out) = health(&["--server", &plain]);
    assert!(ok && out.contains("SERVING"), "{out}");
    let port = server.addr.rsplit(':').next().expect("port");
    let tls_addr = format!("localhost:{port}");
    let ca_path = dir.path().join("ca.pem");
    let ca_path = ca_path.to_str().expect("utf-8");
    let (ok, out) = health(&["--server", &tls_addr, "--tls-ca", ca_path, "--service", ""]);
    assert!(ok, "{out}");
    let (ok, _) = health(&["--server", "127.0.0.1:9", "--timeout", "2"]);
    assert!(!ok, "nobody serves there");
}

/// `request` with `authorization: Bearer <token>`.
fn with_token<T>(request: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    request
}

fn load_demo(token: Option<&str>) -> tonic::Request<pb::LoadModelRequest> {
    with_token(
        pb::LoadModelRequest {
            name: "demo".into(),
            kind: pb::ModelKind::Base as i32,
        },
        token,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_have_roles_and_jobs_belong_to_the_tokens_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "tokens",
        "# a mounted secret\nops:admin:0ps-secret\n\n",
    );
    let server = TestServer::start(&[
        (
            "SDXLD__SERVER__TOKENS",
            "alice:generate:a-secret,bob:generate:b-secret",
        ),
        ("SDXLD__SERVER__TOKENS_FILE", &file),
    ])
    .await;
    let mut generation = server.generation().await;
    let mut models = ModelServiceClient::new(server.channel().await);
    let quick = |token| {
        with_token(
            pb::GenerateImagesRequest {
                spec: Some(quick_spec(1)),
            },
            token,
        )
    };
    for token in [None, Some("wrong"), Some("a-secre")] {
        let status = generation
            .generate_images(quick(token))
            .await
            .expect_err("no known token");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    generation
        .generate_images(quick(Some("a-secret")))
        .await
        .expect("alice generates");
    let listed = models
        .list_models(with_token(pb::ListModelsRequest::default(), None))
        .await
        .expect_err("listing needs a token");
    assert_eq!(listed.code(), Code::Unauthenticated);
    let status = models
        .load_model(load_demo(Some("a-secret")))
        .await
        .expect_err("alice is no admin");
    assert_eq!(status.code(), Code::PermissionDenied);
    models
        .load_model(load_demo(Some("0ps-secret")))
        .await
        .expect("ops is an admin");
    // Health stays open.
    assert_eq!(
        server.health("sdxld.v1.GenerationService").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // Alice's job is hers: bob (and even the admin) find nothing under its id.
    let mut spec = slow_spec(4);
    spec.client_job_id = "alices-job".into();
    let mut stream = generation
        .generate(with_token(
            pb::GenerateRequest { spec: Some(spec) },
            Some("a-secret"),
        ))
        .await
        .expect("admitted")
        .into_inner();
    stream.next().await.expect("accepted").expect("accepted");
    let cancel = |token| {
        with_token(
            pb::CancelJobRequest {
                client_job_id: "alices-job".into(),
                ..Default::default()
            },
            Some(token),
        )
    };
    for other in ["b-secret", "0ps-secret"] {
        let status = generation
            .cancel_job(cancel(other))
            .await
            .expect_err("not theirs");
        assert_eq!(status.code(), Code::NotFound);
    }
    let cancelled = generation
        .cancel_job(cancel("a-secret"))
        .await
        .expect("alice's")
        .into_inner();
    assert!(cancelled.cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_admin_rpcs_are_closed_unless_opened() {
    let closed = TestServer::start(&[]).await;
    let mut models = ModelServiceClient::new(closed.channel().await);
    let status = models
        .load_model(load_demo(None))
        .await
        .expect_err("closed");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("allow_unauthenticated_admin"));
    generate(closed.channel().await)
        .await
        .expect("generation stays open");
    drop(closed);
    let open = TestServer::start(&[("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true")]).await;
    let mut models = ModelServiceClient::new(open.channel().await);
    models.load_model(load_demo(None)).await.expect("opened");
}

#[test]
fn bad_security_settings_stop_the_server_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = write(dir.path(), "tokens", "ops:admin:x\nops:root:y\n");
    let cert = write(dir.path(), "cert.pem", "not a certificate");
    for (env, key) in [
        (
            vec![("SDXLD__SERVER__TOKENS_FILE", tokens.as_str())],
            "server.tokens_file line 2",
        ),
        (
            vec![("SDXLD__SERVER__TOKENS", "ops:admin")],
            "server.tokens[0]",
        ),
        (
            vec![("SDXLD__SERVER__TLS__CERT", cert.as_str())],
            "server.tls.key",
        ),
        (
            vec![("SDXLD__SERVER__TLS__CLIENT_AUTH", "required")],
            "server.tls.client_auth",
        ),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sdxld"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SDXLD__SERVER__METRICS_LISTEN", "")
            .env("SDXLD__ENGINE__DEVICE", "cpu")
            .envs(env)
            .output()
            .expect("run");
        assert!(!output.status.success(), "{key}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}
