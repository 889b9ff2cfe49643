//! `sdxld health`: one gRPC health check (`grpc.health.v1.Health/Check`) against a
//! server, for container health checks and scripts: exit 0 when the service is
//! SERVING, 1 otherwise (not serving, unreachable, timed out), with one line saying so.

use std::time::Duration;

use anyhow::{bail, Context};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The flags.
#[derive(clap::Args)]
pub struct HealthArgs {
    /// The server's address (host:port); the plaintext health port when TLS is on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    server: String,
    /// The service to check: "sdxld.v1.GenerationService" (ready for generations) or ""
    /// (the process is alive).
    #[arg(long, default_value = "sdxld.v1.GenerationService")]
    service: String,
    /// Speak TLS, verifying the server against this PEM CA bundle.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

/// Runs the check.
pub fn health(args: &HealthArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = runtime.block_on(check(args))?;
    if status == ServingStatus::Serving {
        println!("{}: SERVING", display(&args.service));
        return Ok(());
    }
    bail!("{}: {}", display(&args.service), status.as_str_name())
}

fn display(service: &str) -> &str {
    if service.is_empty() {
        "the server"
    } else {
        service
    }
}

async fn check(args: &HealthArgs) -> anyhow::Result<ServingStatus> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{}", args.server))
        .context("--server must be host:port")?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(ca) = &args.tls_ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("--tls-ca: reading {}", ca.display()))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach {}", args.server))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .with_context(|| format!("health check of {}", args.server))?;
    Ok(ServingStatus::try_from(reply.into_inner().status).unwrap_or(ServingStatus::Unknown))
}
