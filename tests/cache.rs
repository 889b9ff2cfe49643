//! The model cache on the CPU with a byte budget small enough that eviction happens:
//! least-recently-used eviction and residency in ListModels, identical images for A, B,
//! A, a job that can never fit, admin LoadModel/UnloadModel with the admin token,
//! single-flight loading under 20 concurrent requests, and components shared by content
//! (the refiner's second text encoder and VAE are the base's).

mod common;

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

#[test]
fn evicted_components_wait_on_the_host_and_come_back_unchanged() {
    use sdxld::engine::cache::ModelPath;
    use sdxld::engine::pipeline::GenerateParams;

    let root = tempfile::tempdir().expect("tempdir");
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        sdxld::engine::demo::write_demo_model(&root.path().join(name), seed).expect("demo");
    }
    let size = weights_bytes(&root.path().join("a"));
    let mut cache =
        ModelCache::with_host_budget(Placement::cpu(), Some(size * 5 / 2), size * 5 / 2);
    let p = GenerateParams {
        prompt: "a lighthouse".into(),
        steps: 2,
        width: 64,
        height: 64,
        seed: 4,
        ..GenerateParams::default()
    };
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
