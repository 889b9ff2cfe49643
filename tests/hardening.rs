//! Hostile and careless clients over the wire: none may stall, cancel or crash another's
//! work; the work a request costs is bounded by the limits, not by its size; oversized
//! headers and messages fail their own call only; statuses carry no server paths; every
//! job's end is counted once.

use crate::common;

use std::time::{Duration, Instant};

use common::raw;
use common::server::{quick_spec, slow_spec, TestServer};
use sdxld::proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

/// Polls `condition` for up to `limit`.
async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_up_no_other_client() {
    // Small event buffers, so that a job of forty events outgrows them: a preview every
    // step for a client whose HTTP/2 window never opens (it reads not even the accepted
    // event).
    let server = TestServer::start(&[
        ("SDXLD__SERVER__STALLED_CLIENT_TIMEOUT_SECONDS", "2"),
        ("SDXLD__JOBS__STREAM_BUFFER", "4"),
    ])
    .await;
    let mut stalled = raw::connect(&server.addr, 0).await;
    let mut spec = quick_spec(1);
    spec.steps = 10;
    spec.num_images = 4;
    spec.output = Some(pb::OutputOptions {
        preview_every_n_steps: 1,
        ..Default::default()
    });
    let message = raw::frame(&pb::GenerateRequest { spec: Some(spec) });
    let request = raw::request(&server.addr, "/sdxld.v1.GenerationService/Generate", &[]);
    let (_response, mut body) = stalled.send_request(request, false).expect("sent");
    body.send_data(message, true).expect("sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another client's short job runs meanwhile: were the engine waiting for the stalled
    // client, it would wait for as long as that connection stays open.
    let mut client = server.generation().await;
    let mut request = tonic::Request::new(pb::GenerateImagesRequest {
        spec: Some(quick_spec(2)),
    });
    request.set_timeout(Duration::from_secs(30));
    let response = client
        .generate_images(request)
        .await
        .expect("the other job ran");
    assert_eq!(response.into_inner().images.len(), 1);
    // The stalled client's job is given up and counted as dropped; its place is free.
    eventually("the stalled job dropped", Duration::from_secs(20), || {
        server.metric("sdxld_jobs_ended_total{outcome=\"dropped\"}") == 1.0
    })
    .await;
    eventually("its place freed", Duration::from_secs(5), || {
        server.metric("sdxld_queue_depth_jobs") == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_find_or_cancel_anothers_job() {
    let server = TestServer::start(&[]).await;
    let mut victim = server.generation().await;
    let mut spec = slow_spec(3);
    spec.client_job_id = "victim-job".into();
    let mut stream = victim
        .generate(pb::GenerateRequest { spec: Some(spec) })
        .await
        .expect("admitted")
        .into_inner();
    let Some(Ok(pb::GenerateResponse {
        event: Some(pb::generate_response::Event::Accepted(accepted)),
    })) = stream.next().await
    else {
        panic!("no accepted event");
    };
    // 128 random bits: nothing to guess from one's own id.
    let hex = accepted.job_id.strip_prefix("job-").expect("job-");
    assert!(
        hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hex}"
    );
    // Another identity (its own bearer token) sees neither id.
    let mut stranger = server.generation().await;
    for (job_id, client_job_id) in [(accepted.job_id.as_str(), ""), ("", "victim-job")] {
        let mut request = tonic::Request::new(pb::CancelJobRequest {
            job_id: job_id.into(),
            client_job_id: client_job_id.into(),
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer intruder".parse().expect("ascii"));
        let status = stranger.cancel_job(request).await.expect_err("not theirs");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(
            status.get_details_error_info().expect("ErrorInfo").reason,
            "JOB_NOT_FOUND"
        );
    }
    // The job still runs; its owner cancels it, then learns it is over.
    let progress = stream
        .next()
        .await
        .expect("an event")
        .expect("still running");
    assert!(matches!(
        progress.event,
        Some(pb::generate_response::Event::Progress(_))
    ));
    let cancel = || pb::CancelJobRequest {
        job_id: accepted.job_id.clone(),
        ..Default::default()
    };
    let first = victim
        .cancel_job(cancel())
        .await
        .expect("own job")
        .into_inner();
    assert!(first.cancelled);
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => panic!("no status"),
        }
    };
    assert_eq!(status.code(), Code::Cancelled);
    let again = victim
        .cancel_job(cancel())
        .await
        .expect("own job")
        .into_inner();
    assert!(!again.cancelled, "finished already");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_headers_are_parsed_as_the_spec_says() {
    let server = TestServer::start(&[]).await;
    let mut client = raw::connect(&server.addr, 1 << 20).await;
    let message = || {
        raw::frame(&pb::GenerateImagesRequest {
            spec: Some(quick_spec(4)),
        })
    };
    let method = "/sdxld.v1.GenerationService/GenerateImages";
    for malformed in ["18446744073709551615S", "123456789m", "S", "10x", "-5S"] {
        let headers = [("grpc-timeout", malformed.to_string())];
        let request = raw::request(&server.addr, method, &headers);
        let response = raw::call(&mut client, request, message())
            .await
            .expect("an answer, not a reset");
        assert_eq!(
            raw::status_of(&response),
            Some(Code::InvalidArgument as i32),
            "{malformed}"
        );
    }
    // Eight nines of hours: far, but a deadline like any.
    let request = raw::request(
        &server.addr,
        method,
        &[("grpc-timeout", "99999999H".into())],
    );
    let response = raw::call(&mut client, request, message())
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").expect("a status");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_lists_are_refused_by_their_count_quickly() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    let lora = |i: usize, weight: f32| pb::LoraAdapter {
        name: format!("l{i}"),
        weight: Some(weight),
        text_encoder_weight: None,
    };
    // 60,000 adapters with a duplicate: refused by the count alone, at once.
    let mut spec = quick_spec(5);
    spec.loras = (0..60_000).map(|i| lora(i % 2, 1.0)).collect();
    let start = Instant::now();
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("too many");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "spec.loras");
    // 3,000 NaN weights: one violation, a small status.
    let mut spec = quick_spec(5);
    spec.loras = (0..3_000).map(|i| lora(i, f32::NAN)).collect();
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.details().len() + status.message().len() < 2048);
    // Many bad fields within the counts: the first twenty, and how many more.
    let mut spec = quick_spec(5);
    spec.loras = (0..16).map(|i| lora(i, f32::NAN)).collect();
    spec.controlnets = (0..8)
        .map(|_| pb::ControlNetUnit {
            conditioning_scale: Some(f32::INFINITY),
            guidance_start: f32::NAN,
            ..Default::default()
        })
        .collect();
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("invalid");
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    assert_eq!(violations.len(), 21);
    assert!(
        violations[20].description.contains("more invalid fields"),
        "{:?}",
        violations[20]
    );
    assert!(status.details().len() + status.message().len() < 8192);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_messages_fail_their_own_call_only() {
    let server = TestServer::start(&[("SDXLD__SERVER__MAX_REQUEST_BYTES", "65536")]).await;
    // One connection: a running job, then calls with large headers beside it.
    let channel = server.channel().await;
    let mut client = pb::generation_service_client::GenerationServiceClient::new(channel.clone());
    let mut spec = quick_spec(6);
    spec.steps = 20;
    let mut stream = client
        .generate(pb::GenerateRequest { spec: Some(spec) })
        .await
        .expect("admitted")
        .into_inner();
    let mut models = pb::model_service_client::ModelServiceClient::new(channel.clone());
    for size in [40 << 10, 300 << 10] {
        let mut request = tonic::Request::new(pb::GetCapabilitiesRequest {});
        let value: String = "x".repeat(size);
        request
            .metadata_mut()
            .insert("x-padding", value.parse().expect("ascii"));
        let result = models.get_capabilities(request).await;
        if size < 256 << 10 {
            result.expect("a 40 KB header is served");
        } else {
            assert!(result.is_err(), "a 300 KB header list is refused");
        }
    }
    // A message over the limit: RESOURCE_EXHAUSTED, not OUT_OF_RANGE.
    let mut big = quick_spec(7);
    big.prompt = "y".repeat(100 << 10);
    let status = client
        .clone()
        .generate_images(pb::GenerateImagesRequest { spec: Some(big) })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The job on the same connection was not disturbed.
    let mut completed = false;
    while let Some(event) = stream.next().await {
        if let Some(pb::generate_response::Event::Completed(_)) =
            event.expect("the job runs on").event
        {
            completed = true;
        }
    }
    assert!(completed);
}

/// A server whose base root holds `broken`, the demo model with garbage UNet weights.
async fn with_broken_model() -> (tempfile::TempDir, TestServer) {
    let root = common::broken_model_root();
    let base_roots = root.path().to_str().expect("utf-8");
    let server = TestServer::start(&[("SDXLD__MODELS__BASE_ROOTS", base_roots)]).await;
    (root, server)
}

/// Statuses name model files by their path under the root, in the message and in the
/// rich status (google.rpc.Status, which repeats the message and which grpcurl, grpc-go
/// and C#'s `GetRpcStatus()` show instead): a broken base model's generation, its
/// LoadModel, and a garbage LoRA file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_name_model_files_without_server_paths() {
    use prost::Message;
    let root = common::broken_model_root();
    std::fs::write(root.path().join("junk.safetensors"), [0xff; 64]).expect("junk");
    let root_str = root.path().to_str().expect("utf-8");
    let server = TestServer::start(&[
        ("SDXLD__MODELS__BASE_ROOTS", root_str),
        ("SDXLD__MODELS__LORA_ROOTS", root_str),
        ("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
    ])
    .await;
    let mut broken = quick_spec(8);
    broken.model = "broken".into();
    let generation = server.images(broken).await.expect_err("a broken model");
    let mut junk = quick_spec(8);
    junk.loras = vec![pb::LoraAdapter {
        name: "junk".into(),
        weight: Some(1.0),
        text_encoder_weight: None,
    }];
    let lora = server.images(junk).await.expect_err("a garbage LoRA");
    let load = server
        .models()
        .await
        .load_model(pb::LoadModelRequest {
            name: "broken".into(),
            kind: pb::ModelKind::Base as i32,
        })
        .await
        .expect_err("a broken model");
    let real = root.path().canonicalize().expect("canonical");
    let forms = [root_str, real.to_str().expect("utf-8")];
    for (what, status, file) in [
        (
            "generation",
            generation,
            "broken/unet/diffusion_pytorch_model.safetensors",
        ),
        ("LoRA", lora, "junk.safetensors"),
        (
            "LoadModel",
            load,
            "broken/unet/diffusion_pytorch_model.safetensors",
        ),
    ] {
        let message = status.message();
        assert!(message.contains(file), "{what}: {message}");
        let rich = tonic_types::pb::Status::decode(status.details()).expect("a rich status");
        assert_eq!(rich.message, message, "{what}");
        let details = String::from_utf8_lossy(status.details()).into_owned();
        for form in forms {
            assert!(!message.contains(form), "{what}: {message}");
            assert!(!details.contains(form), "{what}: {details}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_jobs_end_is_counted_once() {
    let (_root, server) = with_broken_model().await;
    let mut client = server.generation().await;
    // Two completed.
    for seed in 0..2 {
        server.images(quick_spec(seed)).await.expect("completed");
    }
    // One failed.
    let mut spec = quick_spec(2);
    spec.model = "broken".into();
    server.images(spec).await.expect_err("failed");
    // One running and one queued, both cancelled; one dropped by its client.
    let mut streams = Vec::new();
    for (i, id) in ["running", "queued", "dropped"].into_iter().enumerate() {
        let mut spec = slow_spec(10 + i as u64);
        spec.client_job_id = id.into();
        streams.push(server.admitted(spec).await);
    }
    drop(streams.pop());
    for id in ["queued", "running"] {
        client
            .cancel_job(pb::CancelJobRequest {
                client_job_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("cancelled");
    }
    // One past its deadline.
    let mut request = tonic::Request::new(pb::GenerateImagesRequest {
        spec: Some(slow_spec(20)),
    });
    request.set_timeout(Duration::from_millis(1500));
    client.generate_images(request).await.expect_err("deadline");
    let ended =
        |outcome: &str| server.metric(&format!("sdxld_jobs_ended_total{{outcome=\"{outcome}\"}}"));
    eventually("every job ended", Duration::from_secs(60), || {
        server.metric("sdxld_queue_depth_jobs") == 0.0 && ended("deadline") == 1.0
    })
    .await;
    let started = server.metric("sdxld_jobs_started_total");
    let outcomes: Vec<(&str, f64)> = ["completed", "failed", "cancelled", "dropped", "deadline"]
        .into_iter()
        .map(|o| (o, ended(o)))
        .collect();
    // The warm-up is not a job: 7 admitted, each ended once.
    assert_eq!(started, 7.0);
    assert_eq!(
        outcomes,
        vec![
            ("completed", 2.0),
            ("failed", 1.0),
            ("cancelled", 2.0),
            ("dropped", 1.0),
            ("deadline", 1.0)
        ]
    );
    assert_eq!(outcomes.iter().map(|(_, n)| n).sum::<f64>(), started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_takes_the_bearer_scheme_in_any_case() {
    let server = TestServer::start(&[("SDXLD__SERVER__TOKENS", "ops:admin:s3cret")]).await;
    let mut models = server.models().await;
    for (header, ok) in [
        ("bearer s3cret", true),
        ("BEARER s3cret", true),
        ("Bearer s3cre", false),
        ("Basic s3cret", false),
    ] {
        let mut request = tonic::Request::new(pb::LoadModelRequest {
            name: "demo".into(),
            kind: pb::ModelKind::Base as i32,
        });
        request
            .metadata_mut()
            .insert("authorization", header.parse().expect("ascii"));
        let result = models.load_model(request).await;
        match ok {
            true => {
                result.expect(header);
            }
            false => assert_eq!(result.expect_err(header).code(), Code::Unauthenticated),
        }
    }
}
