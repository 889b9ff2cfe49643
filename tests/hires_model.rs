//! The hires pass on another base model (A1111's "Hires checkpoint") equals diffusers'
//! recipe with the img2img pipeline built from that model's components, over gRPC: the
//! latents interpolated or the first model's decoded image through an upscaler (the
//! other model's VAE encoding it), the pass's own prompt, a LoRA on both models (merged
//! and in the forward pass), a refiner after it, and a non-square config. The PNG
//! parameters and `completed.models` name the model; a replay is byte for byte; nothing
//! of the job stays on either model; `spec.vae` replaces its VAE; a tight budget counts
//! it. Bad models are refused naming the field.

use crate::common;
use crate::hires::{cases, check_images, listed_upscaler, spec_of_case, with_texts};

use common::server::{drain, violated_fields, TestServer};
use common::{hires_fixtures, read_tensors, Case};
use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generate_response::Event;
use tonic::Code;

/// A server whose base roots hold the pipeline fixtures and the hires models, with the
/// refiners, the hires upscalers and tiny2's LoRAs, and `extra` settings.
async fn hires_model_server(extra: &[(&str, &str)]) -> TestServer {
    let pipelines = common::fixtures();
    let models = hires_fixtures().join("models");
    let base_roots = format!("{},{}", pipelines.display(), models.display());
    let upscalers = hires_fixtures().join("upscalers");
    let loras = pipelines.join("tiny2/lora");
    let default = pipelines.join("tiny2/pipeline");
    let mut env = vec![
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            default.to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__BASE_ROOTS", base_roots.as_str()),
        (
            "SDXLD__MODELS__REFINER_ROOTS",
            pipelines.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__UPSCALER_ROOTS",
            upscalers.to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__LORA_ROOTS", loras.to_str().expect("utf-8")),
    ];
    env.extend_from_slice(extra);
    TestServer::start(&env).await
}

/// The cases of `config` whose hires pass runs its hires model.
fn own_model_cases(config: &str) -> Vec<Case> {
    let all = cases(config);
    all.into_iter()
        .filter(|c| c["hires_model"].as_bool() == Some(true))
        .collect()
}

/// The request of a hires-model case on `config`'s pipeline, with its texts and LoRAs.
fn spec_of(config: &str, case: &Case, upscaler: &str) -> pb::GenerationSpec {
    let mut spec = with_texts(case, spec_of_case(config, case, upscaler));
    let loras = case["loras"].as_array().cloned().unwrap_or_default();
    spec.loras = loras
        .iter()
        .map(|l| pb::LoraAdapter {
            name: l[0].as_str().expect("a name").into(),
            weight: l[1].as_f64().map(|w| w as f32),
            text_encoder_weight: None,
        })
        .collect();
    if let Some(hires) = spec.hires.as_mut() {
        hires.model = format!("{config}_hires");
    }
    spec
}

/// Every hires-model case of both configs equals the recipe (images and latents), the
/// LoRA case in merged mode here and in the forward pass too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hires_model_runs_the_pass_as_the_recipe_runs() {
    let server = hires_model_server(&[]).await;
    let upscaler = listed_upscaler(&server, "hires_rrdb_x2").await;
    let mut ran = 0;
    for config in common::CONFIGS {
        let reference = read_tensors(&hires_fixtures().join(config).join("cases.safetensors"));
        for case in own_model_cases(config) {
            let what = format!("{config} {}", case.name());
            let spec = spec_of(config, &case, &upscaler);
            server
                .assert_matches_case(&what, spec, &reference, case.name())
                .await;
            ran += 1;
        }
    }
    assert_eq!(ran, 5, "the hires-model cases");
    let forward = hires_model_server(&[("SDXLD__ENGINE__LORA_MODE", "forward")]).await;
    let reference = read_tensors(&hires_fixtures().join("tiny2/cases.safetensors"));
    let with_lora: Vec<Case> = own_model_cases("tiny2")
        .into_iter()
        .filter(|c| c["loras"].is_array())
        .collect();
    assert_eq!(with_lora.len(), 1);
    let case = &with_lora[0];
    let spec = spec_of("tiny2", case, &upscaler);
    let what = format!("tiny2 {} forward", case.name());
    forward
        .assert_matches_case(&what, spec, &reference, case.name())
        .await;
}

/// The stream reports the passes in order; the PNG parameters write `Hires checkpoint`
/// with the model's short hash, `completed.models` lists it after the base; a replay is
/// byte for byte; and a LoRA job leaves neither model changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hires_model_is_named_replayed_and_leaves_nothing_behind() {
    let server = hires_model_server(&[]).await;
    server.assert_feature("hires.model").await;
    let upscaler = listed_upscaler(&server, "hires_rrdb_x2").await;
    let cases = own_model_cases("tiny2");
    let reference = read_tensors(&hires_fixtures().join("tiny2/cases.safetensors"));
    let upscaled = cases
        .iter()
        .find(|c| c["hires_upscaler"].is_string())
        .expect("an upscaler case");
    let spec = spec_of("tiny2", upscaled, &upscaler);
    let (events, end) = server
        .stream(tonic::Request::new(pb::GenerateRequest {
            spec: Some(spec.clone()),
        }))
        .await;
    end.expect("the hires-model job completes");
    let images = &reference[&format!("{}.images", upscaled.name())];
    check_images("upscaled", &events, images, (128, 128));
    let Some(Event::Completed(completed)) = events.last() else {
        panic!("no completed event");
    };
    let bases: Vec<(&str, &str)> = (completed.models.iter())
        .filter(|m| m.kind == pb::ModelKind::Base as i32)
        .map(|m| (m.name.as_str(), m.sha256.as_str()))
        .collect();
    assert_eq!(bases.len(), 2, "{bases:?}");
    assert_eq!(bases[0].0, "tiny2/pipeline");
    assert_eq!(bases[1].0, "tiny2_hires");
    assert_ne!(bases[0].1, bases[1].1);
    let Some(Event::Image(first)) = events.iter().find(|e| matches!(e, Event::Image(_))) else {
        panic!("no image");
    };
    let text = common::png_parameters(&first.data);
    let entry = format!("Hires checkpoint: tiny2_hires [{}]", &bases[1].1[..10]);
    assert!(text.contains(&entry), "`{entry}` in {text}");
    assert!(text.contains("Model: tiny2/pipeline"), "{text}");
    server.assert_replays("hires model", spec).await;

    // Both models alone, before and after a job that puts a LoRA on each.
    let alone = |model: &str| pb::GenerationSpec {
        model: model.into(),
        prompt: "a lighthouse at dusk".into(),
        seed: Some(5),
        steps: 3,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let before = [
        server.images(alone("tiny2/pipeline")).await.expect("base"),
        server.images(alone("tiny2_hires")).await.expect("other"),
    ];
    let with_lora = cases
        .iter()
        .find(|c| c["loras"].is_array())
        .expect("a LoRA case");
    server
        .images(spec_of("tiny2", with_lora, &upscaler))
        .await
        .expect("with a LoRA");
    let after = [
        server.images(alone("tiny2/pipeline")).await.expect("base"),
        server.images(alone("tiny2_hires")).await.expect("other"),
    ];
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.images[0].data, a.images[0].data, "a model kept the LoRA");
    }
    assert_ne!(before[0].images[0].data, before[1].images[0].data);
}

/// An unknown model is NOT_FOUND; an inpainting model, or one whose UNet lacks what the
/// request asks of both passes (PAG's layers) INVALID_ARGUMENT naming spec.hires.model;
/// a refiner FAILED_PRECONDITION; spec.model's own name runs the pass on it; the server
/// serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hires_models_are_refused() {
    let server = hires_model_server(&[]).await;
    let mut client = server.generation().await;
    let quick = |model: &str| pb::GenerationSpec {
        prompt: "a field".into(),
        width: 64,
        height: 64,
        steps: 2,
        seed: Some(1),
        hires: Some(pb::HiresPass {
            model: model.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = (client.generate_images(pb::GenerateImagesRequest {
        spec: Some(quick("no_such_model")),
    }))
    .await
    .expect_err("an unknown model");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let refused = server
        .refused_or_completed("inpainting", quick("tiny2/inpaint_pipeline"))
        .await
        .expect_err("an inpainting model");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "spec.hires.model");
    assert!(refused[0].1.contains("inpainting"), "{refused:?}");

    let mut perturbed = quick("tiny3_hires");
    perturbed.pag = Some(pb::PerturbedAttentionGuidance {
        scale: Some(2.0),
        ..Default::default()
    });
    let status = (client.generate_images(pb::GenerateImagesRequest {
        spec: Some(perturbed),
    }))
    .await
    .expect_err("other self-attention layers");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        vec!["spec.hires.model".to_string()]
    );

    let status = (client.generate_images(pb::GenerateImagesRequest {
        spec: Some(quick("tiny2/refiner")),
    }))
    .await
    .expect_err("a refiner");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("refiner"), "{status:?}");

    // spec.model's own name is the first pass's model: the same pixels as none.
    let on_base = |hires_model: &str| pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        ..quick(hires_model)
    };
    let pixels = |done: pb::GenerateImagesResponse| {
        let image = image::load_from_memory(&done.images[0].data).expect("an image");
        image.to_rgb8().into_raw()
    };
    let same = server
        .images(on_base("tiny2/pipeline"))
        .await
        .expect("same");
    let none = server.images(on_base("")).await.expect("none");
    assert_eq!(pixels(same), pixels(none));
    let (_, end) = drain(
        client
            .generate(pb::GenerateRequest {
                spec: Some(quick("tiny2_hires")),
            })
            .await,
    )
    .await;
    end.expect("the server serves on");
}

/// `spec.vae` replaces the hires model's VAE too: with bilinear latents (so that the
/// first model decodes nothing) the pass on the hires model with `spec.vae` gives the
/// pixels of a copy of the hires model whose own VAE is that one, and other pixels than
/// the hires model's own VAE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_vae_replaces_the_hires_models_vae() {
    let root = tempfile::tempdir().expect("tempdir");
    let copy = root.path().join("hires_alt_vae");
    common::copy_tree(&crate::hires::hires_model_dir("tiny2"), &copy);
    std::fs::remove_dir_all(copy.join("vae")).expect("remove the vae");
    let vae = common::fixtures().join("tiny2/vae_alt");
    common::copy_tree(&vae, &copy.join("vae"));
    let pipelines = common::fixtures();
    let base_roots = format!(
        "{},{},{}",
        pipelines.display(),
        hires_fixtures().join("models").display(),
        root.path().display()
    );
    let vae_roots = pipelines.join("tiny2");
    let server = TestServer::start(&[
        ("SDXLD__MODELS__BASE_ROOTS", base_roots.as_str()),
        (
            "SDXLD__MODELS__VAE_ROOTS",
            vae_roots.to_str().expect("utf-8"),
        ),
    ])
    .await;
    let spec = |hires_model: &str, vae: &str| pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: "a lighthouse at dusk".into(),
        seed: Some(8),
        steps: 3,
        width: 64,
        height: 64,
        vae: vae.into(),
        hires: Some(pb::HiresPass {
            model: hires_model.into(),
            latent_upscale: pb::LatentUpscale::Bilinear as i32,
            steps: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let pixels = |done: pb::GenerateImagesResponse| {
        let image = image::load_from_memory(&done.images[0].data).expect("an image");
        image.to_rgb8().into_raw()
    };
    let replaced = server.images(spec("tiny2_hires", "vae_alt")).await;
    let own = server.images(spec("hires_alt_vae", "")).await;
    let unreplaced = server.images(spec("tiny2_hires", "")).await;
    let replaced = pixels(replaced.expect("with spec.vae"));
    assert_eq!(replaced, pixels(own.expect("its own vae")));
    assert_ne!(replaced, pixels(unreplaced.expect("without spec.vae")));
}

/// A memory budget counts both models: one that holds both only without their text
/// encoders beside the hires pass's activations serves the job with both models' text
/// encoders on the host once the prompts are encoded, and the images equal an unbudgeted
/// server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_budget_moves_both_models_text_encoders_to_the_host() {
    use sdxld::engine::cache::{activation_estimate, text_encoding_estimate};
    use sdxld::engine::pipeline::GenerateParams;

    let root = tempfile::tempdir().expect("tempdir");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    sdxld::engine::demo::write_demo_model(&a, 1).expect("demo a");
    sdxld::engine::demo::write_demo_model(&b, 2).expect("demo b");
    let request = pb::GenerationSpec {
        model: "a".into(),
        prompt: "a lighthouse".into(),
        seed: Some(3),
        steps: 2,
        width: 128,
        height: 128,
        hires: Some(pb::HiresPass {
            model: "b".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let final_size = GenerateParams {
        width: 256,
        height: 256,
        ..GenerateParams::default()
    };
    let text_encoders = |m: &std::path::Path| {
        common::weights_bytes(&m.join("text_encoder"))
            + common::weights_bytes(&m.join("text_encoder_2"))
    };
    let weights = common::weights_bytes(&a) + common::weights_bytes(&b);
    let encoders = text_encoders(&a) + text_encoders(&b);
    let activations = activation_estimate(&a, &final_size, 4);
    let budget = weights - encoders + activations;
    assert!(weights + text_encoding_estimate(&a, 4) <= budget);
    assert!(budget < weights + activations);
    let roots = root.path().to_str().expect("utf-8");
    let pixels = |done: pb::GenerateImagesResponse| {
        let image = image::load_from_memory(&done.images[0].data).expect("an image");
        image.to_rgb8().into_raw()
    };
    let reference = {
        let server = TestServer::start(&[("SDXLD__MODELS__BASE_ROOTS", roots)]).await;
        pixels(server.images(request.clone()).await.expect("unbudgeted"))
    };
    let server = TestServer::start(&[
        ("SDXLD__MODELS__BASE_ROOTS", roots),
        ("SDXLD__ENGINE__MEMORY_BUDGET_BYTES", &budget.to_string()),
    ])
    .await;
    let metric = |name: &str| {
        let text = server.metrics();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    for round in 1..=2 {
        let done = server.images(request.clone()).await.expect("budgeted");
        assert_eq!(pixels(done), reference, "round {round}: the image differs");
        assert_eq!(metric("sdxld_model_cache_host_bytes"), encoders as f64);
        assert_eq!(
            metric("sdxld_model_cache_resident_bytes"),
            (weights - encoders) as f64
        );
        assert_eq!(
            metric("sdxld_text_encoder_offloads_total"),
            f64::from(4 * round)
        );
    }
}

/// The memory estimate takes each pass on the model that runs it: a hires pass on a
/// wider UNet than the first pass's needs that UNet's activations, so the least budget
/// that holds the job whole grows by exactly the difference of the two models'
/// estimates at the final size (large enough that the activations, not the text
/// encoders beside the prompts' encoding, bound the budget). (The wider model is a copy of tiny2 whose UNet config
/// says it is twice as wide: the estimate reads the configs, and nothing loads.)
#[test]
fn the_memory_estimate_takes_the_hires_pass_on_its_own_model() {
    use sdxld::engine::cache::{activation_estimate, text_encoding_estimate, ModelPath};
    use sdxld::engine::device::Placement;
    use sdxld::engine::hashes::FileHashes;
    use sdxld::engine::pipeline::GenerateParams;
    use sdxld::jobs::engine::Engine;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    let first = common::fixtures().join("tiny2/pipeline");
    let root = tempfile::tempdir().expect("tempdir");
    let own = root.path().join("wide");
    common::copy_tree(&first, &own);
    let config_path = own.join("unet/config.json");
    let text = std::fs::read_to_string(&config_path).expect("unet config");
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
    let widths = config["block_out_channels"]
        .as_array()
        .expect("widths")
        .clone();
    let doubled: Vec<u64> = widths
        .iter()
        .map(|w| 2 * w.as_u64().expect("a width"))
        .collect();
    config["block_out_channels"] = serde_json::json!(doubled);
    std::fs::write(&config_path, config.to_string()).expect("write");
    let at = |side: i64| GenerateParams {
        width: side,
        height: side,
        ..GenerateParams::default()
    };
    let (small, large) = (
        activation_estimate(&first, &at(1024), 4),
        activation_estimate(&own, &at(1024), 4),
    );
    let encoding = text_encoding_estimate(&first, 4).max(text_encoding_estimate(&own, 4));
    assert!(
        encoding < small && small < large,
        "{encoding} {small} {large}"
    );
    let models = [ModelPath::Pipeline(&first), ModelPath::Pipeline(&own)];
    // The least budget that holds the job with its images decoded whole.
    let least = |second: &Path| {
        let passes = [(first.as_path(), at(512)), (second, at(1024))];
        let whole = |budget: u64| {
            let resident = Arc::new(Mutex::new(std::collections::HashSet::new()));
            let mut engine = Engine::new(
                Placement::cpu(),
                Some(budget),
                0,
                FileHashes::new(),
                resident,
            );
            let room = engine.make_room(&models, &passes, 0, 0);
            room.is_ok_and(|room| !room.tiled_decode)
        };
        let (mut low, mut high) = (0u64, 1 << 40);
        while low + 1 < high {
            let middle = low + (high - low) / 2;
            if whole(middle) {
                high = middle;
            } else {
                low = middle;
            }
        }
        high
    };
    assert_eq!(least(&own) - least(&first), large - small);
}
