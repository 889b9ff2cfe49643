//! The model cache on the CPU with a byte budget small enough that eviction happens:
//! least-recently-used eviction and residency in ListModels, identical images for A, B,
//! A, a job that can never fit, admin LoadModel/UnloadModel with the admin token,
//! single-flight loading under 20 concurrent requests, and components shared by content
//! (the refiner's second text encoder and VAE are the base's), text encoders moved to the
//! host for a job that fits the budget only without them, and the images that share a
//! denoising run counted in its estimate.

use crate::common;

use std::time::{Duration, Instant};

use common::fixtures;
use common::server::TestServer;
use common::weights_bytes;
use sdxld::engine::cache::ModelCache;
use sdxld::engine::device::Placement;
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

fn metric(server: &TestServer, name: &str) -> f64 {
    let text = server.metrics();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn spec(model: &str, seed: u64) -> pb::GenerationSpec {
    pb::GenerationSpec {
        model: model.into(),
        prompt: "a lighthouse".into(),
        seed: Some(seed),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

#[test]
fn components_are_shared_by_content() {
    let dir = fixtures().join("tiny2");
    let mut cache = ModelCache::new(Placement::cpu(), None);
    cache.pipeline(&dir.join("pipeline")).expect("base");
    let base = cache.stats();
    assert_eq!(base.component_loads, 4);
    cache.pipeline(&dir.join("refiner")).expect("refiner");
    let both = cache.stats();
    // The refiner brings only its UNet: its text_encoder_2 and VAE are the base's.
    assert_eq!(both.component_loads, 5);
    let refiner_unet = weights_bytes(&dir.join("refiner/unet"));
    assert_eq!(both.resident_bytes, base.resident_bytes + refiner_unet);
    // Unloading the base keeps what the refiner shares.
    assert!(cache.unload(&dir.join("pipeline")));
    let refiner_only = weights_bytes(&dir.join("refiner"));
    assert_eq!(cache.stats().resident_bytes, refiner_only);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_budget_admin_and_single_flight() {
    let root = tempfile::tempdir().expect("tempdir");
    for (name, seed) in [("a", "1"), ("b", "2"), ("c", "3")] {
        common::cli::sdxld("demo-model")
            .args(["--seed", seed])
            .flag("--output", root.path().join(name))
            .succeeds();
    }
    let size = weights_bytes(&root.path().join("a"));
    let budget = (size * 5 / 2).to_string();
    let server = TestServer::start(&[
        (
            "SDXLD__MODELS__BASE_ROOTS",
            root.path().to_str().expect("utf-8"),
        ),
        ("SDXLD__ENGINE__DEFAULT_MODEL", "a"),
        ("SDXLD__ENGINE__MEMORY_BUDGET_BYTES", &budget),
        ("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
        ("SDXLD__JOBS__MAX_QUEUED", "32"),
    ])
    .await;
    let client = server.generation().await;
    let mut models = server.models().await;
    let generate = |spec: pb::GenerationSpec| {
        let mut client = client.clone();
        async move {
            client
                .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
                .await
        }
    };
    let resident = |models: &mut sdxld::proto::v1::model_service_client::ModelServiceClient<
        tonic::transport::Channel,
    >| {
        let mut models = models.clone();
        async move {
            let list = models
                .list_models(pb::ListModelsRequest::default())
                .await
                .expect("list")
                .into_inner()
                .models;
            let mut names: Vec<String> = list
                .into_iter()
                .filter(|m| m.resident)
                .map(|m| m.name)
                .collect();
            names.sort();
            names
        }
    };

    let first_a = generate(spec("a", 5)).await.expect("a").into_inner();
    generate(spec("b", 5)).await.expect("b");
    assert_eq!(resident(&mut models).await, ["a", "b"]);
    generate(spec("c", 5)).await.expect("c");
    // a was used least recently.
    assert_eq!(resident(&mut models).await, ["b", "c"]);
    let again_a = generate(spec("a", 5)).await.expect("a again").into_inner();
    assert_eq!(resident(&mut models).await, ["a", "c"]);
    assert_eq!(
        first_a.images[0].data, again_a.images[0].data,
        "A, B, A differ"
    );
    assert!(metric(&server, "sdxld_model_evictions_total") >= 2.0);

    // A job that cannot fit even alone.
    let mut huge = spec("a", 5);
    huge.width = 2048;
    huge.height = 2048;
    let status = generate(huge).await.expect_err("never fits");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "MEMORY_BUDGET"
    );

    // Admin RPCs (open here; tests/security.rs checks tokens and roles).
    let load = |name: &str, token: Option<&str>| {
        let mut request = tonic::Request::new(pb::LoadModelRequest {
            name: name.into(),
            kind: pb::ModelKind::Base as i32,
        });
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("metadata"),
            );
        }
        request
    };
    let loaded = models
        .load_model(load("b", Some("s3cret")))
        .await
        .expect("load")
        .into_inner()
        .model
        .expect("model");
    assert!(loaded.resident && loaded.name == "b");
    assert_eq!(resident(&mut models).await, ["a", "b"]);
    let status = models
        .load_model(load("absent", Some("s3cret")))
        .await
        .expect_err("absent");
    assert_eq!(status.code(), Code::NotFound);
    let mut unload = tonic::Request::new(pb::UnloadModelRequest {
        name: "b".into(),
        kind: pb::ModelKind::Base as i32,
    });
    unload
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("metadata"));
    let unloaded = models
        .unload_model(unload)
        .await
        .expect("unload")
        .into_inner()
        .model
        .expect("model");
    assert!(!unloaded.resident);
    assert_eq!(resident(&mut models).await, ["a"]);

    // Single flight: 20 concurrent requests for a cold model load its components once.
    let loads_before = metric(&server, "sdxld_model_component_loads_total");
    let requests: Vec<_> = (0..20)
        .map(|i| tokio::spawn(generate(spec("c", i))))
        .collect();
    for request in requests {
        request.await.expect("join").expect("generated");
    }
    let loads_after = metric(&server, "sdxld_model_component_loads_total");
    assert_eq!(
        loads_after - loads_before,
        4.0,
        "c's four components load once"
    );
}

/// A two-step 64×64 generation.
fn small_job() -> sdxld::engine::pipeline::GenerateParams {
    sdxld::engine::pipeline::GenerateParams {
        prompt: "a lighthouse".into(),
        steps: 2,
        width: 64,
        height: 64,
        seed: 4,
        ..Default::default()
    }
}

#[test]
fn evicted_components_wait_on_the_host_and_come_back_unchanged() {
    use sdxld::engine::cache::ModelPath;

    let root = tempfile::tempdir().expect("tempdir");
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        sdxld::engine::demo::write_demo_model(&root.path().join(name), seed).expect("demo");
    }
    let size = weights_bytes(&root.path().join("a"));
    let mut cache =
        ModelCache::with_host_budget(Placement::cpu(), Some(size * 5 / 2), size * 5 / 2);
    let p = small_job();
    let run = |cache: &mut ModelCache, name: &str| {
        let path = root.path().join(name);
        cache
            .make_room(&[ModelPath::Pipeline(&path)], 0)
            .expect("room");
        let pipeline = cache.pipeline(&path).expect("load");
        pipeline.denoise_all(&p, &mut |_| {}).expect("denoise")
    };
    let first_a = run(&mut cache, "a");
    let _ = run(&mut cache, "b");
    let _ = run(&mut cache, "c");
    // a was evicted from the "device" and parked on the host.
    let stats = cache.stats();
    assert_eq!(stats.component_loads, 12);
    assert_eq!(stats.host_bytes, size);
    assert!(!cache.is_resident(&root.path().join("a")));
    let again_a = run(&mut cache, "a");
    let stats = cache.stats();
    assert_eq!(
        stats.component_loads, 12,
        "a came back from the host, not from disk"
    );
    assert_eq!(stats.host_reloads, 4);
    assert!(first_a.equal(&again_a));
    // b went to the host in its turn.
    assert_eq!(stats.host_bytes, size);
    assert!(stats.resident_bytes <= size * 5 / 2);
}

/// A 2 GiB kohya-style LoRA (one low-rank pair of zeros, as a sparse file) whose key names
/// no layer: loading it takes seconds of hashing and reading before it is refused.
fn write_large_lora(path: &std::path::Path) {
    use std::io::Write;
    let half: u64 = 1 << 30;
    let elements = half / 4;
    let header = format!(
        "{{\"lora_unet_big.lora_down.weight\":{{\"dtype\":\"F32\",\"shape\":[1,{elements}],\"data_offsets\":[0,{half}]}},\
         \"lora_unet_big.lora_up.weight\":{{\"dtype\":\"F32\",\"shape\":[{elements},1],\"data_offsets\":[{half},{}]}}}}",
        2 * half
    );
    let padded = format!("{header:<width$}", width = header.len().div_ceil(8) * 8);
    let mut file = std::fs::File::create(path).expect("create");
    file.write_all(&(padded.len() as u64).to_le_bytes())
        .expect("write");
    file.write_all(padded.as_bytes()).expect("write");
    file.set_len(8 + padded.len() as u64 + 2 * half)
        .expect("sparse data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_listing_answer_while_a_large_model_is_hashed_and_loaded() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let root = tempfile::tempdir().expect("tempdir");
    write_large_lora(&root.path().join("big.safetensors"));
    let server = TestServer::start(&[(
        "SDXLD__MODELS__LORA_ROOTS",
        root.path().to_str().expect("utf-8"),
    )])
    .await;
    let mut spec = spec("", 1);
    spec.loras = vec![pb::LoraAdapter {
        name: "big".into(),
        weight: Some(1.0),
        text_encoder_weight: None,
    }];
    // Admitted: validation reads no weights.
    let mut stream = server.admitted(spec).await;
    let job = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return status,
                None => panic!("the stream ended without a status"),
            }
        }
    });
    let mut health = HealthClient::new(server.channel().await);
    let mut models = server.models().await;
    let (mut health_times, mut list_times) = (Vec::new(), Vec::new());
    while !job.is_finished() {
        let start = Instant::now();
        health
            .check(HealthCheckRequest {
                service: "sdxld.v1.GenerationService".into(),
            })
            .await
            .expect("health");
        let health_took = start.elapsed();
        let start = Instant::now();
        let listed = models
            .list_models(pb::ListModelsRequest {
                kind: pb::ModelKind::Lora as i32,
            })
            .await
            .expect("list")
            .into_inner()
            .models;
        let list_took = start.elapsed();
        if job.is_finished() {
            break;
        }
        assert_eq!(listed.len(), 1);
        health_times.push(health_took);
        list_times.push(list_took);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = job.await.expect("the job's stream");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let answered = health_times.len();
    assert!(
        answered >= 5,
        "only {answered} checks while the LoRA loaded"
    );
    // Typical calls answer at once; a call held up by the hashing or the load would wait
    // for it (seconds). The slowest bound leaves room for the scheduling hiccups of two
    // loaded cores, which are no blocking.
    for (what, mut times) in [("health checks", health_times), ("listings", list_times)] {
        times.sort();
        let (median, slowest) = (times[times.len() / 2], times[times.len() - 1]);
        assert!(
            median < Duration::from_millis(50) && slowest < Duration::from_millis(1000),
            "{what} took {median:?} (median) and {slowest:?} (slowest) while a model was hashed and loaded"
        );
    }
    // Once hashed, the listing shows the hash the job computed.
    let start = Instant::now();
    loop {
        let listed = server.list_models(pb::ModelKind::Lora).await;
        if listed[0].sha256.len() == 64 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never hashed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The bytes of a pipeline folder's two text encoders.
fn text_encoder_bytes(model: &std::path::Path) -> u64 {
    weights_bytes(&model.join("text_encoder")) + weights_bytes(&model.join("text_encoder_2"))
}

#[test]
fn text_encoders_leave_the_device_only_for_a_job_that_fits_no_other_way() {
    use sdxld::engine::cache::{Activations, Fit, ModelPath};
    use sdxld::engine::error::EngineError;

    let root = tempfile::tempdir().expect("tempdir");
    for (name, seed) in [("a", 1), ("b", 2)] {
        sdxld::engine::demo::write_demo_model(&root.path().join(name), seed).expect("demo");
    }
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let (weights, encoders) = (weights_bytes(&a), text_encoder_bytes(&a));
    assert!(encoders > 0);
    // Encoding takes little beside the weights; the denoising more than the encoders weigh.
    let needs = Activations {
        encoding: 1000,
        denoising: encoders + 4000,
    };
    let models = [ModelPath::Pipeline(&a)];
    let fit = |budget: u64, needs: Activations| {
        ModelCache::new(Placement::cpu(), Some(budget)).make_room_for(&models, needs)
    };
    assert_eq!(
        fit(weights + needs.denoising, needs).expect("roomy"),
        Fit::Resident
    );
    let tight = weights - encoders + needs.denoising;
    assert_eq!(
        fit(tight, needs).expect("tight"),
        Fit::TextEncodersOffloaded
    );
    let refused = fit(tight - 1, needs).expect_err("too tight");
    assert!(
        matches!(&refused, EngineError::MemoryBudget(m) if m.contains("text encoders on the host")),
        "{refused}"
    );
    // Encoding itself must fit with every weight on the device.
    let heavy_encoding = Activations {
        encoding: needs.denoising - encoders + 1,
        ..needs
    };
    assert!(matches!(
        fit(tight, heavy_encoding),
        Err(EngineError::MemoryBudget(_))
    ));

    let p = small_job();
    let reference = {
        let mut roomy = ModelCache::new(Placement::cpu(), None);
        let pipeline = roomy.pipeline(&a).expect("load");
        pipeline.denoise_all(&p, &mut |_| {}).expect("denoise")
    };
    let mut cache = ModelCache::new(Placement::cpu(), Some(tight));
    for round in 1..=2u64 {
        assert_eq!(
            cache.make_room_for(&models, needs).expect("room"),
            Fit::TextEncodersOffloaded
        );
        let pipeline = cache.pipeline(&a).expect("pipeline");
        let stats = cache.stats();
        assert_eq!(
            (stats.resident_bytes, stats.host_bytes),
            (weights, 0),
            "round {round}: every weight on the device for encoding"
        );
        let latents = pipeline.denoise_all(&p, &mut |_| {}).expect("denoise");
        assert!(latents.equal(&reference), "round {round}: latents differ");
        assert_eq!(cache.offload_text_encoders(&[&a]), encoders);
        let stats = cache.stats();
        assert_eq!(
            (stats.resident_bytes, stats.host_bytes),
            (weights - encoders, encoders)
        );
        assert_eq!(stats.text_encoder_offloads, 2 * round);
        assert_eq!(stats.component_loads, 4, "brought back, not loaded again");
        assert!(cache.is_resident(&a));
    }
    // Evicted for another model, nothing of it stays on the host (no host budget).
    cache
        .make_room_for(&[ModelPath::Pipeline(&b)], needs)
        .expect("room for b");
    cache.pipeline(&b).expect("b");
    let stats = cache.stats();
    assert!(!cache.is_resident(&a));
    assert_eq!(
        (stats.resident_bytes, stats.host_bytes),
        (weights_bytes(&b), 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_holds_a_job_only_without_its_text_encoders_still_serves_it() {
    use sdxld::engine::cache::{activation_estimate, text_encoding_estimate};
    use sdxld::engine::pipeline::GenerateParams;

    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("a");
    sdxld::engine::demo::write_demo_model(&model, 1).expect("demo");
    let mut request = spec("a", 7);
    (request.width, request.height) = (256, 256);
    let params = GenerateParams {
        width: 256,
        height: 256,
        ..GenerateParams::default()
    };
    let (weights, encoders) = (weights_bytes(&model), text_encoder_bytes(&model));
    let activations = activation_estimate(&model, &params, 4);
    let budget = weights - encoders + activations;
    assert!(weights + text_encoding_estimate(&model, 4) <= budget);
    assert!(budget < weights + activations);
    let roots = root.path().to_str().expect("utf-8");
    async fn generate(server: &TestServer, request: pb::GenerationSpec) -> Vec<u8> {
        let mut client = server.generation().await;
        let response = client
            .generate_images(pb::GenerateImagesRequest {
                spec: Some(request),
            })
            .await;
        response.expect("generated").into_inner().images[0]
            .data
            .clone()
    }
    let reference = {
        let server = TestServer::start(&[
            ("SDXLD__MODELS__BASE_ROOTS", roots),
            ("SDXLD__ENGINE__DEFAULT_MODEL", "a"),
        ])
        .await;
        common::decoded_image(&generate(&server, request.clone()).await)
    };
    let server = TestServer::start(&[
        ("SDXLD__MODELS__BASE_ROOTS", roots),
        ("SDXLD__ENGINE__DEFAULT_MODEL", "a"),
        ("SDXLD__ENGINE__MEMORY_BUDGET_BYTES", &budget.to_string()),
    ])
    .await;
    for round in 1..=2 {
        let image = common::decoded_image(&generate(&server, request.clone()).await);
        assert!(image.equal(&reference), "round {round}: the image differs");
        assert_eq!(
            metric(&server, "sdxld_model_cache_host_bytes"),
            encoders as f64
        );
        assert_eq!(
            metric(&server, "sdxld_model_cache_resident_bytes"),
            (weights - encoders) as f64
        );
        assert_eq!(
            metric(&server, "sdxld_text_encoder_offloads_total"),
            f64::from(2 * round)
        );
    }
}

#[test]
fn a_budget_counts_the_images_that_share_a_denoising_run() {
    use sdxld::engine::cache::{activation_estimate, text_encoding_estimate};
    use sdxld::engine::pipeline::GenerateParams;

    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("a");
    sdxld::engine::demo::write_demo_model(&model, 1).expect("demo");
    let one = GenerateParams {
        width: 256,
        height: 256,
        guidance_scale: 5.0,
        ..GenerateParams::default()
    };
    let two = GenerateParams {
        num_images: 2,
        ..one.clone()
    };
    let (weights, encoders) = (weights_bytes(&model), text_encoder_bytes(&model));
    let (one_image, two_images) = (
        activation_estimate(&model, &one, 4),
        activation_estimate(&model, &two, 4),
    );
    // The budget holds one image's run; two images in one run do not fit even with the
    // text encoders on the host.
    let budget = weights + one_image;
    assert!(text_encoding_estimate(&model, 4) <= one_image);
    assert!(weights - encoders + two_images > budget);
    let generate = |batch: &str, out: &std::path::Path| {
        common::cli::sdxld("generate")
            .flag("--model", &model)
            .args([
                "--prompt",
                "a lighthouse",
                "--steps",
                "1",
                "--guidance",
                "5",
            ])
            .args(["--width", "256", "--height", "256", "--num-images", "2"])
            .flag("--memory-budget", budget.to_string())
            .flag("--batch", batch)
            .flag("--output", out)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    generate("per-image", &dir.path().join("p.png")).succeeds();
    assert!(dir.path().join("p-1.png").exists());
    let refused = generate("together", &dir.path().join("t.png")).fails();
    assert!(
        refused.contains(&format!("but the budget is {budget}")),
        "{refused}"
    );
    assert!(!dir.path().join("t.png").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_holds_one_tile_of_the_decode_decodes_tile_by_tile() {
    use sdxld::engine::cache::{generation_estimate, text_encoding_estimate, ModelPath};
    use sdxld::engine::pipeline::GenerateParams;

    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("a");
    sdxld::engine::demo::write_demo_model(&model, 1).expect("demo");
    // The demo VAE tiles at 256 pixels: a 512² image is nine tiles.
    let mut request = spec("a", 5);
    (request.width, request.height, request.steps) = (512, 512, 1);
    request.guidance_scale = Some(5.0);
    let params = GenerateParams {
        prompt: request.prompt.clone(),
        width: 512,
        height: 512,
        steps: 1,
        seed: 5,
        guidance_scale: 5.0,
        ..GenerateParams::default()
    };
    let (weights, encoders) = (weights_bytes(&model), text_encoder_bytes(&model));
    let estimate = generation_estimate(&model, &params, 4);
    let tiled_budget = weights + estimate.tiled();
    // Neither the whole decode nor moving the text encoders away fits this budget.
    assert!(weights - encoders + estimate.whole() > tiled_budget);
    assert!(text_encoding_estimate(&model, 4) <= estimate.tiled());

    // What the engine makes of the same request, decoded whole and tile by tile.
    let (whole, tiled) = {
        let mut cache = ModelCache::new(Placement::cpu(), None);
        cache
            .make_room(&[ModelPath::Pipeline(&model)], 0)
            .expect("room");
        let pipeline = cache.pipeline(&model).expect("load");
        let latents = pipeline.denoise_all(&params, &mut |_| {}).expect("denoise");
        let decode = |tiled| {
            let decoded = pipeline
                .vae_codec()
                .decode_with(&latents.get(0), tiled, &mut || Ok(()));
            decoded.expect("decode").image
        };
        (decode(false), decode(true))
    };
    assert!(!whole.equal(&tiled), "tiling changed nothing");

    let roots = root.path().to_str().expect("utf-8");
    for (budget, expected, tiles) in [
        (tiled_budget, &tiled, true),
        (weights + estimate.whole(), &whole, false),
    ] {
        let server = TestServer::start(&[
            ("SDXLD__MODELS__BASE_ROOTS", roots),
            ("SDXLD__ENGINE__DEFAULT_MODEL", "a"),
            ("SDXLD__ENGINE__MEMORY_BUDGET_BYTES", &budget.to_string()),
        ])
        .await;
        let mut client = server.generation().await;
        let response = client
            .generate_images(pb::GenerateImagesRequest {
                spec: Some(request.clone()),
            })
            .await
            .expect("generated")
            .into_inner();
        let image = common::decoded_image(&response.images[0].data);
        assert!(
            image.equal(expected),
            "budget {budget}: not the engine's {} decode",
            if tiles { "tiled" } else { "whole" }
        );
        let warnings = response.completed.expect("completed").warnings;
        assert_eq!(
            warnings.iter().any(|w| w.contains("tile by tile")),
            tiles,
            "budget {budget}: {warnings:?}"
        );
        // An image that tiles seamlessly is never decoded tile by tile: where only tiles
        // fit, the budget refuses it.
        let seamless = pb::GenerationSpec {
            tiling: pb::Tiling::Both as i32,
            ..request.clone()
        };
        let result = client
            .generate_images(pb::GenerateImagesRequest {
                spec: Some(seamless),
            })
            .await;
        match result {
            Err(status) => {
                assert!(tiles, "budget {budget}: {status:?}");
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                assert!(status.message().contains("budget"), "{status:?}");
            }
            Ok(response) => {
                assert!(!tiles, "budget {budget}: a seamless image decoded in tiles");
                let warnings = response.into_inner().completed.expect("completed").warnings;
                assert!(warnings.is_empty(), "{warnings:?}");
            }
        }
    }
}
