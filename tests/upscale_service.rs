//! Upscaling as a post-processing step of a generation, over gRPC: each image enlarged
//! exactly as the engine's upscaler (and Pillow's Lanczos below the native scale) does
//! it, steps chained in order, tiles reported as progress, the step in the PNG parameters
//! and in `completed.models`; bad steps refused naming their field, the server serving on.

use crate::common;

use std::path::{Path, PathBuf};

use common::server::{quick_spec, TestServer};
use sdxld::engine::resample::lanczos_resize;
use sdxld::engine::upscale::tiles::Tiling;
use sdxld::engine::upscale::{UpscaleNoise, Upscaler};
use sdxld::proto::v1 as pb;
use tch::{Device, Kind, Tensor};
use tonic::Code;

/// A server on the demo model whose upscaler root holds the fixture upscalers and a
/// foreign file.
async fn server() -> (tempfile::TempDir, TestServer) {
    let fixtures = common::upscaler_fixtures().join("models");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["compact_x2", "rrdb_x4_old"] {
        let file = format!("{name}.safetensors");
        std::fs::copy(fixtures.join(&file), dir.path().join(&file)).expect("copy");
    }
    let foreign = [(
        "encoder.weight",
        Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
    )];
    Tensor::write_safetensors(&foreign, dir.path().join("foreign.safetensors")).expect("write");
    let roots = dir.path().to_str().expect("utf-8").to_string();
    let server = TestServer::start(&[("SDXLD__MODELS__UPSCALER_ROOTS", &roots)]).await;
    (dir, server)
}

/// The listed name of the upscaler whose file starts with `stem`.
async fn name_of(server: &TestServer, stem: &str) -> String {
    let listed = server.list_models(pb::ModelKind::Upscaler).await;
    listed
        .into_iter()
        .find(|m| m.name.starts_with(stem))
        .map(|m| m.name)
        .unwrap_or_else(|| panic!("{stem} is not listed"))
}

fn step(model: &str, factor: u32, tile_size: u32) -> pb::PostProcessStep {
    pb::PostProcessStep {
        step: Some(pb::post_process_step::Step::Upscale(pb::UpscaleStep {
            model: model.into(),
            factor,
            tile_size,
            tile_overlap: None,
        })),
    }
}

/// The demo model's two images of seed 5, their PNGs without metadata (so that the
/// pixels compare).
fn two_images_without_metadata() -> pb::GenerationSpec {
    let mut spec = quick_spec(5);
    spec.num_images = 2;
    spec.output = Some(pb::OutputOptions {
        embed_metadata: Some(false),
        ..Default::default()
    });
    spec
}

fn decoded(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).expect("png").to_rgb8()
}

fn upscaler(dir: &Path, file: &str) -> Upscaler {
    let path: PathBuf = dir.join(file);
    Upscaler::load(&path, Device::Cpu, Kind::Float).expect("upscaler")
}

/// The tiling a step of `tile` pixels runs with: 10 pixels of context, tile / 16 overlap.
fn tiling(tile: i64) -> Tiling {
    Tiling {
        tile,
        pad: 10,
        overlap: tile / 16,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upscale_steps_enlarge_each_image_as_the_engine_does() {
    let (dir, server) = server().await;
    let compact = name_of(&server, "compact_x2").await;
    let rrdb = name_of(&server, "rrdb_x4_old").await;
    let mut spec = two_images_without_metadata();
    let plain = server.images(spec.clone()).await.expect("plain");
    // Native x2 with one 64-pixel tile per image, then the x4 model at factor 2: its
    // output resized down with Pillow's Lanczos.
    spec.post_processing = vec![step(&compact, 0, 64), step(&rrdb, 2, 64)];
    let upscaled = server.images(spec.clone()).await.expect("upscaled");
    let (x2, x4) = (
        upscaler(dir.path(), "compact_x2.safetensors"),
        upscaler(dir.path(), "rrdb_x4_old.safetensors"),
    );
    for (before, after) in plain.images.iter().zip(&upscaled.images) {
        assert_eq!((after.width, after.height), (256, 256));
        let source = decoded(&before.data);
        let first = x2
            .upscale(
                &source,
                tiling(64),
                UpscaleNoise::seeded(0),
                &mut |_| Ok(()),
            )
            .expect("x2");
        let second = x4
            .upscale(&first, tiling(64), UpscaleNoise::seeded(0), &mut |_| Ok(()))
            .expect("x4");
        let expected = lanczos_resize(&second, 256, 256);
        assert_eq!(decoded(&after.data), expected, "image {}", after.index);
    }
    let completed = upscaled.completed.expect("completed");
    let used: Vec<_> = completed
        .models
        .iter()
        .filter(|m| m.kind == pb::ModelKind::Upscaler as i32)
        .collect();
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|m| m.sha256.len() == 64), "{used:?}");
    assert_eq!(
        (used[0].name.as_str(), used[1].name.as_str()),
        (compact.as_str(), rrdb.as_str())
    );

    // A1111's extras parameters in the PNG; tiles as post-processing progress.
    spec.output = None;
    spec.num_images = 1;
    let request = tonic::Request::new(pb::GenerateRequest {
        spec: Some(spec.clone()),
    });
    let (events, end) = server.stream(request).await;
    end.expect("completed");
    let image = events
        .iter()
        .find_map(|e| match e {
            pb::generate_response::Event::Image(i) => Some(i.clone()),
            _ => None,
        })
        .expect("an image");
    let text = common::png_parameters(&image.data);
    let expected = format!(
        ", Postprocess upscale by: 2, Postprocess upscaler: {compact}, Postprocess upscale by 2: 2, Postprocess upscaler 2: {rrdb}"
    );
    assert!(text.contains(&expected), "{text}");
    let tiles: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            pb::generate_response::Event::Progress(p)
                if p.stage == pb::Stage::PostProcessing as i32 && p.total_steps > 0 =>
            {
                Some((p.step, p.total_steps))
            }
            _ => None,
        })
        .collect();
    // One 64-pixel tile of the 64-pixel image, then 3x3 tiles (stride 60) of the 128.
    assert_eq!(
        tiles,
        [
            (0, 1),
            (1, 1),
            (0, 9),
            (1, 9),
            (2, 9),
            (3, 9),
            (4, 9),
            (5, 9),
            (6, 9),
            (7, 9),
            (8, 9),
            (9, 9)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_steps_are_refused_naming_their_field_and_the_server_serves_on() {
    let (_dir, server) = server().await;
    let compact = name_of(&server, "compact_x2").await;
    let foreign = name_of(&server, "foreign").await;
    let with = |steps: Vec<pb::PostProcessStep>, format: pb::ImageFormat| {
        let mut spec = quick_spec(2);
        spec.post_processing = steps;
        spec.output = Some(pb::OutputOptions {
            format: format as i32,
            ..Default::default()
        });
        spec
    };
    let png = pb::ImageFormat::Png;
    let invalid = [
        (
            with(vec![step(&compact, 4, 0)], png),
            "spec.post_processing[0].upscale.factor",
        ),
        (
            with(vec![step(&compact, 0, 32)], png),
            "spec.post_processing[0].upscale.tile_size",
        ),
        (
            with(
                vec![step(&compact, 0, 0)],
                pb::ImageFormat::LatentsSafetensors,
            ),
            "spec.post_processing",
        ),
    ];
    for (spec, field) in invalid {
        let status = server.images(spec).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(
            common::server::violated_fields(&status),
            [field],
            "{status:?}"
        );
    }
    let mut overlapping = with(vec![step(&compact, 0, 64)], png);
    if let Some(pb::post_process_step::Step::Upscale(u)) = &mut overlapping.post_processing[0].step
    {
        u.tile_overlap = Some(32);
    }
    let status = server.images(overlapping).await.expect_err("overlap");
    assert_eq!(
        common::server::violated_fields(&status),
        ["spec.post_processing[0].upscale.tile_overlap"]
    );
    let status = server
        .images(with(vec![step("nowhere", 0, 0)], png))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = server
        .images(with(vec![step(&foreign, 0, 0)], png))
        .await
        .expect_err("foreign");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("encoder.weight"), "{status:?}");
    let fine = server.images(quick_spec(2)).await.expect("a plain request");
    assert_eq!(fine.images.len(), 1);
}

/// An Upscale call of `request` to its end: its events and its final status.
async fn upscale_call(
    server: &TestServer,
    request: pb::UpscaleRequest,
) -> (Vec<pb::upscale_response::Event>, Result<(), tonic::Status>) {
    let started = server.generation().await.upscale(request).await;
    let (messages, end) = common::server::drain(started).await;
    (messages.into_iter().filter_map(|m| m.event).collect(), end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upscale_rpc_runs_as_a_job_of_the_queue() {
    use pb::upscale_response::Event;
    let (dir, server) = server().await;
    let compact = name_of(&server, "compact_x2").await;
    let png =
        std::fs::read(common::upscaler_fixtures().join("images/rgba_14x10.png")).expect("read");
    let step = |factor| pb::UpscaleStep {
        model: compact.clone(),
        factor,
        tile_size: 64,
        tile_overlap: Some(0),
    };
    let request = pb::UpscaleRequest {
        image: png.clone(),
        upscale: Some(step(0)),
        output: None,
        client_job_id: "up-1".into(),
        seed: None,
    };
    let (events, end) = upscale_call(&server, request.clone()).await;
    end.expect("completed");
    let Some(Event::Accepted(accepted)) = events.first() else {
        panic!("not accepted first: {events:?}");
    };
    assert_eq!(accepted.client_job_id, "up-1");
    let tiles: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.stage == pb::Stage::PostProcessing as i32 => {
                Some((p.step, p.total_steps))
            }
            _ => None,
        })
        .collect();
    assert_eq!(tiles, [(0, 1), (1, 1)]);
    let image = image_event(&events);
    assert_eq!((image.width, image.height), (28, 20));
    // The alpha channel composited over white, then the engine's upscaler.
    let source = sdxld::engine::preprocess::hwc3(&image::load_from_memory(&png).expect("png"));
    let expected = upscaler(dir.path(), "compact_x2.safetensors")
        .upscale(
            &source,
            Tiling {
                tile: 64,
                pad: 10,
                overlap: 0,
            },
            UpscaleNoise::seeded(0),
            &mut |_| Ok(()),
        )
        .expect("upscale");
    assert_eq!(decoded(&image.data), expected);
    let text = common::png_parameters(&image.data);
    assert!(
        text.starts_with(&format!(
            "Postprocess upscale by: 2, Postprocess upscaler: {compact}"
        )),
        "{text}"
    );
    let Some(Event::Completed(completed)) = events.last() else {
        panic!("not completed last");
    };
    assert_eq!(completed.models.len(), 1);
    assert_eq!(completed.models[0].sha256.len(), 64);
    bad_upscales_are_refused_by_field(&server, &request).await;
    a_queued_upscale_is_cancelled_by_its_job_id(&server, request).await;
}

/// Bad upscales are refused naming the field, before admission; an unknown upscaler is
/// NOT_FOUND.
async fn bad_upscales_are_refused_by_field(server: &TestServer, request: &pb::UpscaleRequest) {
    let step = |factor| pb::UpscaleStep {
        factor,
        ..request.upscale.clone().expect("a step")
    };
    let invalid = [
        (
            pb::UpscaleRequest {
                image: Vec::new(),
                ..request.clone()
            },
            "image",
        ),
        (
            pb::UpscaleRequest {
                upscale: None,
                ..request.clone()
            },
            "upscale",
        ),
        (
            pb::UpscaleRequest {
                upscale: Some(step(4)),
                ..request.clone()
            },
            "upscale.factor",
        ),
        (
            pb::UpscaleRequest {
                output: Some(pb::OutputOptions {
                    format: pb::ImageFormat::LatentsSafetensors as i32,
                    ..Default::default()
                }),
                ..request.clone()
            },
            "output.format",
        ),
    ];
    for (bad, field) in invalid {
        let (events, end) = upscale_call(server, bad).await;
        let status = end.expect_err(field);
        assert!(events.is_empty(), "{field}: {events:?}");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(common::server::violated_fields(&status), [field]);
    }
    let mut unknown = request.clone();
    unknown.upscale = Some(pb::UpscaleStep {
        model: "nowhere".into(),
        ..step(0)
    });
    let (_, end) = upscale_call(server, unknown).await;
    assert_eq!(end.expect_err("unknown").code(), Code::NotFound);
}

/// An upscale queued behind a long generation is cancelled by its client job id.
async fn a_queued_upscale_is_cancelled_by_its_job_id(
    server: &TestServer,
    request: pb::UpscaleRequest,
) {
    let mut slow = common::server::slow_spec(1);
    slow.client_job_id = "slow".into();
    let _running = server.admitted(slow).await;
    let queued = tokio::spawn({
        let request = pb::UpscaleRequest {
            client_job_id: "queued-up".into(),
            ..request
        };
        let server_addr = server.addr.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{server_addr}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let mut client = pb::generation_service_client::GenerationServiceClient::new(channel);
            let mut stream = client
                .upscale(request)
                .await
                .expect("admitted")
                .into_inner();
            use tokio_stream::StreamExt;
            let mut last = Ok(());
            while let Some(item) = stream.next().await {
                if let Err(status) = item {
                    last = Err(status);
                }
            }
            last
        }
    });
    let mut client = server.generation().await;
    let cancel = |id: &str| pb::CancelJobRequest {
        client_job_id: id.into(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    loop {
        match client.cancel_job(cancel("queued-up")).await {
            Ok(r) => {
                assert!(r.into_inner().cancelled);
                break;
            }
            Err(_) if start.elapsed() < std::time::Duration::from_secs(10) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("never admitted: {e:?}"),
        }
    }
    let status = queued.await.expect("joined").expect_err("cancelled");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    client.cancel_job(cancel("slow")).await.expect("cancelled");
}

/// The tile progress of an upscale of `png` by the Compact x2 model with the tile size
/// left to the server, and the image.
async fn unsized_tiles(server: &TestServer, png: &[u8]) -> (Vec<(u32, u32)>, image::RgbImage) {
    use pb::upscale_response::Event;
    let request = pb::UpscaleRequest {
        image: png.to_vec(),
        upscale: Some(pb::UpscaleStep {
            model: name_of(server, "compact_x2").await,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (events, end) = upscale_call(server, request).await;
    end.expect("completed");
    let tiles = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.stage == pb::Stage::PostProcessing as i32 => {
                Some((p.step, p.total_steps))
            }
            _ => None,
        })
        .collect();
    let image = events
        .iter()
        .find_map(|e| match e {
            Event::Image(i) => Some(decoded(&i.data)),
            _ => None,
        })
        .expect("an image");
    (tiles, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsized_tiles_fit_the_memory_the_budget_leaves() {
    let mut png = Vec::new();
    let source = image::RgbImage::from_fn(300, 150, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    source
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    // No budget, on the CPU: 256-pixel tiles with 16 pixels of overlap, two across.
    let (dir, unbounded) = server().await;
    let (tiles, whole) = unsized_tiles(&unbounded, &png).await;
    assert_eq!(tiles, [(0, 2), (1, 2), (2, 2)]);
    let resident: f64 = unbounded
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("sdxld_model_cache_resident_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the resident bytes gauge");
    drop(unbounded);
    // A budget leaving about 3 MB beside the resident models: the Compact x2 model takes
    // 204 bytes per pixel in float32 at its peak, so a 64-pixel tile with its 10 pixels
    // of context (84² pixels, 1.4 MB) fits and a 128-pixel one (148², 4.5 MB) does not:
    // a 5×3 grid with 4 pixels of overlap.
    let roots = dir.path().to_str().expect("utf-8").to_string();
    let budget = (resident as u64 + 3_000_000).to_string();
    let bounded = TestServer::start(&[
        ("SDXLD__MODELS__UPSCALER_ROOTS", &roots),
        ("SDXLD__ENGINE__MEMORY_BUDGET_BYTES", &budget),
    ])
    .await;
    let (tiles, tiled) = unsized_tiles(&bounded, &png).await;
    assert_eq!(tiles.len(), 16, "{tiles:?}");
    assert_eq!(tiles.last(), Some(&(15, 15)));
    // Each tile has more context than the network sees: the same image.
    let most = whole
        .as_raw()
        .iter()
        .zip(tiled.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert!(most <= Some(1), "blended tiles differ by {most:?}");
}

/// `request` sent with `authorization: Bearer <token>`: another caller's identity.
fn as_caller<T>(request: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    let header = format!("Bearer {token}").parse().expect("ascii");
    request.metadata_mut().insert("authorization", header);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_job_id_names_one_job_in_flight_per_caller() {
    use common::server::{slow_spec, violated_fields};
    use pb::upscale_response::Event;
    use tokio_stream::StreamExt;
    let (_dir, server) = server().await;
    let compact = name_of(&server, "compact_x2").await;
    let png =
        std::fs::read(common::upscaler_fixtures().join("images/rgba_14x10.png")).expect("read");
    let upscale = |id: &str| pb::UpscaleRequest {
        image: png.clone(),
        upscale: Some(pb::UpscaleStep {
            model: compact.clone(),
            ..Default::default()
        }),
        output: None,
        client_job_id: id.into(),
        seed: None,
    };
    let mut spec = slow_spec(1);
    spec.client_job_id = "mine".into();
    let mut held = server.admitted(spec).await;

    // While it runs, the id is refused on either RPC, naming that request's own field,
    // before admission: no event, no job started.
    let mut spec = quick_spec(2);
    spec.client_job_id = "mine".into();
    let request = tonic::Request::new(pb::GenerateRequest { spec: Some(spec) });
    let (events, end) = server.stream(request).await;
    let status = end.expect_err("the id is in use");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["spec.client_job_id"]);
    assert!(
        status.message().contains("\"mine\""),
        "{}",
        status.message()
    );
    assert!(events.is_empty(), "{events:?}");
    let (events, end) = upscale_call(&server, upscale("mine")).await;
    let status = end.expect_err("the id is in use");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["client_job_id"]);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(server.metric("sdxld_jobs_started_total"), 1.0);

    // Another id, and the same id of another caller, are admitted beside it (queued
    // behind it on the one engine thread).
    let mut client = server.generation().await;
    let mut queued = Vec::new();
    for request in [
        tonic::Request::new(upscale("yours")),
        as_caller(upscale("mine"), "someone-else"),
    ] {
        let mut stream = client
            .upscale(request)
            .await
            .expect("admitted")
            .into_inner();
        let first = stream.next().await.expect("an event").expect("admitted");
        assert!(matches!(first.event, Some(Event::Accepted(_))), "{first:?}");
        queued.push(stream);
    }

    // Once the job has ended, the id is free again, and every place is free.
    let cancel = pb::CancelJobRequest {
        client_job_id: "mine".into(),
        ..Default::default()
    };
    let cancelled = client.cancel_job(cancel).await.expect("cancel");
    assert!(cancelled.into_inner().cancelled);
    let end = loop {
        match held.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    let status = end.expect("a status").expect_err("cancelled");
    assert_eq!(status.code(), Code::Cancelled);
    for stream in queued {
        let (_, end) = common::server::drain(Ok(tonic::Response::new(stream))).await;
        end.expect("the queued upscale completes");
    }
    let (_, end) = upscale_call(&server, upscale("mine")).await;
    end.expect("the id is free again");
    assert_eq!(server.metric("sdxld_jobs_started_total"), 4.0);
    assert_eq!(server.metric("sdxld_queue_depth_jobs"), 0.0);
}

/// The image event of an upscale job's events.
fn image_event(events: &[pb::upscale_response::Event]) -> pb::GeneratedImage {
    events
        .iter()
        .find_map(|e| match e {
            pb::upscale_response::Event::Image(i) => Some(i.clone()),
            _ => None,
        })
        .expect("an image")
}

/// The image event's picture and seed, and the PNG's parameters, of an Upscale call.
async fn upscaled(
    server: &TestServer,
    request: pb::UpscaleRequest,
) -> (image::RgbImage, u64, String) {
    let (events, end) = upscale_call(server, request).await;
    end.expect("completed");
    let image = image_event(&events);
    let text = common::png_parameters(&image.data);
    (decoded(&image.data), image.seed, text)
}

/// AuraSR draws noise at every call: in a generation's post-processing from each image's
/// seed (image i's: seed + i), in the Upscale RPC from the request's seed (the image and
/// the PNG report it), from a drawn one when it names none (which, sent back, gives the
/// same image); another seed gives another image; a seed of 2^53 is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aura_sr_draws_its_noise_from_the_images_seed() {
    let fixtures = common::upscaler_fixtures().join("models");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = "aura_sr_x4.safetensors";
    std::fs::copy(fixtures.join(file), dir.path().join(file)).expect("copy");
    let roots = dir.path().to_str().expect("utf-8").to_string();
    let server = TestServer::start(&[("SDXLD__MODELS__UPSCALER_ROOTS", &roots)]).await;
    let aura = name_of(&server, "aura_sr_x4").await;
    let network = upscaler(dir.path(), file);
    let mut spec = two_images_without_metadata();
    let plain = server.images(spec.clone()).await.expect("plain");
    spec.post_processing = vec![step(&aura, 0, 64)];
    let upscaled_images = server.images(spec.clone()).await.expect("upscaled");
    let mut sources = Vec::new();
    for (before, after) in plain.images.iter().zip(&upscaled_images.images) {
        let source = decoded(&before.data);
        let noise = UpscaleNoise::seeded(5 + u64::from(after.index));
        let expected = network
            .upscale(&source, tiling(64), noise, &mut |_| Ok(()))
            .expect("upscale");
        assert_eq!(decoded(&after.data), expected, "image {}", after.index);
        sources.push(source);
    }
    let other = network
        .upscale(
            &sources[0],
            tiling(64),
            UpscaleNoise::seeded(6),
            &mut |_| Ok(()),
        )
        .expect("upscale");
    assert_ne!(decoded(&upscaled_images.images[0].data), other);

    let mut png = Vec::new();
    sources[0]
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    let request = |seed| pb::UpscaleRequest {
        image: png.clone(),
        upscale: Some(pb::UpscaleStep {
            model: aura.clone(),
            tile_size: 64,
            ..Default::default()
        }),
        seed,
        ..Default::default()
    };
    let (image, seed, text) = upscaled(&server, request(Some(6))).await;
    assert_eq!((image, seed), (other, 6));
    assert!(text.contains(", Seed: 6, "), "{text}");
    let (drawn, seed, _) = upscaled(&server, request(None)).await;
    let (again, same, _) = upscaled(&server, request(Some(seed))).await;
    assert_eq!((drawn, seed), (again, same));
    let (events, end) = upscale_call(&server, request(Some(1 << 53))).await;
    let status = end.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(common::server::violated_fields(&status), ["seed"]);
    assert!(events.is_empty(), "{events:?}");
}
