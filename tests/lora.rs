//! LoRA adapters equal diffusers' load_lora_weights + set_adapters: PEFT and kohya-ss files
//! (LoCon convolutions, sgm UNet names, alphas), weights, stacking, text-encoder-only and
//! UNet-only adapters, on both tiny pipelines and in both application modes; over the
//! engine, the CLI and gRPC. No request sees another's adapters, and adapters that do not
//! fit are refused without leaving anything applied.

use crate::common;

use std::rc::Rc;

use common::cli::sdxld;
use common::server::violated_fields;
use common::{assert_images_match, fixtures, read_tensors, Case, CONFIGS};
use sdxld::engine::error::EngineError;
use sdxld::engine::loading::lora::LoraWeights;
use sdxld::engine::lora::{apply, JobLora, LoraMode};
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generation_service_client::GenerationServiceClient;
use tch::Tensor;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// (name, weight) of each adapter of a case.
fn adapters(case: &Case) -> Vec<(String, f64)> {
    case["loras"]
        .as_array()
        .expect("loras")
        .iter()
        .map(|l| {
            (
                l[0].as_str().expect("name").to_string(),
                l[1].as_f64().expect("weight"),
            )
        })
        .collect()
}

fn load(config: &str, name: &str) -> Rc<LoraWeights> {
    let path = fixtures()
        .join(config)
        .join("lora")
        .join(format!("{name}.safetensors"));
    Rc::new(LoraWeights::load(&path, name, tch::Device::Cpu, tch::Kind::Float).expect("lora"))
}

fn job_loras(config: &str, list: &[(String, f64)]) -> Vec<JobLora> {
    list.iter()
        .map(|(name, weight)| JobLora {
            name: name.clone(),
            weights: load(config, name),
            strength: *weight,
            text_encoder_strength: *weight,
        })
        .collect()
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

#[test]
fn loras_match_diffusers_in_both_modes_and_leave_no_trace() {
    for config in CONFIGS {
        let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
            .expect("load");
        common::assert_lora_cases_match_and_leave_no_trace(&pipe, config);
    }
}

#[test]
fn adapters_that_do_not_fit_are_refused_and_leave_nothing_applied() {
    let config = "tiny2";
    let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
        .expect("load");
    let plain_case = common::cases(config, "lora")
        .into_iter()
        .find(|c| c["name"] == "plain")
        .expect("plain");
    let before = pipe.generate(&plain_case.params()).expect("plain");
    for mode in [LoraMode::Merge, LoraMode::Forward] {
        for (name, key) in [
            // Its last text-encoder pair has SD1.5's width; the ones before it fit.
            (
                "wrong_shapes",
                "lora_te1_encoder_layers_2_self_attn_v_proj.lora_down.weight",
            ),
            (
                "no_such_layer",
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight",
            ),
        ] {
            // A good adapter first: it must not stay applied either.
            let mut loras = job_loras(config, &[("style_peft".into(), 1.0)]);
            loras.extend(job_loras(config, &[(name.into(), 1.0)]));
            let err = apply(&pipe, &loras, mode).err().expect("refused");
            match &err {
                EngineError::Lora { lora, key: k, .. } => {
                    assert_eq!((lora.as_str(), k.as_str()), (name, key), "{err}");
                }
                other => panic!("{name}: {other}"),
            }
        }
        let after = pipe.generate(&plain_case.params()).expect("plain again");
        assert!(
            same_bits(&after.latents, &before.latents),
            "({mode:?}): a refused adapter left a trace"
        );
    }
}

#[test]
fn loras_over_the_cli_match_diffusers() {
    let config = "tiny3";
    let dir = fixtures().join(config);
    let reference = read_tensors(&dir.join("lora.safetensors"));
    let out = tempfile::tempdir().expect("tempdir");
    for mode in ["merge", "forward"] {
        let png = out.path().join(format!("{mode}.png"));
        sdxld("generate")
            .args(["--width", "64", "--height", "64"])
            .args(["--prompt", "a knight in shining armour"])
            .args(["--negative-prompt", "blurry"])
            .args(["--seed", "61", "--steps", "4", "--guidance", "5"])
            .args(["--lora", "char_kohya:0.8", "--lora", "style_peft:-0.5"])
            .args(["--lora-mode", mode])
            .flag("--lora-dir", dir.join("lora"))
            .flag("--model", dir.join("pipeline"))
            .flag("--output", &png)
            .succeeds();
        assert_images_match(
            &format!("CLI --lora ({mode})"),
            &common::image_file(&png),
            &reference["stacked.images"].get(0),
        );
    }
    // A weight out of range and an unknown name are refused before anything loads.
    for (arg, expected) in [
        ("style_peft:2.5", "between -2 and 2"),
        ("absent:1", "not found"),
    ] {
        let stderr = sdxld("generate")
            .args(["--prompt", "x", "--steps", "1", "--lora", arg])
            .flag("--lora-dir", dir.join("lora"))
            .flag("--model", dir.join("pipeline"))
            .flag("--output", out.path().join("x.png"))
            .fails();
        assert!(stderr.contains(expected), "{arg}: {stderr}");
    }
}

fn lora(name: &str, weight: f32) -> pb::LoraAdapter {
    pb::LoraAdapter {
        name: name.into(),
        weight: Some(weight),
        text_encoder_weight: None,
    }
}

fn grpc_spec(case: &Case, loras: Vec<pb::LoraAdapter>) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: Some(case["negative_prompt"].as_str().expect("negative").into()),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        guidance_scale: Some(case["guidance"].as_f64().expect("guidance") as f32),
        width: 64,
        height: 64,
        loras,
        ..Default::default()
    }
}

fn case_loras(case: &Case) -> Vec<pb::LoraAdapter> {
    adapters(case)
        .into_iter()
        .map(|(name, weight)| lora(&name, weight as f32))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loras_over_grpc_match_diffusers_without_leaking_in_either_mode() {
    let dir = fixtures().join("tiny2");
    for mode in ["merge", "forward"] {
        let server = lora_server(&dir, mode).await;
        let grpc = GrpcCases {
            client: server.generation().await,
            server,
            reference: read_tensors(&dir.join("lora.safetensors")),
            all: common::cases("tiny2", "lora"),
            mode,
        };
        let plain_bytes = grpc.adapters_apply_and_come_off().await;
        grpc.concurrent_sets_stay_apart(&plain_bytes).await;
        grpc.bad_adapters_leave_nothing_applied(&plain_bytes).await;
        adapters_are_listed_with_their_format_rank_and_targets(&grpc.server).await;
    }
}

/// The tiny2 LoRA cases against a server applying adapters in `mode`.
struct GrpcCases {
    server: common::server::TestServer,
    /// One connection for every request, the concurrent ones multiplexed over it.
    client: GenerationServiceClient<Channel>,
    reference: std::collections::HashMap<String, Tensor>,
    all: Vec<Case>,
    mode: &'static str,
}

impl GrpcCases {
    fn case(&self, name: &str) -> Case {
        self.all
            .iter()
            .find(|c| c["name"] == name)
            .expect("case")
            .clone()
    }

    async fn run(&self, spec: pb::GenerationSpec) -> Result<pb::GenerateImagesResponse, Status> {
        let request = pb::GenerateImagesRequest { spec: Some(spec) };
        self.client
            .clone()
            .generate_images(request)
            .await
            .map(|r| r.into_inner())
    }

    /// Stacked adapters of mixed formats, one weight negative, equal diffusers' image and
    /// are reported in the completed event and the PNG; the plain image before and after
    /// is the same bytes. Returns those bytes.
    async fn adapters_apply_and_come_off(&self) -> Vec<u8> {
        let mode = self.mode;
        let plain = self.case("plain");
        let first = self.run(grpc_spec(&plain, vec![])).await.expect("plain");
        let plain_bytes = first.images[0].data.clone();
        let stacked = self.case("stacked");
        let response = self
            .run(grpc_spec(&stacked, case_loras(&stacked)))
            .await
            .expect("stacked");
        assert_images_match(
            &format!("gRPC stacked ({mode})"),
            &common::decoded_image(&response.images[0].data),
            &self.reference["stacked.images"].get(0),
        );
        let used = response.completed.expect("completed").models;
        for (name, weight) in [("char_kohya", 0.8f32), ("style_peft", -0.5)] {
            let usage = used
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} not reported: {used:?}"));
            assert_eq!(usage.kind, pb::ModelKind::Lora as i32);
            assert_eq!((usage.weight, usage.sha256.len()), (weight, 64));
        }
        let text = common::png_parameters(&response.images[0].data);
        assert!(
            text.contains("<lora:char_kohya:0.8> <lora:style_peft:-0.5>")
                && text.contains("Lora hashes: \"char_kohya: "),
            "PNG parameters lack the LoRAs: {text}"
        );
        let again = self.run(grpc_spec(&plain, vec![])).await.expect("plain");
        assert_eq!(
            again.images[0].data, plain_bytes,
            "({mode}) the LoRAs leaked"
        );
        plain_bytes
    }

    /// Concurrent requests with different sets each get their own.
    async fn concurrent_sets_stay_apart(&self, plain_bytes: &[u8]) {
        let names = ["peft_full", "te_only", "unet_only", "plain"];
        let [a, b, c, d] = names.map(|name| {
            let case = self.case(name);
            grpc_spec(&case, case_loras(&case))
        });
        let (a, b, c, d) = tokio::join!(self.run(a), self.run(b), self.run(c), self.run(d));
        let responses = [a, b, c, d];
        for (name, response) in names.into_iter().zip(responses) {
            let response = response.expect(name);
            assert_images_match(
                &format!("gRPC concurrent {name} ({})", self.mode),
                &common::decoded_image(&response.images[0].data),
                &self.reference[&format!("{name}.images")].get(0),
            );
            if name == "plain" {
                assert_eq!(
                    response.images[0].data, plain_bytes,
                    "({}) concurrent leak",
                    self.mode
                );
            }
        }
    }

    /// Errors name what is wrong; nothing stays applied; the server keeps serving.
    async fn bad_adapters_leave_nothing_applied(&self, plain_bytes: &[u8]) {
        let plain = self.case("plain");
        let status = self
            .run(grpc_spec(&plain, vec![lora("absent", 1.0)]))
            .await
            .expect_err("unknown");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = self
            .run(grpc_spec(&plain, vec![lora("style_peft", 2.5)]))
            .await
            .expect_err("weight");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), ["spec.loras[0].weight"]);
        for bad in ["wrong_shapes", "no_such_layer"] {
            let loras = vec![lora("style_peft", 1.0), lora(bad, 1.0)];
            let status = self.run(grpc_spec(&plain, loras)).await.expect_err(bad);
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, "LORA_INCOMPATIBLE");
            assert_eq!(info.metadata["lora"], bad);
            assert!(
                status.message().contains(&info.metadata["key"]),
                "{}",
                status.message()
            );
        }
        let last = self.run(grpc_spec(&plain, vec![])).await.expect("plain");
        assert_eq!(
            last.images[0].data, plain_bytes,
            "({}) a refused LoRA leaked",
            self.mode
        );
    }
}

/// The models RPC describes each adapter's format, rank and targets, and its hash once
/// it has been used.
async fn adapters_are_listed_with_their_format_rank_and_targets(
    server: &common::server::TestServer,
) {
    let list = server.list_models(pb::ModelKind::Lora).await;
    let info = |name: &str| {
        list.iter()
            .find(|m| m.name == name)
            .and_then(|m| m.lora.clone())
            .unwrap_or_else(|| panic!("{name} not listed"))
    };
    use pb::LoraTarget::{TextEncoder, TextEncoder2, Unet};
    for (name, format, rank, targets) in [
        (
            "style_peft",
            pb::LoraFormat::Peft,
            4,
            vec![Unet, TextEncoder, TextEncoder2],
        ),
        (
            "char_kohya",
            pb::LoraFormat::Kohya,
            4,
            vec![Unet, TextEncoder, TextEncoder2],
        ),
        (
            "te_only_peft",
            pb::LoraFormat::Peft,
            3,
            vec![TextEncoder, TextEncoder2],
        ),
        ("unet_only_peft", pb::LoraFormat::Peft, 3, vec![Unet]),
    ] {
        let got = info(name);
        assert_eq!(got.format, format as i32, "{name}");
        assert_eq!(got.rank, rank, "{name}");
        let targets: Vec<i32> = targets.into_iter().map(|t| t as i32).collect();
        assert_eq!(got.targets, targets, "{name}");
    }
    let resident = list
        .iter()
        .find(|m| m.name == "style_peft")
        .expect("listed");
    assert!(resident.resident && resident.sha256.len() == 64);
}

#[test]
fn loras_are_cached_by_content_within_the_budget() {
    use sdxld::engine::cache::{ModelCache, ModelPath};
    use sdxld::engine::weights::loaded_bytes;

    let dir = fixtures().join("tiny2").join("lora");
    let (a, b) = (
        dir.join("style_peft.safetensors"),
        dir.join("unet_only_peft.safetensors"),
    );
    let copy = tempfile::tempdir().expect("tempdir");
    let a_again = copy.path().join("same_style.safetensors");
    std::fs::copy(&a, &a_again).expect("copy");
    let bytes = |p: &std::path::Path| loaded_bytes(p, None, tch::Kind::Float).expect("bytes");
    // Room for either adapter, not both.
    let budget = bytes(&a) + bytes(&b) - 1;
    let mut cache = ModelCache::new(Placement::cpu(), Some(budget));
    cache.make_room(&[ModelPath::Lora(&a)], 0).expect("room");
    let first = cache.lora(&a, "style_peft").expect("load");
    assert_eq!(cache.stats().resident_bytes, bytes(&a));
    // The same content under another name is the same copy, not a second load.
    let shared = cache.lora(&a_again, "same_style").expect("load");
    assert!(Rc::ptr_eq(&first, &shared));
    assert_eq!(cache.stats().component_loads, 1);
    drop((first, shared));
    cache.make_room(&[ModelPath::Lora(&b)], 0).expect("room");
    assert!(
        !cache.is_lora_resident(&a),
        "the least recently used LoRA stays"
    );
    cache.lora(&b, "unet_only_peft").expect("load");
    assert!(cache.is_lora_resident(&b));
    assert_eq!(cache.stats().evictions, 1);
    assert_eq!(cache.stats().resident_bytes, bytes(&b));
}

#[test]
fn auto_mode_merges_when_the_copies_fit_the_budget_and_goes_forward_otherwise() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use sdxld::engine::cache::{activation_estimate, ModelPath};
    use sdxld::engine::hashes::FileHashes;
    use sdxld::engine::lora::merged_bytes;
    use sdxld::jobs::engine::Engine;

    let pipeline = fixtures().join("tiny2/pipeline");
    let lora = fixtures().join("tiny2/lora/char_kohya.safetensors");
    let params = GenerateParams {
        width: 64,
        height: 64,
        ..GenerateParams::default()
    };
    let weights = common::weights_bytes(&pipeline) + common::weights_bytes(&lora);
    let activations = activation_estimate(&pipeline, &params, 4);
    let copies = merged_bytes(&[(lora.as_path(), "char_kohya")], 4).expect("header");
    assert!(copies > 0);
    let models = [ModelPath::Pipeline(&pipeline), ModelPath::Lora(&lora)];
    let room = |budget: u64, mode: LoraMode| {
        Engine::new(
            Placement::cpu(),
            Some(budget),
            0,
            FileHashes::new(),
            Arc::new(Mutex::new(HashSet::new())),
        )
        .with_lora_mode(mode)
        .make_room(&models, &[(pipeline.as_path(), params.clone())], 0, copies)
        .map(|room| room.lora_mode)
    };
    let roomy = weights + activations + copies;
    let tight = weights + activations + copies / 2;
    assert_eq!(room(roomy, LoraMode::Auto).expect("fits"), LoraMode::Merge);
    assert_eq!(
        room(tight, LoraMode::Auto).expect("fits"),
        LoraMode::Forward
    );
    assert_eq!(
        room(tight, LoraMode::Forward).expect("fits"),
        LoraMode::Forward
    );
    assert!(matches!(
        room(tight, LoraMode::Merge),
        Err(EngineError::MemoryBudget(_))
    ));
    // Not even the weights fit: refused whatever the mode.
    assert!(matches!(
        room(weights, LoraMode::Auto),
        Err(EngineError::MemoryBudget(_))
    ));
}

#[test]
fn the_pipeline_counts_the_adapter_sets_on_it_until_they_come_off() {
    // CUDA graphs replay the UNet only while no set is on: they read the weights in place.
    let pipe =
        SdxlPipeline::load(&fixtures().join("tiny2/pipeline"), Placement::cpu()).expect("load");
    let case = common::cases("tiny2", "lora")
        .into_iter()
        .find(|c| c["name"] != "plain")
        .expect("an adapter case");
    let loras = job_loras("tiny2", &adapters(&case));
    assert_eq!(pipe.adapted().get(), 0);
    let merged = apply(&pipe, &loras, LoraMode::Merge).expect("merge");
    let forward = apply(&pipe, &loras[..1], LoraMode::Forward).expect("forward");
    assert_eq!(pipe.adapted().get(), 2);
    drop(forward);
    assert_eq!(pipe.adapted().get(), 1);
    drop(merged);
    assert_eq!(pipe.adapted().get(), 0);
    let none = apply(&pipe, &[], LoraMode::Merge).expect("no adapters");
    assert_eq!(pipe.adapted().get(), 0, "an empty set adapts nothing");
    drop(none);
}

/// A job with adapters that stops mid-run (cancelled, its client gone, past its
/// deadline) leaves nothing applied: the next plain request gets the same bytes as the
/// one before, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_stopped_mid_run_leaves_no_adapter_applied() {
    let dir = fixtures().join("tiny2");
    let all = common::cases("tiny2", "lora");
    let case = |name: &str| all.iter().find(|c| c["name"] == name).expect("case");
    let (plain, stacked) = (case("plain"), case("stacked"));
    for mode in ["merge", "forward"] {
        let server = lora_server(&dir, mode).await;
        let before = plain_image(&server, plain).await;
        for stop in ["cancel", "drop", "deadline"] {
            // Far from its end: 150 steps at 512² take about 45 s.
            let mut long = grpc_spec(stacked, case_loras(stacked));
            (long.steps, long.width, long.height) = (150, 512, 512);
            long.client_job_id = format!("{mode}-{stop}");
            match stop {
                "cancel" => {
                    let mut stream = start_adapted_job(&server, &long, None).await;
                    let reached = reach_adapted_step(&mut stream).await;
                    reached.unwrap_or_else(|status| panic!("{mode} {stop}: {status:?}"));
                    let request = pb::CancelJobRequest {
                        client_job_id: long.client_job_id.clone(),
                        ..Default::default()
                    };
                    let answer = server.generation().await.cancel_job(request).await;
                    assert!(answer.expect("cancel").into_inner().cancelled, "{mode}");
                    let (_, end) = common::server::drain(Ok(tonic::Response::new(stream))).await;
                    assert_eq!(end.expect_err("cancelled").code(), tonic::Code::Cancelled);
                }
                "drop" => {
                    let mut stream = start_adapted_job(&server, &long, None).await;
                    let reached = reach_adapted_step(&mut stream).await;
                    reached.unwrap_or_else(|status| panic!("{mode} {stop}: {status:?}"));
                    drop(stream);
                }
                _ => stop_past_deadline(&server, &long, mode).await,
            }
            let after = plain_image(&server, plain).await;
            assert!(
                after == before,
                "({mode}) adapters outlived a job stopped by {stop}"
            );
        }
    }
}

/// Runs `spec` under a deadline that passes after its adapters are on (step 2 reached)
/// and long before its end. Two loaded cores can hold the run short of step 2 for a
/// while, so a deadline that passes first is tried again with a longer one; the run is
/// at 1024² (four times the work of 512², some three minutes unloaded), so that once
/// the load lifts it cannot end before even the longest deadline.
async fn stop_past_deadline(
    server: &common::server::TestServer,
    spec: &pb::GenerationSpec,
    mode: &str,
) {
    for secs in [15, 45, 120] {
        let timeout = std::time::Duration::from_secs(secs);
        // The job a passed deadline stopped may still hold its id for a moment.
        let attempt = pb::GenerationSpec {
            client_job_id: format!("{}-{secs}", spec.client_job_id),
            width: 1024,
            height: 1024,
            ..spec.clone()
        };
        let mut stream = start_adapted_job(server, &attempt, Some(timeout)).await;
        match reach_adapted_step(&mut stream).await {
            Ok(()) => {
                let (_, end) = common::server::drain(Ok(tonic::Response::new(stream))).await;
                let code = end.expect_err("past its deadline").code();
                assert_eq!(code, tonic::Code::DeadlineExceeded, "{mode}");
                return;
            }
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                eprintln!("{mode}: a {secs} s deadline passed before step 2; trying a longer one");
            }
            Err(status) => panic!("{mode} deadline: {status:?}"),
        }
    }
    panic!("{mode}: the job never reached step 2 within 120 s");
}

async fn start_adapted_job(
    server: &common::server::TestServer,
    spec: &pb::GenerationSpec,
    timeout: Option<std::time::Duration>,
) -> tonic::Streaming<pb::GenerateResponse> {
    let mut request = tonic::Request::new(pb::GenerateRequest {
        spec: Some(spec.clone()),
    });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let started = server.generation().await.generate(request).await;
    started.expect("admitted").into_inner()
}

/// Waits for denoising step 2, when the job's adapters are on; the stream's error if it
/// ends first.
async fn reach_adapted_step(
    stream: &mut tonic::Streaming<pb::GenerateResponse>,
) -> Result<(), tonic::Status> {
    use pb::generate_response::Event;
    use tokio_stream::StreamExt;
    while let Some(message) = stream.next().await {
        if let Some(Event::Progress(p)) = message?.event {
            if p.stage == pb::Stage::Denoising as i32 && p.step >= 2 {
                return Ok(());
            }
        }
    }
    Err(tonic::Status::internal("the job ended before step 2"))
}

async fn plain_image(server: &common::server::TestServer, plain: &Case) -> Vec<u8> {
    let spec = grpc_spec(plain, vec![]);
    server.images(spec).await.expect("plain").images[0]
        .data
        .clone()
}

/// A server on `dir`'s pipeline with its LoRA folder, in LoRA `mode`.
async fn lora_server(dir: &std::path::Path, mode: &str) -> common::server::TestServer {
    common::server::TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            dir.join("pipeline").to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__LORA_ROOTS",
            dir.join("lora").to_str().expect("utf-8"),
        ),
        ("SDXLD__ENGINE__LORA_MODE", mode),
    ])
    .await
}
