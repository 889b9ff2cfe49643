//! The hires pass's own prompts (A1111's "Hires prompt" and "Hires negative prompt")
//! over gRPC and the CLI: equal to diffusers' two-pipeline recipe with the img2img
//! pipeline given them, written into the PNG parameters as A1111 writes them; in A1111's
//! syntax read on the hires pass's clock, its LoRA tags those of the prompt; every text
//! checked before admission naming its field. (The engine and a refiner reading them:
//! `hires.rs`.)

use crate::a1111_networks::{lora_server, pixels};
use crate::a1111_prompts::json_file;
use crate::common;
use crate::hires::{spec_of, with_texts};

use common::server::TestServer;
use common::{assert_images_match, hires_fixtures, read_tensors, Case};
use sdxld::proto::v1 as pb;

fn case(index: usize) -> Case {
    let cases = common::cases_at(&hires_fixtures().join("tiny2").join("cases.json"));
    cases.into_iter().nth(index).expect("the case")
}

/// Case 7 of the tiny2 hires fixtures (Euler, bilinear latents at 1.5, Euler at 0.6 of
/// 5 steps) with its texts: a negative for the first pass, a prompt and a negative of
/// the hires pass's own.
fn case_7_spec() -> pb::GenerationSpec {
    let case = case(7);
    let hires = pb::HiresPass {
        scale: Some(1.5),
        latent_upscale: pb::LatentUpscale::Bilinear as i32,
        steps: 5,
        strength: Some(0.6),
        ..Default::default()
    };
    let spec = pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        scheduler: pb::Scheduler::Euler as i32,
        ..spec_of(&case, hires)
    };
    with_texts(&case, spec)
}

/// The hires pass's prompt and negative over gRPC equal the recipe's img2img pipeline
/// given them (two images); the parameters write them where they differ from the first
/// pass's (JSON-quoted, as A1111 quotes values with commas) and the PNG replays byte for
/// byte; a hires prompt equal to the prompt is the pass without one and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hires_prompt_equals_the_recipe_and_is_written_as_a1111_writes_it() {
    let server = lora_server().await;
    server.assert_feature("hires.prompt").await;
    let reference = read_tensors(&hires_fixtures().join("tiny2").join("cases.safetensors"));
    let spec = case_7_spec();
    let done = server.images(spec.clone()).await.expect("hires prompt");
    assert_eq!(done.images.len(), 2);
    for (i, image) in done.images.iter().enumerate() {
        assert_eq!((image.width, image.height), (96, 96));
        assert_images_match(
            &format!("hires prompt image {i}"),
            &common::decoded_image(&image.data),
            &reference["hires_7.images"].get(i as i64),
        );
    }
    let parameters = common::png_parameters(&done.images[0].data);
    for entry in [
        "Negative prompt: fog\n",
        ", Hires prompt: \"a red lighthouse in a storm, oil painting\"",
        ", Hires negative prompt: \"blurry, lowres\"",
    ] {
        assert!(parameters.contains(entry), "`{entry}` in {parameters}");
    }
    server.assert_replays("hires prompt", spec.clone()).await;

    let mut same = spec.clone();
    if let Some(h) = same.hires.as_mut() {
        h.prompt = Some(spec.prompt.clone());
        h.negative_prompt = None;
    }
    let mut without = same.clone();
    if let Some(h) = without.hires.as_mut() {
        h.prompt = None;
    }
    let same = server.images(same).await.expect("the same prompt");
    let without = server.images(without).await.expect("no hires prompt");
    assert_eq!(
        pixels(&same.images[0].data),
        pixels(&without.images[0].data)
    );
    let parameters = common::png_parameters(&same.images[0].data);
    assert!(!parameters.contains("Hires prompt"), "{parameters}");
    assert!(
        !parameters.contains("Hires negative prompt"),
        "{parameters}"
    );
    assert_ne!(
        pixels(&same.images[0].data),
        pixels(&done.images[0].data),
        "the hires prompt moves the image"
    );
}

/// In A1111's syntax the hires pass reads its own prompt on its own clock: A1111 counts
/// a whole-number edit in a hires pass past the first pass's steps, so `[A:B:5]` after
/// five first-pass steps reads A in the first pass and B in the whole hires pass, which
/// is exactly a prompt A with the hires prompt B (emphasis and a comment in it, and the
/// negatives likewise). The prompt's LoRA tags, written again in the hires prompt, are
/// the same LoRAs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_a1111_hires_prompt_reads_as_a1111_reads_it() {
    let server = lora_server().await;
    let base = pb::GenerationSpec {
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        num_images: 1,
        ..case_7_spec()
    };
    let (a, b) = ("a lighthouse at dusk", "a red lighthouse, (storm:1.3)");
    let edited = pb::GenerationSpec {
        prompt: format!("[{a}:{b}:5]"),
        negative_prompt: Some("[fog:blurry, lowres:5]".into()),
        hires: base.hires.clone().map(|h| pb::HiresPass {
            prompt: None,
            negative_prompt: None,
            ..h
        }),
        ..base.clone()
    };
    let own = pb::GenerationSpec {
        prompt: a.into(),
        negative_prompt: Some("fog".into()),
        hires: base.hires.clone().map(|h| pb::HiresPass {
            prompt: Some(format!("{b}\n# a comment A1111 drops")),
            negative_prompt: Some("blurry, lowres".into()),
            ..h
        }),
        ..base.clone()
    };
    let edited = server.images(edited).await.expect("edited");
    let own_done = server.images(own.clone()).await.expect("own");
    assert_eq!(
        pixels(&edited.images[0].data),
        pixels(&own_done.images[0].data)
    );
    let parameters = common::png_parameters(&own_done.images[0].data);
    assert!(
        parameters.contains(", Hires prompt: \"a red lighthouse, (storm:1.3)\\n\""),
        "{parameters}"
    );

    // The same LoRA tag in both prompts: the LoRA runs in both passes.
    let tag = " <lora:char_kohya:0.8>";
    let with_hires_prompt = |prompt: String| {
        own.hires.clone().map(|h| pb::HiresPass {
            prompt: Some(prompt),
            ..h
        })
    };
    let tagged = pb::GenerationSpec {
        prompt: format!("{a}{tag}"),
        hires: with_hires_prompt(format!("{b}{tag}")),
        ..own.clone()
    };
    let with_lora = server.images(tagged).await.expect("tagged");
    let listed = pb::GenerationSpec {
        loras: vec![pb::LoraAdapter {
            name: "char_kohya".into(),
            weight: Some(0.8),
            ..Default::default()
        }],
        hires: with_hires_prompt(b.into()),
        ..own.clone()
    };
    let listed = server.images(listed).await.expect("listed");
    assert_eq!(
        pixels(&with_lora.images[0].data),
        pixels(&listed.images[0].data)
    );
    assert_ne!(
        pixels(&with_lora.images[0].data),
        pixels(&own_done.images[0].data)
    );
    let parameters = common::png_parameters(&listed.images[0].data);
    assert!(
        parameters
            .contains("Hires prompt: \"a red lighthouse, (storm:1.3) <lora:char_kohya:0.8>\""),
        "the listed LoRA is in both prompts: {parameters}"
    );
}

/// Every hires text is checked before admission naming its own field: its length, its
/// syntax (compel's and A1111's), A1111's extra network tags where A1111 reads them as
/// text, a composable hires prompt against the hires pass's guidance (while the first
/// pass's guidance does not matter to it), its LoRA tags as the prompt's (multipliers,
/// names, count; an unknown LoRA NOT_FOUND; one that does not fit the model
/// FAILED_PRECONDITION as the models load). The server serves on, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hires_texts_are_checked_naming_their_fields() {
    let server = lora_server().await;
    let base = pb::GenerationSpec {
        num_images: 1,
        ..case_7_spec()
    };
    let with_hires = |syntax: pb::PromptSyntax, edit: &dyn Fn(&mut pb::HiresPass)| {
        let mut spec = pb::GenerationSpec {
            prompt_syntax: syntax as i32,
            ..base.clone()
        };
        if let Some(h) = spec.hires.as_mut() {
            edit(h);
        }
        spec
    };
    use pb::PromptSyntax::{Compel, Plain, A1111};
    let long = "a".repeat(20_000);
    let cases: Vec<(&str, pb::GenerationSpec, &str)> = vec![
        (
            "a long hires prompt",
            with_hires(Plain, &|h| h.prompt = Some(long.clone())),
            "spec.hires.prompt",
        ),
        (
            "a long hires negative",
            with_hires(Plain, &|h| h.negative_prompt_2 = Some(long.clone())),
            "spec.hires.negative_prompt_2",
        ),
        (
            "compel that does not parse",
            with_hires(Compel, &|h| {
                h.prompt_2 = Some("withLora(style, 0.5) a boat".into())
            }),
            "spec.hires.prompt_2",
        ),
        (
            "an A1111 tag in the hires negative",
            with_hires(A1111, &|h| {
                h.negative_prompt = Some("<lora:char_kohya:1>".into())
            }),
            "spec.hires.negative_prompt",
        ),
        (
            "an unreadable A1111 multiplier",
            with_hires(A1111, &|h| h.prompt = Some("<lora:x:abc>".into())),
            "spec.hires.prompt",
        ),
        (
            "AND without hires guidance",
            with_hires(A1111, &|h| {
                h.prompt = Some("a cat AND a dog".into());
                h.guidance_scale = Some(1.0);
            }),
            "spec.hires.guidance_scale",
        ),
    ];
    for (what, spec, field) in cases {
        server.assert_invalid(what, spec, &[field]).await;
    }

    // A composable hires prompt needs guidance in the hires pass only.
    let composed = pb::GenerationSpec {
        guidance_scale: Some(1.0),
        ..with_hires(A1111, &|h| {
            h.prompt = Some("a cat AND a dog:0.5".into());
            h.guidance_scale = Some(5.0);
        })
    };
    server
        .images(composed)
        .await
        .expect("a composable hires prompt");
    let composed_first = pb::GenerationSpec {
        prompt: "a cat AND a dog:0.5".into(),
        guidance_scale: Some(1.0),
        ..with_hires(A1111, &|h| h.guidance_scale = Some(5.0))
    };
    server
        .assert_invalid(
            "AND in the first pass only",
            composed_first,
            &["spec.guidance_scale"],
        )
        .await;

    // The hires prompt's tags are checked as the prompt's are, naming its field.
    let tagged = |hires_prompt: &str| with_hires(A1111, &|h| h.prompt = Some(hires_prompt.into()));
    let seventeen: String = (0..17).map(|i| format!("<lora:l{i}:1>")).collect();
    let refused = [
        ("a multiplier of 3", "x <lora:char_kohya:3>"),
        (
            "a LoRA named twice",
            "x <lora:char_kohya:1> <lora:char_kohya:0.5>",
        ),
        ("seventeen LoRAs", seventeen.as_str()),
    ];
    for (what, hires_prompt) in refused {
        server
            .assert_invalid(what, tagged(hires_prompt), &["spec.hires.prompt"])
            .await;
    }
    let unknown = server.images(tagged("x <lora:no_such_lora:1>")).await;
    let status = unknown.expect_err("an unknown LoRA");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    // A hires LoRA that does not fit the model is refused as the models load, before
    // the first pass runs, and leaves nothing behind.
    let before = server.images(base.clone()).await.expect("before");
    let misfit = server.images(tagged("x <lora:wrong_shapes:1>")).await;
    let status = misfit.expect_err("a LoRA of another shape");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("wrong_shapes"), "{status:?}");
    let after = server.images(base.clone()).await.expect("after");
    assert_eq!(after.images[0].data, before.images[0].data);
    server.images(base).await.expect("the server serves on");
}

/// `sdxld generate --hires-prompt/--hires-negative-prompt` equals the recipe.
#[test]
fn hires_prompts_over_the_cli_equal_the_recipe() {
    use common::cli::sdxld;

    let case = case(7);
    let reference = read_tensors(&hires_fixtures().join("tiny2").join("cases.safetensors"));
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("hires.png");
    sdxld("generate")
        .flag("--model", common::fixtures().join("tiny2/pipeline"))
        .args(["--prompt", case.text("prompt")])
        .args(["--negative-prompt", case.text("negative_prompt")])
        .args(["--width", "64", "--height", "64", "--scheduler", "euler"])
        .args(["--seed", &case.int("seed").to_string()])
        .args(["--steps", &case.int("steps").to_string()])
        .args(["--hires-scale", "1.5", "--hires-latent", "bilinear"])
        .args(["--hires-steps", "5", "--hires-strength", "0.6"])
        .args(["--hires-prompt", case.text("hires_prompt")])
        .args([
            "--hires-negative-prompt",
            case.text("hires_negative_prompt"),
        ])
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI hires prompt",
        &common::image_file(&png),
        &reference["hires_7.images"].get(0),
    );
}

/// LoRA tags in a hires prompt that name other LoRAs than the prompt's switch them for
/// the hires pass as A1111 does: over gRPC latents within 1e-3 and images within two
/// levels of diffusers with the prompt's LoRAs in the first pass and the hires prompt's
/// in the img2img pass, each pass conditioned on its prompt with its LoRAs' text
/// encoders (none, then a LoRA of every component; a LoRA with the text encoders' and
/// UNet's weights apart, then a UNet-only one, on two images, whose second first pass
/// switches back), the adapters merged and in the forward pass. Both sets are in
/// `completed.models` and `Lora hashes`; the PNG replays byte for byte; the next request
/// without tags is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hires_prompt_lora_tags_switch_loras_as_a1111_does() {
    let server = lora_server().await;
    let folder = common::a1111_prompt_fixtures().join("tiny2");
    let reference = read_tensors(&folder.join("cases.safetensors"));
    let cases = json_file(folder.join("hires_lora.json"));
    let cases = cases.as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    let request_of = |case: &serde_json::Value| {
        let int = |key: &str| case[key].as_u64().expect(key) as u32;
        let text = |key: &str| case[key].as_str().expect(key).to_string();
        pb::GenerationSpec {
            model: "tiny2/pipeline".into(),
            prompt: text("prompt"),
            negative_prompt: Some(text("negative_prompt")),
            prompt_syntax: pb::PromptSyntax::A1111 as i32,
            seed: Some(case["seed"].as_u64().expect("seed")),
            steps: int("steps"),
            num_images: int("n"),
            guidance_scale: Some(case["guidance"].as_f64().expect("guidance") as f32),
            width: 64,
            height: 64,
            scheduler: pb::Scheduler::Euler as i32,
            hires: Some(pb::HiresPass {
                width: int("hires_width"),
                height: int("hires_height"),
                latent_upscale: pb::LatentUpscale::Bilinear as i32,
                steps: int("hires_steps"),
                strength: Some(case["hires_strength"].as_f64().expect("strength") as f32),
                prompt: Some(text("hires_prompt")),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let untagged = pb::GenerationSpec {
        prompt: "a knight".into(),
        hires: None,
        ..request_of(&cases[0])
    };
    let before = server.images(untagged.clone()).await.expect("untagged");
    let loras = common::fixtures().join("tiny2/lora");
    let forward = TestServer::with_pipelines(&[
        ("SDXLD__MODELS__LORA_ROOTS", loras.to_str().expect("utf-8")),
        ("SDXLD__ENGINE__LORA_MODE", "forward"),
    ])
    .await;
    for (mode, server) in [("merged", &server), ("forward", &forward)] {
        for (k, case) in cases.iter().enumerate() {
            let name = format!("hires_lora_{k}");
            let what = format!("tiny2 {name} {mode}");
            server
                .assert_matches_case(&what, request_of(case), &reference, &name)
                .await;
        }
    }
    let done = server
        .images(request_of(&cases[1]))
        .await
        .expect("switching");
    let used: Vec<&str> = done
        .completed
        .as_ref()
        .expect("completed")
        .models
        .iter()
        .filter(|m| m.kind == pb::ModelKind::Lora as i32)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(used.len(), 2, "{used:?}");
    let parameters = common::png_parameters(&done.images[0].data);
    assert!(
        parameters.contains("Lora hashes: \"char_kohya: ")
            && parameters.contains(", unet_only_peft: "),
        "{parameters}"
    );
    server
        .assert_replays("switching", request_of(&cases[1]))
        .await;
    let after = server.images(untagged).await.expect("untagged");
    assert_eq!(after.images[0].data, before.images[0].data);
}
