//! PROMPT_SYNTAX_A1111 against AUTOMATIC1111's algorithm as
//! `tests/fixtures/make_a1111_prompt_fixtures.py` writes it out over transformers and
//! diffusers: the parse of handwritten and random prompts; the conditioning (weights,
//! BREAK, long prompts with the comma backtrack, negative weights, textual inversion
//! vectors kept in one chunk, prompt and negative padded to one length and the tokens
//! each attends to) within 1e-3 on both tiny pipelines and the refiner; images over gRPC
//! within two levels of diffusers given that conditioning, prompt and negative of
//! different lengths in passes of their own as A1111 runs them; refusals naming the
//! field.

use crate::common;

use common::prompts::{assert_conditioning, case_embeddings, embed_params, ShortPrompts};
use common::server::{violated_fields, TestServer};
use common::{a1111_prompt_fixtures, assert_close, fixtures, read_tensors};
use sdxld::engine::pipeline::{Placement, SdxlPipeline};
use sdxld::engine::prompt_syntax::a1111::parse_attention;
use sdxld::engine::prompt_syntax::a1111_schedule::{self, StepClock};
use sdxld::engine::prompt_syntax::{PromptSyntax, SyntaxError};
use sdxld::proto::v1 as pb;
use serde_json::Value;

pub(crate) fn json_file(path: std::path::PathBuf) -> Value {
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

/// The clocks the fixture schedules every prompt under (`CLOCKS`): passes of 20, 7 and
/// 1 steps, and a hires pass of 10 after 20.
const CLOCKS: [StepClock; 4] = [
    StepClock {
        steps: 20,
        first_pass_steps: None,
    },
    StepClock {
        steps: 7,
        first_pass_steps: None,
    },
    StepClock {
        steps: 1,
        first_pass_steps: None,
    },
    StepClock {
        steps: 10,
        first_pass_steps: Some(20),
    },
];

/// Every prompt's texts per step, under every clock, are the ones A1111's prompt
/// schedules (its lark grammar, as A1111 runs it) give: edits, alternations, nesting,
/// fractions, hires offsets, prompts the grammar cannot parse (read as they are) and
/// steps A1111 fails on (refused).
#[test]
fn prompts_schedule_as_a1111_schedules_them() {
    let cases = json_file(a1111_prompt_fixtures().join("parser.json"));
    let cases = cases.as_array().expect("cases");
    let mut failures = Vec::new();
    let (mut changing, mut refused) = (0, Vec::new());
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        for (clock, expected) in CLOCKS
            .iter()
            .zip(case["schedules"].as_array().expect("schedules"))
        {
            let got = a1111_schedule::schedule(prompt, *clock);
            let same = match (&got, expected.as_array()) {
                // An edit A1111's parser may read either way is refused.
                (Err(SyntaxError::Unsupported(e)), _) if e.contains("depending on") => {
                    refused.push(prompt);
                    true
                }
                (Err(_), None) => expected == "error",
                (Ok(ours), Some(theirs)) => {
                    ours.len() == theirs.len()
                        && ours.iter().zip(theirs).all(|((step, text), t)| {
                            t[0].as_u64() == Some(*step as u64) && t[1].as_str() == Some(text)
                        })
                }
                _ => false,
            };
            changing += usize::from(got.as_ref().is_ok_and(|s| s.len() > 1));
            if !same {
                failures.push(format!(
                    "{prompt:?} {clock:?}\n  A1111: {expected}\n  sdxld: {got:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} schedules differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(changing > 500, "{changing} schedules change");
    refused.dedup();
    // Refused: only prompts with stray brackets or colons right after an edit.
    assert!(
        refused.iter().all(|p| p.contains("]]")
            || p.contains("]:")
            || p.contains("])")
            || p.contains("](")
            || p.contains("][")),
        "{refused:?}"
    );
}

/// A pass's steps as A1111 counts them: a hires pass counts whole-number steps past the
/// first pass's and fractions past 1.0; a second-order scheduler counts two model calls
/// a step. Texts that come back are encoded once.
#[test]
fn passes_count_a_prompts_steps_as_a1111_counts_them() {
    use sdxld::engine::request::{GenerateParams, SchedulerOverrides};
    use sdxld::engine::schedulers::SchedulerKind;

    let pipe =
        SdxlPipeline::load(&fixtures().join("tiny2/pipeline"), Placement::cpu()).expect("pipeline");
    let encode = |prompt: &str, steps, first_pass_steps, class| {
        let p = GenerateParams {
            prompt: prompt.into(),
            prompt_syntax: PromptSyntax::A1111,
            steps,
            first_pass_steps,
            scheduler_overrides: SchedulerOverrides {
                class,
                ..Default::default()
            },
            ..Default::default()
        };
        pipe.encode_prompt(&p).expect("encode").later
    };
    let switches = |prompt, steps, first, class| encode(prompt, steps, first, class).switches;
    let once: Vec<(usize, usize)> = Vec::new();
    assert_eq!(switches("a [b:25]", 10, Some(20), None), [(0, 0), (6, 1)]);
    assert_eq!(switches("a [b:1.5]", 10, Some(20), None), [(0, 0), (6, 1)]);
    assert_eq!(switches("a [b:25]", 10, None, None), once);
    assert_eq!(switches("a [b:0.5]", 10, Some(20), None), once);
    assert_eq!(switches("a [b:0.5]", 10, None, None), [(0, 0), (6, 1)]);
    let heun = Some(SchedulerKind::Heun);
    assert_eq!(switches("a [b:0.5]", 10, None, heun), [(0, 0), (11, 1)]);
    let alternating = encode("[cat|dog]", 4, None, None);
    assert_eq!(alternating.switches, [(0, 0), (2, 1), (3, 0), (4, 1)]);
    assert_eq!(alternating.texts.len(), 1);
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
        assert_close(
            &format!("{prompt} pooled"),
            &got.text.pooled,
            &plain.text.pooled,
        );
    }
    // BREAK starts a chunk: two chunks for two words.
    let broken = prompts.encode("a BREAK b", None);
    assert_eq!(broken.text.embeds.size(), vec![1, 154, 64]);
}

pub(crate) async fn server() -> TestServer {
    TestServer::with_pipelines_and_controlnets().await
}

/// The request of a recorded pipeline case.
pub(crate) fn spec_of(case: &Value) -> pb::GenerationSpec {
    let text = |key: &str| case[key].as_str().map(str::to_string);
    let number = |key: &str| case[key].as_u64().expect(key) as u32;
    pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: text("prompt").expect("prompt"),
        prompt_2: text("prompt_2"),
        negative_prompt: text("negative_prompt"),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        seed: case["seed"].as_u64(),
        steps: number("steps"),
        num_images: number("n"),
        width: number("width"),
        height: number("height"),
        guidance_scale: case["guidance"].as_f64().map(|g| g as f32),
        scheduler: pb::Scheduler::Euler as i32,
        init_image: case["strength"]
            .as_f64()
            .map(|strength| common::fixture_init_image("tiny2", Some(strength as f32))),
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

/// Prompt editing and alternation change the conditioning at the steps A1111 changes
/// it: the images equal diffusers' with each call's conditioning swapped in (a prompt
/// whose chunks shrink, a negative that empties to zeros, edits in `prompt_2` only, an
/// image to image run counting its own steps); a guider's unguided calls, perturbed
/// guidance, a ControlNet, the refiner and a hires pass read the edits too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_alternations_change_the_conditioning_at_a1111s_steps() {
    let server = server().await;
    let folder = a1111_prompt_fixtures().join("tiny2");
    let reference = read_tensors(&folder.join("cases.safetensors"));
    let cases = json_file(folder.join("cases.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() >= 4, "{} cases", cases.len());
    for (k, case) in cases.iter().enumerate().skip(1) {
        let name = format!("a1111_{k}");
        server
            .assert_matches_case(&format!("tiny2 {name}"), spec_of(case), &reference, &name)
            .await;
    }
    // The same request without its edits is another image: the edits act.
    let unedited = pb::GenerationSpec {
        prompt: "a red lighthouse, stormy sea".into(),
        negative_prompt: None,
        num_images: 1,
        ..spec_of(&cases[1])
    };
    let edited = pb::GenerationSpec {
        num_images: 1,
        ..spec_of(&cases[1])
    };
    let (a, b) = (
        server.images(unedited).await.expect("unedited"),
        server.images(edited.clone()).await.expect("edited"),
    );
    assert_ne!(a.images[0].data, b.images[0].data);
    // Each text serves a guider's unguided calls (the prompt's half of the batch, its
    // length changing at step 2), perturbed-attention guidance's third part and a
    // ControlNet's calls too.
    let guider = pb::Guider {
        kind: pb::GuiderKind::Cfg as i32,
        stop: Some(0.5),
        ..Default::default()
    };
    let pag = pb::PerturbedAttentionGuidance {
        scale: Some(3.0),
        ..Default::default()
    };
    for spec in [
        pb::GenerationSpec {
            guider: Some(guider),
            ..edited.clone()
        },
        pb::GenerationSpec {
            pag: Some(pag),
            ..edited.clone()
        },
        pb::GenerationSpec {
            controlnets: vec![common::fixture_control_unit("tiny2")],
            ..edited.clone()
        },
    ] {
        let done = server.images(spec).await.expect("guided with edits");
        assert_ne!(done.images[0].data, b.images[0].data);
    }
    server.assert_refiner_and_hires_pass_run(edited).await;
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
            prompt: "a [cat:dog:0.5]] on a boat".into(),
            prompt_2: Some("<lora:style:0.8> a boat".into()),
            negative_prompt: Some("blurry [dark:night:1e400]".into()),
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
                prompt: "[red:blue:1e400] boat".into(),
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

/// A1111's emphasis modes over gRPC: "No norm" and "Ignore" are other images than
/// "Original", "No norm" is written into the PNG's parameters and replays byte for
/// byte, "None" reads a weight A1111's parser refuses as text, and an emphasis without
/// A1111's syntax is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emphasis_modes_weigh_as_a1111s_settings_weigh() {
    let server = server().await;
    server.assert_feature("emphasis").await;
    let base = pb::GenerationSpec {
        prompt: "a (red:1.4) cat on a [blue chair]".into(),
        negative_prompt: Some("(blurry:1.2)".into()),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        steps: 2,
        width: 64,
        height: 64,
        seed: Some(4),
        ..Default::default()
    };
    let with = |emphasis: pb::Emphasis| pb::GenerationSpec {
        emphasis: emphasis as i32,
        ..base.clone()
    };
    let original = server.images(base.clone()).await.expect("original");
    let no_norm = server
        .images(with(pb::Emphasis::NoNorm))
        .await
        .expect("no norm");
    let ignore = server
        .images(with(pb::Emphasis::Ignore))
        .await
        .expect("ignore");
    let pixels = |r: &pb::GenerateImagesResponse| common::decoded_image(&r.images[0].data);
    for other in [&no_norm, &ignore] {
        assert!(common::image_difference(&pixels(&original), &pixels(other)) > 0);
    }
    let parameters = common::png_parameters(&no_norm.images[0].data);
    assert!(parameters.contains(", Emphasis: No norm"), "{parameters}");
    let parameters = common::png_parameters(&original.images[0].data);
    assert!(!parameters.contains("Emphasis"), "{parameters}");
    let replay = common::png_spec(&no_norm.images[0].data);
    assert_eq!(replay.emphasis, pb::Emphasis::NoNorm as i32);
    let again = server.images(replay).await.expect("replay");
    assert_eq!(again.images[0].data, no_norm.images[0].data);
    let literal = pb::GenerationSpec {
        prompt: "(boat:1.2.3) BREAK".into(),
        ..with(pb::Emphasis::None)
    };
    server.images(literal.clone()).await.expect("literal");
    server
        .assert_invalid(
            "original",
            pb::GenerationSpec {
                emphasis: pb::Emphasis::Original as i32,
                ..literal
            },
            &["spec.prompt"],
        )
        .await;
    let compel = pb::GenerationSpec {
        prompt_syntax: pb::PromptSyntax::Compel as i32,
        prompt: "a cat".into(),
        negative_prompt: None,
        ..with(pb::Emphasis::NoNorm)
    };
    server
        .assert_invalid("compel", compel, &["spec.emphasis"])
        .await;
    let unknown = pb::GenerationSpec {
        emphasis: 9,
        ..base.clone()
    };
    server
        .assert_invalid("an unknown emphasis", unknown, &["spec.emphasis"])
        .await;
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
    let message = run("a [cat:dog:2]] boat").fails();
    assert!(message.contains("--prompt"), "{message}");
    // --emphasis reaches the request: "none" reads a weight the parser refuses as text,
    // and without A1111's syntax it is refused naming its flag.
    run("(boat:1.2.3)").args(["--emphasis", "none"]).succeeds();
    let message = sdxld("generate")
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .args([
            "--prompt",
            "a boat",
            "--emphasis",
            "no-norm",
            "--steps",
            "1",
        ])
        .args(["--width", "64", "--height", "64"])
        .flag("--output", &png)
        .fails();
    assert!(message.contains("--emphasis"), "{message}");
}
