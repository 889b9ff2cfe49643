//! PROMPT_SYNTAX_COMPEL against compel 2.5 (`tests/fixtures/make_prompt_syntax_fixtures.py`):
//! the parse of handwritten and random prompts equal to compel's; the conditioning
//! (weights above and below 1, long prompts in chunks split at sentence, phrase and word
//! ends, blends, conjunctions, negatives padded to the positive's length) within 1e-3 of
//! CompelForSDXL's on both tiny pipelines and the refiner; images over gRPC within two
//! levels of diffusers given compel's embeddings; refusals naming the field.

use crate::common;

use std::collections::HashMap;

use common::prompts::{assert_conditioning, case_embeddings, embed_params, ShortPrompts};
use common::server::{violated_fields, TestServer};
use common::{assert_close, fixtures, prompt_syntax_fixtures, read_tensors};
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};
use sdxld::engine::prompt_syntax::{parse_unchecked, Part, PromptSyntax};
use sdxld::proto::v1 as pb;
use serde_json::Value;
use tch::Tensor;

/// Our parse of `prompt` as the fixture records compel's: null where compel fails, swaps,
/// names a LoRA or has a weight that is not finite.
fn ours(prompt: &str) -> Value {
    let Ok(parsed) = parse_unchecked(prompt) else {
        return Value::Null;
    };
    let mut weights: Vec<f64> = Vec::new();
    for (part, weight) in &parsed.parts {
        weights.push(*weight);
        match part {
            Part::Fragments(list) => weights.extend(list.iter().map(|f| f.weight)),
            Part::Blend {
                prompts,
                weights: w,
                ..
            } => {
                weights.extend(w);
                weights.extend(prompts.iter().flatten().map(|f| f.weight));
            }
        }
    }
    if weights.iter().any(|w| !w.is_finite()) {
        return Value::Null;
    }
    parsed.describe()
}

#[test]
fn prompts_parse_as_compel_parses_them() {
    let path = prompt_syntax_fixtures().join("parser.json");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("parser.json")).expect("json");
    assert!(cases.len() > 700, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let got = ours(prompt);
        if got != case["parse"] {
            failures.push(format!(
                "{prompt:?}\n  compel: {}\n  sdxld:  {got}",
                case["parse"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts parse differently:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn embed_cases(config: &str) -> (Vec<Value>, HashMap<String, Tensor>) {
    let folder = prompt_syntax_fixtures().join(config);
    let cases = serde_json::from_str(
        &std::fs::read_to_string(folder.join("embeds.json")).expect("embeds.json"),
    )
    .expect("json");
    (cases, read_tensors(&folder.join("embeds.safetensors")))
}

#[test]
fn conditioning_matches_compel_for_sdxl() {
    for config in ["tiny2", "tiny3"] {
        let (cases, reference) = embed_cases(config);
        let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
            .expect("pipeline");
        for (k, case) in cases.iter().enumerate() {
            let got = pipe
                .encode_prompt(&embed_params(case, PromptSyntax::Compel))
                .expect("encode");
            assert_conditioning(
                &format!("{config} case {k}"),
                &got,
                &reference,
                &format!("case_{k}"),
            );
        }
        // The refiner's only encoder reads the first prompt, as diffusers pairs them.
        let refiner_dir = fixtures().join(config).join("refiner");
        if !refiner_dir.exists() {
            continue;
        }
        let refiner = SdxlPipeline::load(&refiner_dir, Placement::cpu()).expect("refiner");
        for (k, case) in cases.iter().take(3).enumerate() {
            let params = GenerateParams {
                negative_prompt: Some(case["negative_prompt"].as_str().unwrap_or("").into()),
                ..embed_params(case, PromptSyntax::Compel)
            };
            let got = refiner.encode_prompt(&params).expect("encode");
            assert_conditioning(
                &format!("{config} refiner {k}"),
                &got,
                &reference,
                &format!("refiner_{k}"),
            );
        }
    }
}

/// Textual inversion tokens inside weighted fragments (a three-vector token expanded, a
/// negative embedding weighted down), as compel's diffusers textual inversion manager
/// reads them after `load_textual_inversion` on both encoders.
#[test]
fn textual_inversion_tokens_weigh_as_compel_weighs_them() {
    for config in ["tiny2", "tiny3"] {
        let folder = prompt_syntax_fixtures().join(config);
        let cases: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(folder.join("ti.json")).expect("ti.json"),
        )
        .expect("json");
        let reference = read_tensors(&folder.join("ti.safetensors"));
        let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
            .expect("pipeline");
        for (k, case) in cases.iter().enumerate() {
            let embeddings = case_embeddings(config, case);
            let tokens = pipe.prompt_tokens(&embeddings).expect("tokens");
            let got = pipe
                .encode_prompt_with(&embed_params(case, PromptSyntax::Compel), &tokens)
                .expect("encode");
            assert_conditioning(
                &format!("{config} ti {k}"),
                &got,
                &reference,
                &format!("ti_{k}"),
            );
        }
    }
}

#[test]
fn weights_move_the_conditioning_and_plain_prompts_stay_as_they_were() {
    let prompts = ShortPrompts::on_tiny2(PromptSyntax::Compel);
    let plain = prompts.assert_weights_move(
        "a red cat on a chair",
        &[
            "a (red)1.5 cat on a chair",
            "a (red)0.5 cat on a chair",
            "a red cat on a chair--",
        ],
    );
    // `(red)1` is the unweighted prompt.
    let one = prompts.encode("a (red)1 cat on a chair", None);
    assert_close("weight 1", &one.text.embeds, &plain.text.embeds);
    // A plain prompt with syntax characters is read literally.
    let literal = prompts.encode("a (red)1.5 cat on a chair", Some(PromptSyntax::Plain));
    assert_eq!(literal.text.embeds.size(), vec![1, 77, 64]);
}

async fn server() -> TestServer {
    TestServer::with_pipelines(&[]).await
}

/// The request of a recorded pipeline case on `config`.
fn spec_of(config: &str, case: &Value) -> pb::GenerationSpec {
    let text = |key: &str| case[key].as_str().map(str::to_string);
    pb::GenerationSpec {
        model: format!("{config}/pipeline"),
        prompt: text("prompt").expect("prompt"),
        prompt_2: text("prompt_2"),
        negative_prompt: text("negative_prompt"),
        prompt_syntax: pb::PromptSyntax::Compel as i32,
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().expect("steps") as u32,
        num_images: case["n"].as_u64().expect("n") as u32,
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_prompts_over_grpc_match_diffusers_given_compels_embeddings() {
    let server = server().await;
    for config in ["tiny2", "tiny3"] {
        let folder = prompt_syntax_fixtures().join(config);
        let reference = read_tensors(&folder.join("cases.safetensors"));
        let cases: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(folder.join("cases.json")).expect("cases.json"),
        )
        .expect("json");
        for case in cases {
            let key = case["name"].as_str().expect("name");
            server
                .assert_matches_case(
                    &format!("{config} {key}"),
                    spec_of(config, &case),
                    &reference,
                    key,
                )
                .await;
        }
    }
    // The long prompt is encoded whole: no truncation warning, unlike plain syntax; the
    // PNG's request replays byte for byte.
    let case = &serde_json::from_str::<Vec<Value>>(
        &std::fs::read_to_string(prompt_syntax_fixtures().join("tiny2/cases.json")).expect("json"),
    )
    .expect("json")[0];
    let spec = pb::GenerationSpec {
        num_images: 1,
        ..spec_of("tiny2", case)
    };
    let weighted = server.images(spec.clone()).await.expect("compel");
    let warnings = &weighted.completed.as_ref().expect("completed").warnings;
    assert!(warnings.is_empty(), "{warnings:?}");
    let replay = common::png_spec(&weighted.images[0].data);
    assert_eq!(replay.prompt_syntax, pb::PromptSyntax::Compel as i32);
    let again = server.images(replay).await.expect("replay");
    assert_eq!(again.images[0].data, weighted.images[0].data);
    let plain = server
        .images(pb::GenerationSpec {
            prompt_syntax: pb::PromptSyntax::Plain as i32,
            ..spec.clone()
        })
        .await
        .expect("plain");
    let warnings = &plain.completed.as_ref().expect("completed").warnings;
    assert!(
        warnings.iter().any(|w| w.contains("truncated")),
        "{warnings:?}"
    );
    assert_ne!(plain.images[0].data, weighted.images[0].data);
    // The refiner and a hires pass read the same syntax.
    server.assert_refiner_and_hires_pass_run(spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_compel_cannot_read_are_refused_naming_them() {
    let server = server().await;
    let base = pb::GenerationSpec {
        prompt: "a (red)1.2 boat".into(),
        prompt_syntax: pb::PromptSyntax::Compel as i32,
        steps: 1,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let refused = |spec: pb::GenerationSpec| {
        let server = &server;
        async move {
            match server.images(spec).await {
                Ok(_) => panic!("admitted"),
                Err(status) => status,
            }
        }
    };
    let status = refused(pb::GenerationSpec {
        prompt: r#"("a", "b").blend(heavy, 1)"#.into(),
        prompt_2: Some("withLora(style, 0.5) a boat".into()),
        negative_prompt: Some("a boat.swap(ship)".into()),
        negative_prompt_2: Some("(fog)250".into()),
        ..base.clone()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        [
            "spec.negative_prompt",
            "spec.negative_prompt_2",
            "spec.prompt",
            "spec.prompt_2"
        ]
    );
    for (spec, field) in [
        (
            pb::GenerationSpec {
                prompt: r#"("a", "b").blend(1, -1)"#.into(),
                ..base.clone()
            },
            "spec.prompt",
        ),
        (
            pb::GenerationSpec {
                prompt: "(a b)0.5 c ".repeat(17),
                ..base.clone()
            },
            "spec.prompt",
        ),
        (
            pb::GenerationSpec {
                clip_skip: 1,
                ..base.clone()
            },
            "spec.clip_skip",
        ),
        (
            pb::GenerationSpec {
                prompt_syntax: 7,
                ..base.clone()
            },
            "spec.prompt_syntax",
        ),
    ] {
        let status = refused(spec).await;
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert_eq!(
            violated_fields(&status),
            vec![field.to_string()],
            "{status:?}"
        );
    }
    // The same text is a plain prompt without the syntax, and the server keeps serving.
    let plain = pb::GenerationSpec {
        prompt: r#"("a", "b").blend(heavy, 1) a boat.swap(ship)"#.into(),
        prompt_syntax: pb::PromptSyntax::Unspecified as i32,
        ..base.clone()
    };
    server.images(plain).await.expect("plain text");
    server.images(base).await.expect("weighted");
}

/// `sdxld generate --prompt-syntax compel` runs the tiny3 pipeline case; a prompt compel
/// cannot read is refused naming its flag.
#[test]
fn compel_prompts_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let folder = prompt_syntax_fixtures().join("tiny3");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(folder.join("cases.json")).expect("json"))
            .expect("json");
    let case = &cases[0];
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("compel.png");
    let run = |prompt: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny3/pipeline"))
            .args(["--prompt-syntax", "compel", "--prompt", prompt])
            .args(["--prompt-2", case["prompt_2"].as_str().expect("prompt_2")])
            .args(["--width", "64", "--height", "96", "--scheduler", "euler"])
            .args([
                "--seed",
                &case["seed"].to_string(),
                "--steps",
                &case["steps"].to_string(),
            ])
            .flag("--output", &png)
    };
    run(case["prompt"].as_str().expect("prompt")).succeeds();
    let reference = read_tensors(&folder.join("cases.safetensors"));
    common::assert_images_match(
        "CLI compel",
        &common::image_file(&png),
        &reference["compel_0.images"].get(0),
    );
    let message = run("a boat.swap(ship)").fails();
    assert!(message.contains("--prompt"), "{message}");
}
