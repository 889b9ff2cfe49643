//! Service-layer benchmark: a 1-step 64x64 generation on the demo model through the gRPC
//! server with 1, 4 and 16 concurrent clients (requests per second, p50/p99 time to the
//! first event and to completion), against the same generation through the CLI path
//! (the shared job runner called in-process), so the difference is what the service
//! adds.
//!
//! Run with `cargo bench --bench service` (after `source scripts/setup`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sdxld::api::validate::{to_job_spec, Context};
use sdxld::engine::device::Placement;
use sdxld::engine::registry::{ModelEntry, ModelRoots, Registry};
use sdxld::engine::request::BatchMode;
use sdxld::jobs::engine::Engine;
use sdxld::jobs::events::{FinishedImage, StepProgress};
use sdxld::jobs::runner::{run_job, JobSink, RunOptions};
use sdxld::jobs::StopReason;
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generation_service_client::GenerationServiceClient;
use sdxld::telemetry::Metrics;
use tokio_stream::StreamExt;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Encodes each image as the server does, and keeps nothing.
struct Encoding;

impl JobSink for Encoding {
    fn stopped(&mut self) -> Option<StopReason> {
        None
    }

    fn progress(&mut self, _: StepProgress) {}

    fn image(&mut self, image: FinishedImage) {
        let _png = sdxld::jobs::encode::encode(&image).expect("png");
    }
}

fn spec(seed: u64) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a red apple".into(),
        width: 64,
        height: 64,
        steps: 1,
        seed: Some(seed),
        ..Default::default()
    }
}

async fn client_run(addr: String, requests: usize, seed: u64) -> Vec<(f64, f64)> {
    let mut client = GenerationServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let mut out = Vec::with_capacity(requests);
    for i in 0..requests {
        let start = Instant::now();
        let mut stream = client
            .generate(pb::GenerateRequest {
                spec: Some(spec(seed + i as u64)),
            })
            .await
            .expect("generate")
            .into_inner();
        let mut first = None;
        while let Some(event) = stream.next().await {
            event.expect("event");
            if first.is_none() {
                first = Some(start.elapsed().as_secs_f64());
            }
        }
        out.push((first.unwrap_or(f64::NAN), start.elapsed().as_secs_f64()));
    }
    out
}

fn main() {
    tch::set_num_threads(1);
    let cache = tempfile::tempdir().expect("tempdir");
    let demo = cache.path().join("demo");
    sdxld::engine::demo::write_demo_model(&demo, 0).expect("demo model");

    // The CLI path: the same request validated and run by the shared job runner
    // in-process, each image encoded as PNG (as the service does).
    let registry = Registry::new(
        ModelRoots::default(),
        ModelEntry::from_folder("demo", &demo).expect("the demo model"),
    );
    let settings = sdxld::config::Settings::load(None).expect("default settings");
    let mut engine = Engine::local(Placement::cpu(), None);
    let metrics = Metrics::new();
    let mut run = |seed: u64| {
        let context = Context {
            limits: &settings.limits,
            registry: &registry,
            preprocessing: &settings.preprocessing,
            drawn_seed: 0,
        };
        let job = to_job_spec(Some(spec(seed)), &context).expect("valid");
        let options = RunOptions {
            batch: BatchMode::PerImage,
            keep_latents: false,
        };
        run_job(
            &mut engine,
            &job,
            options,
            &mut Encoding,
            &metrics,
            Instant::now(),
        )
        .expect("generate");
    };
    for seed in 0..3 {
        run(seed);
    }
    let mut direct = Vec::new();
    for i in 0..30 {
        let start = Instant::now();
        run(i);
        direct.push(start.elapsed().as_secs_f64());
    }
    direct.sort_by(f64::total_cmp);
    let direct_p50 = percentile(&direct, 0.5);
    drop(engine);

    let mut child = Command::new(env!("CARGO_BIN_EXE_sdxld"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SDXLD__ENGINE__DEVICE", "cpu")
        .env("SDXLD__ENGINE__DEMO_MODEL_DIR", &demo)
        .env("SDXLD__SERVER__METRICS_LISTEN", "")
        .env("SDXLD__JOBS__MAX_QUEUED", "64")
        .env("SDXLD__TELEMETRY__LOG_LEVEL", "warn")
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let stdout = child.stdout.take().expect("stdout");
    let mut addr = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(a) = line.strip_prefix("sdxld listening on ") {
            addr = a.trim().to_string();
            break;
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // Wait for readiness by running requests until one succeeds.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(mut c) = GenerationServiceClient::connect(format!("http://{addr}")).await {
                if c.generate_images(pb::GenerateImagesRequest {
                    spec: Some(spec(0)),
                })
                .await
                .is_ok()
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = client_run(addr.clone(), 5, 0).await;
        println!(
            "CLI path (job runner in-process, PNG encoded): p50 {:.2} ms",
            direct_p50 * 1000.0
        );
        println!(
            "{:>8} {:>10} {:>12} {:>12} {:>12} {:>12}",
            "clients", "req/s", "first p50", "first p99", "total p50", "added p50"
        );
        for clients in [1usize, 4, 16] {
            let per_client = (64 / clients).max(8);
            let start = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|c| tokio::spawn(client_run(addr.clone(), per_client, (c * 1000) as u64)))
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.extend(t.await.expect("client"));
            }
            let wall = start.elapsed().as_secs_f64();
            let mut first: Vec<f64> = results.iter().map(|r| r.0).collect();
            let mut total: Vec<f64> = results.iter().map(|r| r.1).collect();
            first.sort_by(f64::total_cmp);
            total.sort_by(f64::total_cmp);
            let added = if clients == 1 {
                format!("{:.2} ms", (percentile(&total, 0.5) - direct_p50) * 1000.0)
            } else {
                "-".to_string()
            };
            println!(
                "{:>8} {:>10.1} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>12}",
                clients,
                results.len() as f64 / wall,
                percentile(&first, 0.5) * 1000.0,
                percentile(&first, 0.99) * 1000.0,
                percentile(&total, 0.5) * 1000.0,
                added
            );
        }
        println!(
            "targets: < 2 ms added per request; p99 time to first event < 20 ms with 16 clients"
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}
