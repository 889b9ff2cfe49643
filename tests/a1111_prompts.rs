//! PROMPT_SYNTAX_A1111 against AUTOMATIC1111's algorithm as
//! `tests/fixtures/make_a1111_prompt_fixtures.py` writes it out over transformers and
//! diffusers: the parse of handwritten and random prompts; the conditioning (weights,
//! BREAK, long prompts with the comma backtrack, negative weights, textual inversion
//! vectors kept in one chunk, prompt and negative padded to one length) within 1e-3 on
//! both tiny pipelines and the refiner; images over gRPC within two levels of diffusers
//! given those embeddings; refusals naming the field.

use crate::common;

use common::prompts::{assert_conditioning, case_embeddings, embed_params, ShortPrompts};
use common::server::{violated_fields, TestServer};
use common::{a1111_prompt_fixtures, assert_close, fixtures, read_tensors};
use sdxld::engine::pipeline::{Placement, SdxlPipeline};
use sdxld::engine::prompt_syntax::a1111::{self, parse_attention};
use sdxld::engine::prompt_syntax::PromptSyntax;
use sdxld::proto::v1 as pb;
use serde_json::Value;

fn json_file(path: std::path::PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture json")).expect("json")
}

#[test]
fn prompts_parse_as_a1111_parses_them() {
    let cases = json_file(a1111_prompt_fixtures().join("parser.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() > 800, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let got = parse_attention(prompt).ok();
        let same = match (&got, case["parse"].as_array()) {
            (None, None) => true,
            (Some(ours), Some(theirs)) => {
                ours.len() == theirs.len()
                    && ours.iter().zip(theirs).all(|(f, t)| {
                        let weight = t[1].as_f64().expect("weight");
                        t[0].as_str() == Some(f.text.as_str())
                            && (f.weight - weight).abs() <= 1e-12 * weight.abs().max(1.0)
                    })
            }
            _ => false,
        };
        if !same {
            failures.push(format!(
                "{prompt:?}\n  A1111: {}\n  sdxld: {got:?}",
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

/// Every prompt in which A1111's schedule grammar (run by lark) finds prompt editing or
/// alternation is refused: no prompt is read without the schedule A1111 would give it.
#[test]
fn every_prompt_a1111_would_schedule_is_refused() {
    let cases = json_file(a1111_prompt_fixtures().join("parser.json"));
    let scheduled: Vec<&str> = cases
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["schedules"] == Value::Bool(true))
        .map(|c| c["prompt"].as_str().expect("prompt"))
        .collect();
    assert!(
        scheduled.len() > 100,
        "{} scheduled prompts",
        scheduled.len()
    );
    let read: Vec<&&str> = scheduled
        .iter()
        .filter(|p| a1111::parse(p).is_ok())
        .collect();
    assert!(read.is_empty(), "read without their schedule: {read:?}");
}

#[test]
fn conditioning_matches_a1111s_on_both_pipelines_and_the_refiner() {
    for config in ["tiny2", "tiny3"] {
        let folder = a1111_prompt_fixtures().join(config);
        let cases = json_file(folder.join("embeds.json"));
        let cases = cases.as_array().expect("cases");
        let reference = read_tensors(&folder.join("embeds.safetensors"));
        let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
            .expect("pipeline");
        for (k, case) in cases.iter().enumerate() {
            let tokens = pipe
                .prompt_tokens(&case_embeddings(config, case))
                .expect("tokens");
            let got = pipe
                .encode_prompt_with(&embed_params(case, PromptSyntax::A1111), &tokens)
                .expect("encode");
            assert_conditioning(
                &format!("{config} case {k}"),
                &got,
                &reference,
                &format!("case_{k}"),
            );
        }
        let refiner_dir = fixtures().join(config).join("refiner");
        if !refiner_dir.exists() {
            continue;
        }
        let refiner = SdxlPipeline::load(&refiner_dir, Placement::cpu()).expect("refiner");
        for (k, case) in cases.iter().take(3).enumerate() {
            let got = refiner
                .encode_prompt(&embed_params(case, PromptSyntax::A1111))
                .expect("encode");
            let key = format!("refiner_{k}");
            assert_conditioning(&format!("{config} refiner {k}"), &got, &reference, &key);
        }
    }
}

/// A second encoder whose config has the legacy `eos_token_id` 2 (as SDXL's published
/// one has): transformers pools at the highest id, a textual inversion token's in the
/// first chunk; A1111 pools at the end-of-text token, and so does this syntax.
#[test]
fn the_pooled_embedding_is_the_end_of_text_tokens_under_a_legacy_config() {
    let folder = a1111_prompt_fixtures().join("tiny2");
    let cases = json_file(folder.join("embeds.json"));
    let reference = read_tensors(&folder.join("embeds.safetensors"));
    let (k, case) = cases
        .as_array()
        .expect("cases")
        .iter()
        .enumerate()
        .find(|(_, c)| c["embeddings"].is_array() && c["negative_prompt"].is_string())
        .expect("a textual inversion case with a negative");
    let legacy = tempfile::tempdir().expect("tempdir");
    common::copy_tree(&fixtures().join("tiny2/pipeline"), legacy.path());
    let config = legacy.path().join("text_encoder_2/config.json");
    common::set_config(&config, "eos_token_id", serde_json::json!(2));
    let pipe = SdxlPipeline::load(legacy.path(), Placement::cpu()).expect("pipeline");
    let tokens = pipe
        .prompt_tokens(&case_embeddings("tiny2", case))
        .expect("tokens");
    let got = pipe
        .encode_prompt_with(&embed_params(case, PromptSyntax::A1111), &tokens)
        .expect("encode");
    assert_conditioning("legacy eos", &got, &reference, &format!("case_{k}"));
}

#[test]
fn weights_move_the_conditioning_and_unweighted_prompts_are_diffusers() {
    let prompts = ShortPrompts::on_tiny2(PromptSyntax::A1111);
    let weighted = [
        "a (red) cat on a chair",
        "a [red] cat on a chair",
        "a (red:0.2) cat on a chair",
    ];
    let plain = prompts.assert_weights_move("a red cat on a chair", &weighted);
    // Weights leave the pooled embedding alone (the first chunk's tokens are the same).
    for prompt in weighted {
        let got = prompts.encode(prompt, None);
        assert_close(&format!("{prompt} pooled"), &got.pooled, &plain.pooled);
    }
    // BREAK starts a chunk: two chunks for two words.
    let broken = prompts.encode("a BREAK b", None);
    assert_eq!(broken.embeds.size(), vec![1, 154, 64]);
}

async fn server() -> TestServer {
    TestServer::with_pipelines(&[]).await
}

/// The request of a recorded pipeline case.
fn spec_of(case: &Value) -> pb::GenerationSpec {
    let text = |key: &str| case[key].as_str().map(str::to_string);
    let number = |key: &str| case[key].as_u64().expect(key) as u32;
    pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: text("prompt").expect("prompt"),
        negative_prompt: text("negative_prompt"),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        seed: case["seed"].as_u64(),
        steps: number("steps"),
        num_images: number("n"),
        width: number("width"),
        height: number("height"),
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        scheduler: pb::Scheduler::Euler as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_prompts_over_grpc_match_diffusers_given_a1111s_embeddings() {
    let server = server().await;
    let folder = a1111_prompt_fixtures().join("tiny2");
    let reference = read_tensors(&folder.join("cases.safetensors"));
    let cases = json_file(folder.join("cases.json"));
    let case = &cases.as_array().expect("cases")[0];
    server
        .assert_matches_case("tiny2 a1111_0", spec_of(case), &reference, "a1111_0")
        .await;
    // The long prompt is encoded whole (no truncation warning), and the PNG's request
    // replays byte for byte.
    let spec = pb::GenerationSpec {
        num_images: 1,
        ..spec_of(case)
    };
    let done = server.images(spec.clone()).await.expect("a1111");
    let warnings = &done.completed.as_ref().expect("completed").warnings;
    assert!(warnings.is_empty(), "{warnings:?}");
    let replay = common::png_spec(&done.images[0].data);
    assert_eq!(replay.prompt_syntax, pb::PromptSyntax::A1111 as i32);
    let again = server.images(replay).await.expect("replay");
    assert_eq!(again.images[0].data, done.images[0].data);
    // The refiner and a hires pass read the same syntax.
    server.assert_refiner_and_hires_pass_run(spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_a1111_syntax_cannot_encode_are_refused_naming_them() {
    let server = server().await;
    let base = pb::GenerationSpec {
        prompt: "a (red:1.2) boat".into(),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        steps: 1,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let status = server
        .images(pb::GenerationSpec {
            prompt: "a [cat:dog:0.5] on a boat".into(),
            prompt_2: Some("<lora:style:0.8> a boat".into()),
            negative_prompt: Some("blurry AND dark".into()),
            negative_prompt_2: Some("(fog:250)".into()),
            ..base.clone()
        })
        .await
        .expect_err("refused");
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
                prompt: "[red|blue] boat".into(),
                ..base.clone()
            },
            "spec.prompt",
        ),
        (
            pb::GenerationSpec {
                prompt: "(boat:1.2.3)".into(),
                ..base.clone()
            },
            "spec.prompt",
        ),
        (
            pb::GenerationSpec {
                prompt: format!("{}boat", "(".repeat(60)),
                ..base.clone()
            },
            "spec.prompt",
        ),
        (
            pb::GenerationSpec {
                negative_prompt: Some("blurry BREAK ".repeat(33)),
                ..base.clone()
            },
            "spec.negative_prompt",
        ),
        (
            pb::GenerationSpec {
                clip_skip: 1,
                ..base.clone()
            },
            "spec.clip_skip",
        ),
    ] {
        let status = server.images(spec).await.expect_err(field);
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
        prompt: "a [cat:dog:0.5] <lora:style:0.8> AND (boat:1.2.3)".into(),
        prompt_syntax: pb::PromptSyntax::Unspecified as i32,
        ..base.clone()
    };
    server.images(plain).await.expect("plain text");
    server.images(base).await.expect("weighted");
}

/// `sdxld generate --prompt-syntax a1111` draws the first image of the pipeline case; a
/// prompt A1111's syntax cannot encode is refused naming its flag.
#[test]
fn a1111_prompts_over_the_cli_match_diffusers() {
    use common::cli::sdxld;

    let folder = a1111_prompt_fixtures().join("tiny2");
    let cases = json_file(folder.join("cases.json"));
    let case = &cases.as_array().expect("cases")[0];
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("a1111.png");
    let run = |prompt: &str| {
        sdxld("generate")
            .flag("--model", fixtures().join("tiny2/pipeline"))
            .args(["--prompt-syntax", "a1111", "--prompt", prompt])
            .args([
                "--negative-prompt",
                case["negative_prompt"].as_str().expect("negative"),
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
    run(case["prompt"].as_str().expect("prompt")).succeeds();
    let reference = read_tensors(&folder.join("cases.safetensors"));
    common::assert_images_match(
        "CLI a1111",
        &common::image_file(&png),
        &reference["a1111_0.images"].get(0),
    );
    let message = run("a [cat|dog]").fails();
    assert!(message.contains("--prompt"), "{message}");
}
