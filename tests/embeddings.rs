//! Textual inversion embeddings against diffusers' `load_textual_inversion`
//! (`tests/fixtures/make_embedding_fixtures.py`), over gRPC: latents within 1e-3 and
//! images within two levels, the models used and the PNG parameters, nothing left behind
//! for the next request, and bad embeddings refused naming the field.

use crate::common;

use common::server::{violated_fields, TestServer};
use common::{assert_images_match, embedding_fixtures, fixtures, read_tensors};
use sdxld::proto::v1 as pb;
use serde_json::Value;
use tch::Tensor;

/// The cases the fixture script recorded for `config`.
fn cases(config: &str) -> Vec<Value> {
    let path = embedding_fixtures().join(config).join("cases.json");
    let text = std::fs::read_to_string(&path).expect("cases.json");
    serde_json::from_str(&text).expect("json")
}

/// A server whose base roots hold the pipeline fixtures and the legacy pipeline, and
/// whose embedding roots hold the fixtures' embeddings and `extra` (a folder of files
/// that are not embeddings).
async fn server(extra: &std::path::Path) -> TestServer {
    let pipelines = fixtures();
    let embeddings = embedding_fixtures();
    let bases = format!("{},{}", pipelines.display(), embeddings.display());
    let embedding_roots = format!("{},{}", embeddings.display(), extra.display());
    TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipelines.join("tiny2/pipeline").to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__BASE_ROOTS", &bases),
        (
            "SDXLD__MODELS__REFINER_ROOTS",
            pipelines.to_str().expect("utf-8"),
        ),
        ("SDXLD__MODELS__EMBEDDING_ROOTS", &embedding_roots),
        ("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
    ])
    .await
}

fn text(case: &Value, key: &str) -> Option<String> {
    case[key].as_str().map(str::to_string)
}

/// The request of a recorded case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let embeddings = case["embeddings"]
        .as_array()
        .expect("embeddings")
        .iter()
        .map(|e| pb::TextualInversion {
            name: format!("{config}/embeddings/{}", e[0].as_str().expect("stem")),
            token: e[1].as_str().unwrap_or_default().into(),
        })
        .collect();
    let model = match case["pipeline"].as_str() {
        Some("legacy") => format!("{config}/legacy"),
        _ => format!("{config}/pipeline"),
    };
    let refiner = case["refiner_fraction"].as_f64().map(|f| pb::RefinerStage {
        model: format!("{config}/refiner"),
        mode: pb::RefinerMode::EnsembleOfExperts as i32,
        high_noise_fraction: Some(f as f32),
        ..Default::default()
    });
    pb::GenerationSpec {
        model,
        prompt: text(case, "prompt").expect("prompt"),
        prompt_2: text(case, "prompt_2"),
        negative_prompt: text(case, "negative_prompt"),
        negative_prompt_2: text(case, "negative_prompt_2"),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        num_images: case["n"].as_u64().expect("n") as u32,
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        embeddings,
        refiner,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_diffusers_and_leave_nothing_behind() {
    let extra = tempfile::tempdir().expect("tempdir");
    let server = server(extra.path()).await;
    let plain = pb::GenerationSpec {
        prompt: "a lighthouse_style lighthouse at dusk".into(),
        negative_prompt: Some("NegXL, blurry".into()),
        seed: Some(70),
        steps: 4,
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    };
    let before = server.images(plain.clone()).await.expect("plain").images;
    for config in ["tiny2", "tiny3"] {
        let reference = read_tensors(&embedding_fixtures().join(config).join("cases.safetensors"));
        for case in cases(config) {
            let name = format!("{config} {}", case["name"].as_str().expect("name"));
            let spec = spec_of(config, &case);
            let key = case["name"].as_str().expect("name");
            server
                .assert_matches_case(&name, spec, &reference, key)
                .await;
        }
    }

    // The first case, its models and its parameters; then the same words without the
    // embeddings: another image, and the one the server gave before any embedding.
    let case = &cases("tiny2")[0];
    let done = server.images(spec_of("tiny2", case)).await.expect("case 0");
    let used: Vec<(String, i32)> = done
        .completed
        .as_ref()
        .expect("completed")
        .models
        .iter()
        .filter(|m| !m.sha256.is_empty())
        .map(|m| (m.name.clone(), m.kind))
        .collect();
    for stem in ["lighthouse_style", "NegXL"] {
        let name = format!("tiny2/embeddings/{stem}");
        assert!(
            used.contains(&(name.clone(), pb::ModelKind::Embedding as i32)),
            "{name} is among the models used, hashed: {used:?}"
        );
    }
    let parameters = common::png_parameters(&done.images[0].data);
    assert!(
        parameters.contains("TI hashes: \"lighthouse_style: ") && parameters.contains(", NegXL: "),
        "{parameters}"
    );
    let with = common::decoded_image(&done.images[0].data);
    let after = server.images(plain).await.expect("plain again").images;
    assert_eq!(
        before[0].data, after[0].data,
        "the embeddings left something behind"
    );
    let without = common::decoded_image(&after[0].data);
    let moved = common::image_difference(&with, &without);
    assert!(
        moved > 20,
        "the embeddings change the image by {moved} levels only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embeddings_are_refused_naming_the_field() {
    let extra = tempfile::tempdir().expect("tempdir");
    // A LoRA file among the embeddings, and an embedding of another width.
    let lora = fixtures().join("tiny2/lora/style_peft.safetensors");
    std::fs::copy(&lora, extra.path().join("not_an_embedding.safetensors")).expect("copy");
    let nan = Tensor::from_slice(&[f32::NAN; 32]).view([1, 32]);
    let fine = Tensor::zeros([1, 32], (tch::Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(
        &[("clip_l", &nan), ("clip_g", &fine)],
        extra.path().join("nan_vectors.safetensors"),
    )
    .expect("write");
    let server = server(extra.path()).await;
    let spec = |embeddings: Vec<(&str, &str)>| pb::GenerationSpec {
        prompt: "lighthouse_style".into(),
        steps: 1,
        width: 64,
        height: 64,
        embeddings: embeddings
            .into_iter()
            .map(|(name, token)| pb::TextualInversion {
                name: name.into(),
                token: token.into(),
            })
            .collect(),
        ..Default::default()
    };
    let style = "tiny2/embeddings/lighthouse_style";
    let neg = "tiny2/embeddings/NegXL";
    let refused = [
        (vec![(style, "glow")], "spec.embeddings[0].token"),
        (
            vec![(style, ""), (neg, "lighthouse_style")],
            "spec.embeddings[1].token",
        ),
        (
            vec![(style, ""), (neg, "lighthouse_style_2")],
            "spec.embeddings[1].token",
        ),
        (
            vec![(neg, "style_1"), (style, "style")],
            "spec.embeddings[1].token",
        ),
        (vec![(style, "two words")], "spec.embeddings[0].token"),
        (vec![("", "x")], "spec.embeddings[0].name"),
        (
            vec![("../tiny2/embeddings/NegXL", "")],
            "spec.embeddings[0].name",
        ),
    ];
    for (embeddings, field) in refused {
        let what = format!("{embeddings:?}");
        server
            .assert_invalid(&what, spec(embeddings), &[field])
            .await;
    }
    let many: Vec<(&str, &str)> = (0..17).map(|_| (style, "")).collect();
    let status = server.images(spec(many)).await.expect_err("17");
    assert_eq!(
        violated_fields(&status),
        vec!["spec.embeddings".to_string()]
    );

    let status = server
        .images(spec(vec![("tiny2/embeddings/absent", "")]))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    for (name, says) in [
        ("not_an_embedding", "not an SDXL textual inversion"),
        ("nan_vectors", "NaN or infinite"),
        ("tiny3/embeddings/NegXL", "48 wide"),
    ] {
        let status = server.images(spec(vec![(name, "")])).await.expect_err(name);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(says), "{name}: {status:?}");
        assert!(
            !status
                .message()
                .contains(extra.path().to_str().expect("utf-8")),
            "{name}: the message shows a server path: {status:?}"
        );
    }
    // Listed as embeddings with their vectors (or why they are none); loading one checks
    // its file; the server still serves.
    let infos = server.list_models(pb::ModelKind::Embedding).await;
    let info = |name: &str| {
        let model = infos.iter().find(|m| m.name == name).expect(name);
        model.embedding.clone().expect("embedding info")
    };
    let style_info = info(style);
    let widths = (
        style_info.vectors,
        style_info.width,
        style_info.vectors_2,
        style_info.width_2,
    );
    assert_eq!(widths, (3, 32, 3, 32));
    assert!(style_info.error.is_empty());
    let foreign = info("not_an_embedding").error;
    assert!(
        foreign.contains("not an SDXL textual inversion"),
        "{foreign}"
    );
    assert!(
        !foreign.contains(extra.path().to_str().expect("utf-8")),
        "{foreign}"
    );
    let listed: Vec<String> = infos.into_iter().map(|m| m.name).collect();
    assert!(
        listed.contains(&style.to_string()) && listed.contains(&"not_an_embedding".to_string()),
        "{listed:?}"
    );
    let mut models = server.models().await;
    let load = |name: &str| pb::LoadModelRequest {
        name: name.into(),
        kind: pb::ModelKind::Embedding as i32,
    };
    models
        .load_model(load(style))
        .await
        .expect("an embedding loads");
    let status = models
        .load_model(load("not_an_embedding"))
        .await
        .expect_err("foreign");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    server
        .images(spec(vec![(style, "")]))
        .await
        .expect("a good embedding after the bad ones");
    // Named with its extension, its token is still the file's stem.
    let named = format!("{style}.safetensors");
    let status = server
        .images(spec(vec![(&named, ""), (neg, "lighthouse_style")]))
        .await
        .expect_err("the stem twice");
    assert_eq!(
        violated_fields(&status),
        vec!["spec.embeddings[1].token".to_string()]
    );
}

/// The engine refuses a token the model's own tokenizer has (the API checks CLIP's
/// vocabulary; a model may bring another), naming the embedding's index.
#[test]
fn a_token_the_models_tokenizer_has_is_refused_by_the_engine() {
    use sdxld::engine::error::EngineError;
    use sdxld::engine::pipeline::{Placement, SdxlPipeline};
    use sdxld::engine::textual_inversion::Embedding;

    let pipeline =
        SdxlPipeline::load(&fixtures().join("tiny2/pipeline"), Placement::cpu()).expect("tiny2");
    let file = embedding_fixtures().join("tiny2/embeddings/NegXL.safetensors");
    let good = Embedding::read(&file, 0, "NegXL", "negxl").expect("read");
    let known = Embedding::read(&file, 1, "NegXL", "lighthouse</w>").expect("read");
    match pipeline.prompt_tokens(&[good, known]) {
        Err(EngineError::EmbeddingToken { index, message }) => {
            assert_eq!(index, 1);
            assert!(message.contains("already a token"), "{message}");
        }
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("a vocabulary token was taken"),
    }
}

/// `sdxld generate --embedding FILE[:TOKEN]` runs the recorded tiny3 case; a token CLIP
/// has is refused naming the flag.
#[test]
fn embeddings_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let case = &cases("tiny3")[0];
    assert_eq!(case["embeddings"][1][1], "lhs");
    let folder = embedding_fixtures().join("tiny3");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("embedded.png");
    let run = |token: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .flag("--embedding", folder.join("embeddings/NegXL.safetensors"))
            .arg("--embedding")
            .arg(format!(
                "{}:{token}",
                folder
                    .join("embeddings/lighthouse_style.safetensors")
                    .display()
            ))
            .args(["--prompt", case["prompt"].as_str().expect("prompt")])
            .args([
                "--negative-prompt",
                case["negative_prompt"].as_str().expect("negative"),
            ])
            .args([
                "--negative-prompt-2",
                case["negative_prompt_2"].as_str().expect("negative 2"),
            ])
            .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--steps",
                &case["steps"].to_string(),
            ])
            .flag("--output", &png)
    };
    run("lhs").succeeds();
    let reference = read_tensors(&folder.join("cases.safetensors"));
    let got = common::image_file(&png);
    assert_images_match("CLI embeddings", &got, &reference["ti_0.images"].get(0));
    let message = run("glow").fails();
    assert!(
        message.contains("--embedding") && message.contains("CLIP token"),
        "{message}"
    );
}
