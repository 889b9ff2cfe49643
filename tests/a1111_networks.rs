//! What A1111 takes out of a prompt before reading it, against A1111's algorithm as
//! `tests/fixtures/make_a1111_prompt_fixtures.py` writes it out: comments, as its
//! comments script strips them; LoRA tags (`<lora:name:te:unet>`), taken out of
//! prompts with their multipliers read as `extra_networks.parse_prompt` and
//! `ExtraNetworkLora.activate` read them; images over gRPC within two levels of
//! diffusers with each LoRA's text encoder and UNet weights set apart; the same as
//! `spec.loras`; the PNG parameters; refusals naming the field.

use crate::a1111_prompts::{json_file, spec_of};
use crate::common;

use common::server::{error_reason, TestServer};
use common::{a1111_prompt_fixtures, read_tensors};
use sdxld::engine::prompt_syntax::a1111::without_comments;
use sdxld::engine::prompt_syntax::a1111_networks::extra_networks;
use sdxld::proto::v1 as pb;
use serde_json::Value;

/// Whether A1111 reads the tag `network` (its kind, arguments and what `activate` made
/// of them) as a LoRA whose multipliers sdxld reads too: a LoRA kind, numbers, no `dyn`,
/// no named argument `activate` ignores, and multipliers in ASCII within the spaces
/// `float()` strips.
fn sdxld_reads(network: &Value) -> bool {
    let kind = network["kind"].as_str().expect("kind");
    let read = &network["lora"];
    let Some(read) = read.as_array() else {
        return false;
    };
    let ascii = network["items"]
        .as_array()
        .expect("items")
        .iter()
        .skip(1)
        .all(|item| {
            let python_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
            item.as_str()
                .expect("item")
                .trim_matches(python_space)
                .is_ascii()
        });
    matches!(kind, "lora" | "lyco")
        && read[3].is_null()
        && read[4].as_array().is_some_and(Vec::is_empty)
        && ascii
}

/// Python's `repr` of a float, as a number.
fn python_float(repr: &Value) -> f64 {
    match repr.as_str().expect("repr") {
        "nan" | "-nan" => f64::NAN,
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        text => text.parse().expect("a float"),
    }
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// Every prompt loses the tags A1111 takes out of it and names the LoRAs with the
/// multipliers A1111 reads, or is refused where A1111 would not run the LoRA as written
/// (another kind of network, a multiplier that is not a number, `dyn`, a named argument
/// A1111 ignores, another script's digits).
#[test]
fn prompt_tags_read_as_a1111_reads_them() {
    let cases = json_file(a1111_prompt_fixtures().join("networks.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() > 1500, "{} cases", cases.len());
    let (mut read, mut refused) = (0, 0);
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let networks = case["networks"].as_array().expect("networks");
        let expected = networks.iter().all(sdxld_reads);
        match extra_networks(prompt) {
            Ok(got) => {
                assert!(
                    expected,
                    "{prompt:?}: read, A1111 would not run {networks:?}"
                );
                assert_eq!(got.text, case["text"].as_str().expect("text"), "{prompt:?}");
                assert_eq!(got.loras.len(), networks.len(), "{prompt:?}");
                for (lora, network) in got.loras.iter().zip(networks) {
                    let want = network["lora"].as_array().expect("lora");
                    assert_eq!(lora.name, want[0].as_str().expect("name"), "{prompt:?}");
                    let te = python_float(&want[1]);
                    let unet = python_float(&want[2]);
                    assert!(
                        same(lora.text_encoder_weight, te) && same(lora.unet_weight, unet),
                        "{prompt:?}: {lora:?}, A1111 reads te {te}, unet {unet}"
                    );
                }
                read += usize::from(!networks.is_empty());
            }
            Err(e) => {
                assert!(
                    !expected,
                    "{prompt:?}: refused ({e}), A1111 reads {networks:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(
        read > 400 && refused > 400,
        "{read} read, {refused} refused"
    );
}

/// Every prompt loses the comments A1111's comments script takes out of it.
#[test]
fn comments_leave_prompts_as_a1111_takes_them_out() {
    let cases = json_file(a1111_prompt_fixtures().join("comments.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() >= 600, "{} cases", cases.len());
    let mut changed = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let text = case["text"].as_str().expect("text");
        assert_eq!(without_comments(prompt), text, "{prompt:?}");
        changed += usize::from(prompt != text);
    }
    assert!(changed > 300, "{changed} prompts with comments");
}

/// Over gRPC a prompt and a negative with comments are the same request without them
/// (the PNG too, as A1111 writes its parameters without them), a LoRA tag in a comment
/// is not applied; in the plain syntax `#` is text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_leave_a1111_prompts_before_anything_reads_them() {
    let server = lora_server().await;
    let commented = pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: "# a knight\n(castle:1.2) <lora:char_kohya:0.5> # <lora:style_peft:1>".into(),
        negative_prompt: Some("blurry # dark".into()),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        steps: 2,
        width: 64,
        height: 64,
        seed: Some(5),
        ..Default::default()
    };
    let clean = pb::GenerationSpec {
        prompt: "\n(castle:1.2) <lora:char_kohya:0.5> \n".into(),
        negative_prompt: Some("blurry \n".into()),
        ..commented.clone()
    };
    let with = server.images(commented.clone()).await.expect("commented");
    let without = server.images(clean).await.expect("clean");
    assert_eq!(with.images[0].data, without.images[0].data);
    let plain = pb::GenerationSpec {
        prompt_syntax: pb::PromptSyntax::Unspecified as i32,
        ..commented
    };
    let plain = server.images(plain).await.expect("plain");
    assert_ne!(pixels(&plain.images[0].data), pixels(&with.images[0].data));
}

pub(crate) async fn lora_server() -> TestServer {
    let loras = common::fixtures().join("tiny2/lora");
    let roots = loras.to_str().expect("utf-8");
    TestServer::with_pipelines(&[("SDXLD__MODELS__LORA_ROOTS", roots)]).await
}

/// The pixels of a PNG.
pub(crate) fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png)
        .expect("an image")
        .to_rgb8()
        .into_raw()
}

/// LoRA tags over gRPC equal diffusers with A1111's multipliers: a kohya LoRA of every
/// component with the text encoders' and UNet's weights apart, inside an edit; an alias
/// with named multipliers beside a UNet-only LoRA in a composable prompt. A tag is the
/// same adapter as `spec.loras` names (`text_encoder_weight` for A1111's `te`); the PNG
/// keeps the prompt as written and replays byte for byte; nothing outlives the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_tags_apply_as_a1111_applies_them() {
    let server = lora_server().await;
    let folder = a1111_prompt_fixtures().join("tiny2");
    let reference = read_tensors(&folder.join("cases.safetensors"));
    let cases = json_file(folder.join("lora.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() >= 2, "{} cases", cases.len());
    let untagged = |case: &Value| pb::GenerationSpec {
        prompt: extra_networks(&spec_of(case).prompt).expect("tags").text,
        ..spec_of(case)
    };
    let before = server.images(untagged(&cases[0])).await.expect("untagged");
    for (k, case) in cases.iter().enumerate() {
        let name = format!("lora_{k}");
        server
            .assert_matches_case(&format!("tiny2 {name}"), spec_of(case), &reference, &name)
            .await;
    }
    let tagged = server.images(spec_of(&cases[0])).await.expect("tagged");
    let listed = pb::GenerationSpec {
        loras: vec![pb::LoraAdapter {
            name: "char_kohya".into(),
            weight: Some(0.6),
            text_encoder_weight: Some(1.2),
        }],
        ..untagged(&cases[0])
    };
    let listed = server.images(listed).await.expect("listed");
    assert_eq!(
        pixels(&tagged.images[0].data),
        pixels(&listed.images[0].data)
    );
    let parameters = common::png_parameters(&tagged.images[0].data);
    assert!(
        parameters.starts_with(cases[0]["prompt"].as_str().expect("prompt"))
            && parameters.contains("Lora hashes: \"char_kohya: "),
        "{parameters}"
    );
    let parameters = common::png_parameters(&listed.images[0].data);
    assert!(
        parameters.contains("<lora:char_kohya:1.2:0.6>"),
        "{parameters}"
    );
    let replay = common::png_spec(&tagged.images[0].data);
    let again = server.images(replay).await.expect("replay");
    assert_eq!(again.images[0].data, tagged.images[0].data);
    let after = server.images(untagged(&cases[0])).await.expect("untagged");
    assert_eq!(after.images[0].data, before.images[0].data);
    assert_ne!(
        pixels(&after.images[0].data),
        pixels(&tagged.images[0].data)
    );
}

/// Tags sdxld cannot run as A1111 would are INVALID_ARGUMENT naming the field that has
/// them, an unknown LoRA NOT_FOUND; tags are text in the plain syntax, and the server
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_tags_that_cannot_run_are_refused_naming_the_field() {
    let server = lora_server().await;
    let base = pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: "a knight <lora:char_kohya:0.5>".into(),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let with = |edit: &dyn Fn(&mut pb::GenerationSpec)| {
        let mut spec = base.clone();
        edit(&mut spec);
        spec
    };
    let prompt = |text: &str| {
        let text = text.to_string();
        with(&move |s| s.prompt = text.clone())
    };
    let seventeen: String = (0..17).map(|i| format!("<lora:l{i}:1>")).collect();
    let cases: Vec<(&str, pb::GenerationSpec, &[&str])> = vec![
        ("weight 3", prompt("<lora:char_kohya:3>"), &["spec.prompt"]),
        (
            "unet NaN",
            prompt("<lora:char_kohya:1:nan>"),
            &["spec.prompt"],
        ),
        (
            "te inf",
            prompt("<lora:char_kohya:te=inf>"),
            &["spec.prompt"],
        ),
        (
            "not a number",
            prompt("<lora:char_kohya:0,5>"),
            &["spec.prompt"],
        ),
        ("dyn", prompt("<lora:char_kohya:1:1:8>"), &["spec.prompt"]),
        (
            "block weights",
            prompt("<lora:char_kohya:lbw=1>"),
            &["spec.prompt"],
        ),
        (
            "hypernetwork",
            prompt("<hypernet:char_kohya:1>"),
            &["spec.prompt"],
        ),
        (
            "twice",
            prompt("<lora:char_kohya:1> <lyco:char_kohya:0.5>"),
            &["spec.prompt"],
        ),
        ("seventeen", prompt(&seventeen), &["spec.prompt"]),
        (
            "listed too",
            with(&|s| {
                s.loras = vec![pb::LoraAdapter {
                    name: "char_kohya".into(),
                    ..Default::default()
                }]
            }),
            &["spec.prompt"],
        ),
        (
            "in prompt_2",
            with(&|s| s.prompt_2 = Some("<lora:style_peft:1>".into())),
            &["spec.prompt_2"],
        ),
        (
            "in the negative",
            with(&|s| s.negative_prompt = Some("<lora:style_peft:1>".into())),
            &["spec.negative_prompt"],
        ),
        (
            "a listed text encoder weight of 2.5",
            with(&|s| {
                s.prompt = "a knight".into();
                s.loras = vec![pb::LoraAdapter {
                    name: "char_kohya".into(),
                    weight: Some(1.0),
                    text_encoder_weight: Some(2.5),
                }]
            }),
            &["spec.loras[0].text_encoder_weight"],
        ),
    ];
    for (what, spec, fields) in cases {
        server.assert_invalid(what, spec, fields).await;
    }
    let missing = server
        .images(prompt("<lora:absent:1>"))
        .await
        .expect_err("absent");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert_eq!(error_reason(&missing).0, "MODEL_NOT_FOUND", "{missing:?}");
    // The plain syntax reads a tag as text.
    let plain = with(&|s| s.prompt_syntax = pb::PromptSyntax::Unspecified as i32);
    server.images(plain).await.expect("plain text");
    server.images(base).await.expect("and the server serves on");
}

/// `source` copied to `target` with `ss_output_name` set in its header's metadata, as
/// kohya-ss writes it.
fn copy_with_alias(source: &std::path::Path, target: &std::path::Path, alias: &str) {
    let bytes = std::fs::read(source).expect("read");
    let length = u64::from_le_bytes(bytes[..8].try_into().expect("length")) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + length]).expect("header");
    header["__metadata__"] = serde_json::json!({ "ss_output_name": alias });
    let mut json = serde_json::to_vec(&header).expect("json");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(&bytes[8 + length..]);
    std::fs::write(target, out).expect("write");
}

/// A tag finds a LoRA by its file name wherever it lies under the LoRA roots, or by its
/// alias (`ss_output_name`, which ListModels shows), as A1111 finds it (the same image
/// as naming it by its path, the PNG's `Lora hashes` under the name the tag mentions);
/// a file name several LoRAs have is INVALID_ARGUMENT naming the prompt, and a path
/// names one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_tags_find_a_lora_by_its_file_name_as_a1111_does() {
    let root = tempfile::tempdir().expect("tempdir");
    let fixture = common::fixtures().join("tiny2/lora");
    for (folder, file, as_file) in [
        ("styles/people", "char_kohya", "knight"),
        ("a", "style_peft", "twin"),
        ("b", "unet_only_peft", "twin"),
        ("c", "style_peft", "odd,name"),
    ] {
        let dir = root.path().join(folder);
        std::fs::create_dir_all(&dir).expect("folder");
        std::fs::copy(
            fixture.join(format!("{file}.safetensors")),
            dir.join(format!("{as_file}.safetensors")),
        )
        .expect("copy");
    }
    copy_with_alias(
        &fixture.join("char_kohya.safetensors"),
        &root.path().join("a/char_v2_final.safetensors"),
        "hero",
    );
    let roots = root.path().to_str().expect("utf-8");
    let server = TestServer::with_pipelines(&[("SDXLD__MODELS__LORA_ROOTS", roots)]).await;
    let spec = |prompt: &str| pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: prompt.into(),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        steps: 2,
        width: 64,
        height: 64,
        seed: Some(9),
        ..Default::default()
    };
    let by_file_name = server
        .images(spec("a knight <lora:knight:0.7>"))
        .await
        .expect("by file name");
    let by_path = server
        .images(spec("a knight <lora:styles/people/knight:0.7>"))
        .await
        .expect("by path");
    let plain = server.images(spec("a knight ")).await.expect("plain");
    assert_eq!(
        pixels(&by_file_name.images[0].data),
        pixels(&by_path.images[0].data)
    );
    assert_ne!(
        pixels(&by_file_name.images[0].data),
        pixels(&plain.images[0].data)
    );
    let parameters = common::png_parameters(&by_file_name.images[0].data);
    assert!(
        parameters.contains("Lora hashes: \"knight: "),
        "{parameters}"
    );
    let by_alias = server
        .images(spec("a knight <lora:hero:0.7>"))
        .await
        .expect("by alias");
    assert_eq!(
        pixels(&by_alias.images[0].data),
        pixels(&by_path.images[0].data)
    );
    let listed = server.list_models(pb::ModelKind::Lora).await;
    let alias = |name: &str| {
        let model = listed.iter().find(|m| m.name == name).expect("listed");
        model.lora.as_ref().expect("lora").alias.clone()
    };
    assert_eq!(alias("a/char_v2_final"), "hero");
    assert_eq!(alias("a/twin"), "");
    server
        .assert_invalid("two twins", spec("<lora:twin:1>"), &["spec.prompt"])
        .await;
    server
        .images(spec("<lora:b/twin:1>"))
        .await
        .expect("one twin");
    // A1111 drops the separators of its lists from the names it lists.
    let odd = server.images(spec("<lora:odd,name:1>")).await.expect("odd");
    let parameters = common::png_parameters(&odd.images[0].data);
    assert!(
        parameters.contains("Lora hashes: \"oddname: "),
        "{parameters}"
    );
}
