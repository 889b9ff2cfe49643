//! The gRPC service over loopback, against the real binary: events, cancellation,
//! deadlines, admission, bad input, health and the PNG metadata round trip.

use crate::common;

use std::time::{Duration, Instant};

use common::server::{quick_spec, slow_spec, TestServer};
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generate_response::Event;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

fn request(spec: pb::GenerationSpec) -> pb::GenerateRequest {
    pb::GenerateRequest { spec: Some(spec) }
}

fn png_text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().expect("png");
    let info = reader.info();
    let mut chunks: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.utf8_text {
        chunks.push((chunk.keyword.clone(), chunk.get_text().expect("itxt")));
    }
    chunks
}

fn decode_rgb(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes).expect("decode").to_rgb8()
}

#[tokio::test]
async fn health_reports_live_and_ready() {
    let server = TestServer::start(&[]).await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert_eq!(
        server.health("sdxld.v1.GenerationService").await,
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn a_batch_streams_accepted_progress_images_completed_in_order() {
    let server = TestServer::start(&[]).await;
    let mut spec = quick_spec(40);
    spec.num_images = 3;
    spec.steps = 3;
    spec.output = Some(pb::OutputOptions {
        preview_every_n_steps: 1,
        ..Default::default()
    });
    let (events, status) = server.stream(tonic::Request::new(request(spec))).await;
    status.expect("the job completes");
    let Some(Event::Accepted(accepted)) = events.first() else {
        panic!("first event is not accepted: {:?}", events.first());
    };
    assert_eq!(accepted.seeds, vec![40, 41, 42]);
    assert!(accepted.job_id.starts_with("job-"));
    let Some(Event::Completed(completed)) = events.last() else {
        panic!("last event is not completed");
    };
    assert_eq!(completed.job_id, accepted.job_id);
    assert_eq!(completed.models.len(), 1);
    assert_eq!(completed.models[0].sha256.len(), 64);
    let stages: Vec<i32> = completed.stage_timings.iter().map(|t| t.stage).collect();
    assert!(
        stages.contains(&(pb::Stage::Denoising as i32))
            && stages.contains(&(pb::Stage::Decoding as i32))
    );

    let steps: Vec<(u32, u32, u32, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.stage == pb::Stage::Denoising as i32 => {
                Some((p.image_index, p.step, p.total_steps, p.preview.is_some()))
            }
            _ => None,
        })
        .collect();
    let expected: Vec<(u32, u32, u32, bool)> = (0..3)
        .flat_map(|i| (0..=3).map(move |s| (i, s, 3, s > 0)))
        .collect();
    assert_eq!(steps, expected);
    let images: Vec<&pb::GeneratedImage> = events
        .iter()
        .filter_map(|e| match e {
            Event::Image(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(
        images.iter().map(|i| (i.index, i.seed)).collect::<Vec<_>>(),
        vec![(0, 40), (1, 41), (2, 42)]
    );
    for image in &images {
        assert_eq!(image.mime_type, "image/png");
        let rgb = decode_rgb(&image.data);
        assert_eq!(rgb.dimensions(), (64, 64));
    }
    // Image 0 is sent as soon as it is ready, before image 1 is denoised.
    let first_image = events.iter().position(|e| matches!(e, Event::Image(_)));
    let image_1_denoising = events
        .iter()
        .position(|e| matches!(e, Event::Progress(p) if p.stage == pb::Stage::Denoising as i32 && p.image_index == 1));
    assert!(first_image < image_1_denoising);
}

#[tokio::test]
async fn the_unary_rpc_returns_what_the_stream_returns() {
    let server = TestServer::start(&[]).await;
    let mut spec = quick_spec(7);
    spec.num_images = 2;
    let (events, status) = server
        .stream(tonic::Request::new(request(spec.clone())))
        .await;
    status.expect("stream");
    let streamed: Vec<Vec<u8>> = events
        .iter()
        .filter_map(|e| match e {
            Event::Image(i) => Some(i.data.clone()),
            _ => None,
        })
        .collect();
    let response = server.images(spec).await.expect("unary");
    assert_eq!(response.accepted.expect("accepted").seeds, vec![7, 8]);
    assert!(response.completed.is_some());
    let unary: Vec<Vec<u8>> = response.images.into_iter().map(|i| i.data).collect();
    assert_eq!(unary, streamed);
}

#[tokio::test]
async fn png_metadata_round_trips_to_the_same_image() {
    let server = TestServer::start(&[]).await;
    // No seed: the server draws one, and the metadata must pin it.
    let mut spec = quick_spec(0);
    spec.seed = None;
    spec.num_images = 2;
    spec.negative_prompt = Some("blurry".into());
    let first = server.images(spec).await.expect("generate");
    let image = &first.images[1];
    let chunks = png_text_chunks(&image.data);
    let parameters = &chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    assert!(
        parameters.starts_with(
            "a red apple on a table\nNegative prompt: blurry\nSteps: 2, Sampler: Euler"
        ),
        "{parameters}"
    );
    assert!(
        parameters.contains(&format!("Seed: {}", image.seed)),
        "{parameters}"
    );
    let json = &chunks
        .iter()
        .find(|(k, _)| k == "sdxld")
        .expect("request chunk")
        .1;
    let resolved = sdxld::proto::spec_from_json(json).expect("the chunk is a GenerationSpec");
    assert_eq!(resolved.seed, Some(image.seed));
    assert_eq!(resolved.num_images, 1);
    let again = server.images(resolved).await.expect("regenerate");
    assert_eq!(decode_rgb(&again.images[0].data), decode_rgb(&image.data));
    assert_eq!(
        again.images[0].data, image.data,
        "identical bytes, metadata included"
    );
}

#[tokio::test]
async fn other_output_formats() {
    let server = TestServer::start(&[]).await;
    for (format, mime) in [
        (pb::ImageFormat::Jpeg, "image/jpeg"),
        (pb::ImageFormat::Webp, "image/webp"),
        (
            pb::ImageFormat::LatentsSafetensors,
            "application/vnd.safetensors",
        ),
    ] {
        let mut spec = quick_spec(3);
        spec.output = Some(pb::OutputOptions {
            format: format as i32,
            quality: 80,
            ..Default::default()
        });
        let response = server.images(spec).await.expect("generate");
        let image = &response.images[0];
        assert_eq!(image.mime_type, mime);
        match format {
            pb::ImageFormat::Jpeg => assert_eq!(decode_rgb(&image.data).dimensions(), (64, 64)),
            pb::ImageFormat::Webp => {
                assert!(&image.data[..4] == b"RIFF" && &image.data[8..12] == b"WEBP")
            }
            _ => {
                let tensors =
                    safetensors::SafeTensors::deserialize(&image.data).expect("safetensors");
                let latents = tensors.tensor("latents").expect("latents");
                assert_eq!(latents.shape(), &[1, 4, 8, 8]);
            }
        }
    }
}

#[tokio::test]
async fn cancel_by_rpc_stops_within_a_step_and_the_next_job_runs() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    let mut spec = slow_spec(1);
    spec.client_job_id = "my-job-1".into();
    let mut stream = client
        .generate(request(spec))
        .await
        .expect("start")
        .into_inner();
    // Wait for denoising to start.
    let mut last_step = 0;
    while let Some(Ok(message)) = stream.next().await {
        if let Some(Event::Progress(p)) = message.event {
            if p.stage == pb::Stage::Denoising as i32 && p.step >= 1 {
                last_step = p.step;
                break;
            }
        }
    }
    assert!(last_step >= 1);
    let mut canceller = server.generation().await;
    let response = canceller
        .cancel_job(pb::CancelJobRequest {
            client_job_id: "my-job-1".into(),
            ..Default::default()
        })
        .await
        .expect("cancel")
        .into_inner();
    assert!(response.cancelled);
    let cancelled_at = last_step;
    let status = loop {
        match stream.next().await {
            Some(Ok(message)) => {
                if let Some(Event::Progress(p)) = message.event {
                    last_step = p.step;
                }
            }
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::Cancelled);
    // Progress events in flight when the cancel arrived may still come: the engine
    // itself stops at the next step boundary.
    assert!(last_step < 150, "the job ran to the end");
    assert!(
        last_step <= cancelled_at + 40,
        "stopped late: {cancelled_at} -> {last_step}"
    );
    let next = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(2)),
        })
        .await
        .expect("the next job runs");
    assert_eq!(next.into_inner().images.len(), 1);
}

#[tokio::test]
async fn dropping_the_stream_stops_the_job() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    let mut stream = client
        .generate(request(slow_spec(5)))
        .await
        .expect("start")
        .into_inner();
    while let Some(Ok(message)) = stream.next().await {
        if matches!(message.event, Some(Event::Progress(ref p)) if p.stage == pb::Stage::Denoising as i32)
        {
            break;
        }
    }
    drop(stream);
    let start = Instant::now();
    loop {
        let metrics = server.metrics();
        if metrics.contains("sdxld_job_failures_total{reason=\"client_gone\"} 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the job did not stop:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(2)),
        })
        .await
        .expect("the next job runs");
    assert_eq!(next.into_inner().images.len(), 1);
}

#[tokio::test]
async fn deadlines_apply_while_running_and_while_queued() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    // Running: the job is stopped when the deadline passes.
    let mut req = tonic::Request::new(request(slow_spec(9)));
    req.set_timeout(Duration::from_millis(1500));
    let start = Instant::now();
    let (_, status) = server.stream(req).await;
    assert_eq!(status.expect_err("deadline").code(), Code::DeadlineExceeded);
    assert!(start.elapsed() < Duration::from_secs(30));

    // Queued behind a long job: it expires in the queue.
    let mut blocker = server.generation().await;
    let mut spec = slow_spec(10);
    spec.client_job_id = "blocker".into();
    let mut long = blocker
        .generate(request(spec))
        .await
        .expect("start")
        .into_inner();
    let _accepted = long.next().await;
    let mut req = tonic::Request::new(request(quick_spec(11)));
    req.set_timeout(Duration::from_millis(300));
    let (events, status) = server.stream(req).await;
    assert_eq!(status.expect_err("deadline").code(), Code::DeadlineExceeded);
    assert!(!events.iter().any(|e| matches!(e, Event::Image(_))));
    let _ = client
        .cancel_job(pb::CancelJobRequest {
            client_job_id: "blocker".into(),
            ..Default::default()
        })
        .await;
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_with_retry_info() {
    let server = TestServer::start(&[("SDXLD__JOBS__MAX_QUEUED", "2")]).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let mut client = server.generation().await;
        let mut spec = slow_spec(i);
        spec.client_job_id = format!("held-{i}");
        let mut stream = client
            .generate(request(spec))
            .await
            .expect("admitted")
            .into_inner();
        let first = stream.next().await.expect("event").expect("ok");
        assert!(matches!(first.event, Some(Event::Accepted(_))));
        held.push(stream);
    }
    let mut client = server.generation().await;
    for _ in 0..3 {
        let status = client
            .generate_images(pb::GenerateImagesRequest {
                spec: Some(quick_spec(3)),
            })
            .await
            .expect_err("the queue is full");
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert!(retry.retry_delay.is_some());
    }
    for i in 0..2 {
        client
            .cancel_job(pb::CancelJobRequest {
                client_job_id: format!("held-{i}"),
                ..Default::default()
            })
            .await
            .expect("cancel");
    }
    for mut stream in held {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => {
                    assert_eq!(status.code(), Code::Cancelled);
                    break;
                }
                None => panic!("no status"),
            }
        }
    }
    // Places are free again.
    client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(4)),
        })
        .await
        .expect("admitted after the cancels");
}

#[tokio::test]
async fn unknown_models_and_unimplemented_features_are_refused_clearly() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    let mut spec = quick_spec(1);
    spec.model = "no-such-model".into();
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("not found");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "MODEL_NOT_FOUND"
    );

    let mut spec = quick_spec(1);
    spec.loras = vec![pb::LoraAdapter {
        name: "style".into(),
        weight: Some(0.5),
        text_encoder_weight: None,
    }];
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("no such LoRA");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").metadata["model"],
        "style"
    );

    let mut spec = quick_spec(1);
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(64, 64)
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("png");
    spec.controlnets = vec![pb::ControlNetUnit {
        model: "canny".into(),
        image: png.into_inner(),
        ..Default::default()
    }];
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("no such ControlNet");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").metadata["model"],
        "canny"
    );

    let mut spec = quick_spec(1);
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(64, 64)
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("png");
    let png = png.into_inner();
    spec.init_image = Some(pb::InitImage {
        image: png.clone(),
        strength: Some(0.5),
        mask: png,
        ..Default::default()
    });
    spec.hires = Some(pb::HiresPass {
        scale: Some(2.0),
        latent_upscale: pb::LatentUpscale::Bilinear as i32,
        ..Default::default()
    });
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("unimplemented");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("spec.hires"));

    // The server keeps serving.
    client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(1)),
        })
        .await
        .expect("still serving");
}

#[tokio::test]
async fn models_and_capabilities() {
    let server = TestServer::start(&[]).await;
    let mut models = server.models().await;
    let list = models
        .list_models(pb::ListModelsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let demo = list
        .models
        .iter()
        .find(|m| m.name == "demo")
        .expect("the demo model");
    assert!(demo.is_default && demo.resident);
    assert_eq!(demo.sha256.len(), 64);
    assert!(!list
        .models
        .iter()
        .any(|m| m.name.contains('/') && m.name.starts_with('/')));
    let caps = models
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    assert_eq!(caps.schedulers.len(), 12);
    let euler = caps
        .schedulers
        .iter()
        .find(|s| s.scheduler == pb::Scheduler::Euler as i32)
        .expect("euler");
    assert!(euler.supported && euler.options.contains(&"timestep_spacing".to_string()));
    assert!(!euler.options.contains(&"eta".to_string()));
    assert_eq!(caps.device, "cpu");
    assert_eq!(caps.limits.expect("limits").max_queued_jobs, 16);
    assert!(caps
        .features
        .iter()
        .any(|f| f.field == "loras" && f.supported));
    assert!(caps
        .features
        .iter()
        .any(|f| f.field == "controlnets" && f.supported));
}

#[tokio::test]
async fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    // A long grace period: the suite runs many servers at once on few cores.
    let mut server = TestServer::start(&[("SDXLD__SERVER__SHUTDOWN_GRACE_SECONDS", "300")]).await;
    let mut client = server.generation().await;
    let mut spec = slow_spec(12);
    spec.steps = 40;
    spec.width = 128;
    spec.height = 128;
    let mut stream = client
        .generate(request(spec))
        .await
        .expect("start")
        .into_inner();
    let _accepted = stream.next().await;
    server.terminate();
    // New work is refused while the job finishes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut other = server.generation().await;
    let refused = other
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(1)),
        })
        .await
        .expect_err("refused during drain");
    assert_eq!(refused.code(), Code::Unavailable);
    let mut images = 0;
    let mut completed = false;
    while let Some(message) = stream.next().await {
        match message.expect("the in-flight job finishes").event {
            Some(Event::Image(_)) => images += 1,
            Some(Event::Completed(_)) => completed = true,
            _ => {}
        }
    }
    assert!(completed && images == 1);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
