//! `sdxld request`: one GenerationSpec to a running server, the outcome as JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sdxld::proto::v1 as pb;
use tonic_types::StatusExt;

/// Where to send what.
#[derive(Args)]
pub struct RequestArgs {
    /// The server (host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    server: String,
    /// The GenerationSpec as JSON, or @FILE.
    #[arg(long)]
    spec: String,
    /// Write the images here as image-N.<ext>.
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

/// Sends the spec with the unary RPC and prints one JSON line.
pub fn request(args: &RequestArgs) -> anyhow::Result<()> {
    let json = match args.spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => args.spec.clone(),
    };
    let spec = sdxld::proto::spec_from_json(&json).map_err(|e| anyhow::anyhow!("--spec: {e}"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(send(&args.server, spec, args.output_dir.as_deref()))?;
    println!("{report}");
    Ok(())
}

async fn send(
    server: &str,
    spec: pb::GenerationSpec,
    output_dir: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    let mut client =
        pb::generation_service_client::GenerationServiceClient::connect(format!("http://{server}"))
            .await
            .with_context(|| format!("connecting to {server}"))?
            .max_decoding_message_size(1 << 30);
    let started = Instant::now();
    let result = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(match result {
        Ok(response) => {
            let response = response.into_inner();
            if let Some(dir) = output_dir {
                std::fs::create_dir_all(dir)?;
                for image in &response.images {
                    let ext = image.mime_type.rsplit('/').next().unwrap_or("bin");
                    std::fs::write(
                        dir.join(format!("image-{}.{ext}", image.index)),
                        &image.data,
                    )?;
                }
            }
            let completed = response.completed.unwrap_or_default();
            serde_json::json!({
                "code": "OK",
                "seconds": elapsed,
                "images": response.images.len(),
                "peak_device_memory_bytes": completed.peak_device_memory_bytes,
                "total_ms": completed.total_ms,
                "warnings": completed.warnings,
            })
        }
        Err(status) => serde_json::json!({
            "code": format!("{:?}", status.code()),
            "seconds": elapsed,
            "message": status.message(),
            "reason": status.get_details_error_info().map(|i| i.reason),
        }),
    })
}
