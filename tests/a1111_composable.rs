//! A1111's composable prompts (`AND` and sub-prompt weights) against A1111's algorithm
//! as `tests/fixtures/make_a1111_prompt_fixtures.py` writes it out: prompts split as
//! `get_multicond_prompt_list` splits them; images over gRPC within two levels of
//! diffusers whose UNet runs every sub-prompt and combines them as A1111's
//! `combine_denoised` does; the combination with ControlNets (guess mode too) and image
//! prompts; refusals naming the field; and the token masks that make prompt and
//! negative of different lengths attend as A1111's passes of their own. The conditioning of composable prompts is checked with the other
//! A1111 conditioning cases in `a1111_prompts.rs`.

use crate::a1111_prompts::{json_file, server, spec_of};
use crate::common;

use common::{a1111_prompt_fixtures, assert_close, read_tensors};
use sdxld::engine::prompt_syntax::a1111_compose::sub_prompts;
use sdxld::engine::prompt_syntax::{SyntaxError, MAX_PARTS, MAX_WEIGHT};
use sdxld::proto::v1 as pb;

/// Every prompt splits into the sub-prompts A1111 makes of it, with their weights, or is
/// refused where A1111's would not be read as written: more than [`MAX_PARTS`]
/// sub-prompts, a weight beyond [`MAX_WEIGHT`] (or infinite), digits of another script.
#[test]
fn prompts_split_into_sub_prompts_as_a1111_splits_them() {
    let cases = json_file(a1111_prompt_fixtures().join("multicond.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() > 600, "{} cases", cases.len());
    let (mut split, mut refused) = (0, 0);
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let parts = case["parts"].as_array().expect("parts");
        let written = |p: &serde_json::Value| p[1].as_str().map(str::to_string);
        let weight = |p: &serde_json::Value| p[2].as_str().expect("weight").parse::<f64>();
        let got = sub_prompts(prompt);
        let expected_error = if parts.len() > MAX_PARTS {
            Some("parts")
        } else if parts.iter().filter_map(written).any(|w| !w.is_ascii()) {
            Some("digits")
        } else if parts
            .iter()
            .map(|p| weight(p).expect("a float"))
            .any(|w| !w.is_finite() || w.abs() > MAX_WEIGHT)
        {
            Some("weight")
        } else {
            None
        };
        match (expected_error, got) {
            (None, Ok(got)) => {
                split += 1;
                assert_eq!(got.len(), parts.len(), "{prompt:?}");
                for (g, p) in got.iter().zip(parts) {
                    assert_eq!(g.text, p[0].as_str().expect("text"), "{prompt:?}");
                    assert_eq!(g.weight, weight(p).expect("a float"), "{prompt:?}");
                    assert_eq!(g.written, p[1].is_string(), "{prompt:?}");
                }
            }
            (Some("parts"), Err(SyntaxError::TooComplex(_)))
            | (Some("digits"), Err(SyntaxError::Unsupported(_)))
            | (Some("weight"), Err(SyntaxError::Weight(_))) => refused += 1,
            (expected, got) => panic!("{prompt:?}: expected {expected:?}, got {got:?}"),
        }
    }
    // Both outcomes are exercised, and most prompts split into several parts.
    assert!(
        split > 300 && refused > 30,
        "{split} split, {refused} refused"
    );
}

/// Composable prompts over gRPC equal diffusers with A1111's combination: sub-prompts
/// of one and two chunks with weights and an alternation (two images), one weighted
/// sub-prompt under a zero negative, sub-prompts paired with prompt_2's under a longer
/// negative, image to image. Without the weights the first is another image, and its
/// PNG replays byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composable_prompts_combine_as_a1111_combines_them() {
    let server = server().await;
    let folder = a1111_prompt_fixtures().join("tiny2");
    let reference = read_tensors(&folder.join("cases.safetensors"));
    let cases = json_file(folder.join("composed.json"));
    let cases = cases.as_array().expect("cases");
    assert!(cases.len() >= 4, "{} cases", cases.len());
    for (k, case) in cases.iter().enumerate() {
        let name = format!("and_{k}");
        server
            .assert_matches_case(&format!("tiny2 {name}"), spec_of(case), &reference, &name)
            .await;
    }
    let weighted = pb::GenerationSpec {
        num_images: 1,
        ..spec_of(&cases[0])
    };
    let unweighted = pb::GenerationSpec {
        prompt: weighted.prompt.replace(":1.3", "").replace(" :0.4", ""),
        ..weighted.clone()
    };
    let done = server.images(weighted).await.expect("weighted");
    let other = server.images(unweighted).await.expect("unweighted");
    assert_ne!(done.images[0].data, other.images[0].data);
    let replay = common::png_spec(&done.images[0].data);
    let again = server.images(replay).await.expect("replay");
    assert_eq!(again.images[0].data, done.images[0].data);
}

/// A prompt's two halves at half the weight each (`X:0.5 AND X:0.5`) is the prompt
/// itself, with a ControlNet in balanced and in guess mode (which runs it on the
/// prompt's parts only), for two images; the refiner and a hires pass read the
/// sub-prompts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_of_a_prompt_combine_to_the_prompt_under_controlnets() {
    let server = server().await;
    let latents = |prompt: &str, mode: pb::ControlMode| {
        let unit = pb::ControlNetUnit {
            control_mode: mode as i32,
            ..common::fixture_control_unit("tiny2")
        };
        common::with_format(
            pb::GenerationSpec {
                model: "tiny2/pipeline".into(),
                prompt: prompt.into(),
                negative_prompt: Some("blurry".into()),
                prompt_syntax: pb::PromptSyntax::A1111 as i32,
                num_images: 2,
                steps: 3,
                width: 64,
                height: 64,
                seed: Some(90),
                controlnets: vec![unit],
                ..Default::default()
            },
            pb::ImageFormat::LatentsSafetensors,
        )
    };
    let text = "a [red|blue] lighthouse, (stormy:1.2) sea";
    for mode in [pb::ControlMode::Balanced, pb::ControlMode::Guess] {
        let whole = server.images(latents(text, mode)).await.expect("whole");
        let halves = format!("{text}:0.5 AND {text}:0.5");
        let halves = server.images(latents(&halves, mode)).await.expect("halves");
        for (a, b) in whole.images.iter().zip(&halves.images) {
            let what = format!("{mode:?} image {}", a.index);
            assert_close(&what, &common::latents_of(b), &common::latents_of(a));
        }
        // Another weighting is another image.
        let skewed = format!("{text}:0.8 AND a green lighthouse:0.2");
        let skewed = server.images(latents(&skewed, mode)).await.expect("skewed");
        let diff = (common::latents_of(&skewed.images[0]) - common::latents_of(&whole.images[0]))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff > 1e-2, "{mode:?}: {diff}");
    }
    let composed = pb::GenerationSpec {
        prompt: "a lighthouse:0.7 AND a stormy sea:0.5".into(),
        num_images: 1,
        output: None,
        controlnets: Vec::new(),
        ..latents(text, pb::ControlMode::Balanced)
    };
    server.assert_refiner_and_hires_pass_run(composed).await;
}

/// The same with an IP-Adapter's image prompt on two images, whose keys and values
/// every sub-prompt's part of the batch takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_of_a_prompt_combine_to_the_prompt_under_image_prompts() {
    use crate::ip_adapter_service as ip;

    let extra = tempfile::tempdir().expect("tempdir");
    let server = ip::server(extra.path()).await;
    let case = &ip::cases("tiny2")[1];
    let spec = |prompt: String| {
        common::with_format(
            pb::GenerationSpec {
                prompt,
                prompt_syntax: pb::PromptSyntax::A1111 as i32,
                ..ip::spec_of("tiny2", case)
            },
            pb::ImageFormat::LatentsSafetensors,
        )
    };
    let text = case["prompt"].as_str().expect("prompt").to_string();
    let whole = server.images(spec(text.clone())).await.expect("whole");
    assert_eq!(whole.images.len(), 2);
    let halves = format!("{text}:0.5 AND {text}:0.5");
    let halves = server.images(spec(halves)).await.expect("halves");
    for (a, b) in whole.images.iter().zip(&halves.images) {
        let what = format!("image prompt, image {}", a.index);
        assert_close(&what, &common::latents_of(b), &common::latents_of(a));
    }
}

/// What a composable prompt cannot combine with is refused before admission naming
/// it; `AND` in a negative prompt is text, and in the plain syntax too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composable_prompts_are_refused_where_guidance_cannot_combine_them() {
    let server = server().await;
    let base = pb::GenerationSpec {
        model: "tiny2/pipeline".into(),
        prompt: "a cat AND a dog:0.5".into(),
        prompt_syntax: pb::PromptSyntax::A1111 as i32,
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let guider = pb::Guider {
        kind: pb::GuiderKind::Cfg as i32,
        ..Default::default()
    };
    let pag = pb::PerturbedAttentionGuidance {
        scale: Some(3.0),
        ..Default::default()
    };
    let hires = pb::HiresPass {
        guidance_scale: Some(1.0),
        ..Default::default()
    };
    let refiner = pb::RefinerStage {
        model: "tiny2/refiner".into(),
        mode: pb::RefinerMode::EnsembleOfExperts as i32,
        guidance_scale: Some(0.5),
        ..Default::default()
    };
    let nine = ["a"; MAX_PARTS + 1].join(" AND ");
    let with = |edit: &dyn Fn(&mut pb::GenerationSpec)| {
        let mut spec = base.clone();
        edit(&mut spec);
        spec
    };
    let cases: Vec<(&str, pb::GenerationSpec, &[&str])> = vec![
        (
            "no guidance",
            with(&|s| s.guidance_scale = Some(1.0)),
            &["spec.guidance_scale"],
        ),
        (
            "a weight without guidance",
            with(&|s| {
                s.prompt = "a cat:0.5".into();
                s.guidance_scale = Some(0.0);
            }),
            &["spec.guidance_scale"],
        ),
        (
            "hires without guidance",
            with(&|s| s.hires = Some(hires.clone())),
            &["spec.hires.guidance_scale"],
        ),
        (
            "refiner without guidance",
            with(&|s| s.refiner = Some(refiner.clone())),
            &["spec.refiner.guidance_scale"],
        ),
        (
            "guider",
            with(&|s| s.guider = Some(guider)),
            &["spec.guider"],
        ),
        ("pag", with(&|s| s.pag = Some(pag.clone())), &["spec.pag"]),
        (
            "rescale",
            with(&|s| s.guidance_rescale = 0.7),
            &["spec.guidance_rescale"],
        ),
        (
            "nine sub-prompts",
            with(&|s| s.prompt = nine.clone()),
            &["spec.prompt"],
        ),
        (
            "a weight of 101",
            with(&|s| s.prompt = "a cat:101".into()),
            &["spec.prompt"],
        ),
        (
            "prompt_2 of three parts",
            with(&|s| s.prompt_2 = Some("x AND y AND z".into())),
            &["spec.prompt_2"],
        ),
        (
            "prompt_2 of another weight",
            with(&|s| s.prompt_2 = Some("x AND y:2".into())),
            &["spec.prompt_2"],
        ),
        (
            "thirty conditionings",
            with(&|s| {
                s.prompt = "a [red|blue] cat AND a [big|small|tiny] dog".into();
                s.negative_prompt = Some("[a|b|c|d|e]".into());
                s.steps = 30;
            }),
            &["spec.prompt"],
        ),
        (
            "both prompts",
            with(&|s| {
                s.prompt = "a:1000".into();
                s.prompt_2 = Some("<lora:a:1>".into());
            }),
            &["spec.prompt", "spec.prompt_2"],
        ),
    ];
    for (what, spec, fields) in cases {
        server.assert_invalid(what, spec, fields).await;
    }
    // One weighted sub-prompt scales guidance, which a guider and PAG take as they are;
    // `AND` is text in a negative prompt and in the plain syntax.
    let weighted = |s: &mut pb::GenerationSpec| s.prompt = "a cat:0.5".into();
    let runs = [
        with(&|s| {
            weighted(s);
            s.guider = Some(guider);
        }),
        with(&|s| {
            weighted(s);
            s.pag = Some(pag.clone());
        }),
        with(&|s| s.negative_prompt = Some("blurry AND dark".into())),
        with(&|s| s.prompt_2 = Some("an oil painting".into())),
        with(&|s| {
            s.prompt_syntax = pb::PromptSyntax::Unspecified as i32;
            s.guidance_scale = Some(1.0);
        }),
    ];
    for spec in runs {
        server.images(spec).await.expect("runs");
    }
    server.images(base).await.expect("and the server serves on");
}

/// Prompt and negative of different lengths attend to their own tokens only, as A1111's
/// passes of their own make them: a row of the UNet's and of a ControlNet's batch padded
/// with other tokens and masked to its own equals the row alone, beside a row that
/// attends to all of its tokens.
#[test]
fn masked_tokens_attend_as_passes_of_their_own() {
    use sdxld::engine::models::attention::Context;
    use sdxld::engine::models::controlnet::{ControlNetModel, ControlScale};
    use sdxld::engine::models::unet::{AddedCond, UNet2DConditionModel};
    use sdxld::engine::pipeline::Placement;
    use tch::{Kind, Tensor};

    let _guard = tch::no_grad_guard();
    let placement = Placement::cpu();
    let unet =
        UNet2DConditionModel::load_dir(&common::fixtures().join("tiny2/pipeline/unet"), placement)
            .expect("unet");
    let root = common::controlnet_fixtures().join("tiny2");
    let controlnet =
        ControlNetModel::load_dir(&root.join("from_unet"), placement).expect("controlnet");
    let r = read_tensors(&root.join("from_unet.safetensors"));
    let first = |t: &Tensor| t.narrow(0, 0, 1);
    let two = |t: &Tensor| first(t).repeat_interleave_self_int(2, Some(0), None);
    let (sample, text_embeds, time_ids) = (
        two(&r["sample"]),
        two(&r["text_embeds"]),
        two(&r["time_ids"]),
    );
    let timestep = r["timestep"].reshape([]);
    let own = first(&r["encoder_hidden_states"]);
    let tokens = own.size()[1];
    let other = common::random_normal(&own.size(), 5);
    // Row 0: its own tokens, then others it must not see; row 1: all of them.
    let padded = Tensor::cat(&[&own, &other], 1).repeat([2, 1, 1]);
    let mask = Tensor::arange(2 * tokens, (Kind::Int64, tch::Device::Cpu))
        .unsqueeze(0)
        .lt_tensor(&Tensor::from_slice(&[tokens, 2 * tokens]).unsqueeze(1))
        .view([2, 1, 1, 2 * tokens]);
    let added = AddedCond {
        text_embeds: &text_embeds,
        time_ids: &time_ids,
        timestep_cond: None,
    };
    let context = Context {
        text_mask: Some(&mask),
        ..Context::text(&padded)
    };
    let row = |t: &Tensor, i: i64| t.narrow(0, i, 1);
    let alone = |i: i64, text: &Tensor| {
        let (embeds, ids) = (row(&text_embeds, i), row(&time_ids, i));
        let added = AddedCond {
            text_embeds: &embeds,
            time_ids: &ids,
            timestep_cond: None,
        };
        let unet_out = unet.forward(&row(&sample, i), &timestep, text, Some(&added));
        let control = controlnet.forward(
            &row(&sample, i),
            &timestep,
            text,
            Some(&added),
            &first(&r["image"]),
            ControlScale {
                scale: 1.0,
                guess_mode: false,
            },
        );
        (unet_out, control)
    };
    let masked_unet = unet.forward_controlled(&sample, &timestep, &context, Some(&added), None);
    let embedded = controlnet.embed(&two(&r["image"]));
    let masked_control = controlnet.forward_embedded(
        &sample,
        &timestep,
        &context,
        Some(&added),
        &embedded,
        ControlScale {
            scale: 1.0,
            guess_mode: false,
        },
    );
    for (i, text) in [(0, own.shallow_clone()), (1, first(&padded))] {
        let (unet_out, control) = alone(i, &text);
        assert_close(&format!("UNet row {i}"), &row(&masked_unet, i), &unet_out);
        assert_close(
            &format!("ControlNet mid row {i}"),
            &row(&masked_control.mid, i),
            &control.mid,
        );
        for (k, (got, want)) in masked_control.down.iter().zip(&control.down).enumerate() {
            assert_close(&format!("ControlNet down {k} row {i}"), &row(got, i), want);
        }
    }
    // Unmasked, row 0 sees the other tokens: another prediction.
    let unmasked = unet.forward(&sample, &timestep, &padded, Some(&added));
    let (own_row, _) = alone(0, &own);
    let diff = (row(&unmasked, 0) - own_row).abs().max().double_value(&[]);
    assert!(diff > 1e-3, "{diff}");
}
