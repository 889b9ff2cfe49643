//! Parity with diffusers on tiny random-weight SDXL pipelines: every component, then
//! whole generations (latents and 8-bit images), for two configurations.

use crate::common;

use common::{assert_close, assert_images_match, fixtures, read_tensors, CONFIGS};
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};
use tch::Tensor;

fn load(config: &str) -> SdxlPipeline {
    SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
        .unwrap_or_else(|e| panic!("{config}: {e}"))
}

#[test]
fn text_encoders_match_transformers() {
    let _guard = tch::no_grad_guard();
    for config in CONFIGS {
        let pipe = load(config);
        let r = read_tensors(&fixtures().join(config).join("components.safetensors"));
        let te1 = pipe.text_encoder().expect("text_encoder");
        let ids = &r["te1.input_ids"];
        let out = te1.forward(ids, 0).expect("te1");
        assert_close(
            &format!("{config} te1 penultimate"),
            &out.hidden,
            &r["te1.penultimate"],
        );
        assert!(out.pooled.is_none());
        let skipped = te1.forward(ids, 1).expect("te1 skip");
        assert_close(
            &format!("{config} te1 clip_skip 1"),
            &skipped.hidden,
            &r["te1.clip_skip_1"],
        );
        assert_close(
            &format!("{config} te1 last"),
            &te1.last_hidden_state(ids),
            &r["te1.last_hidden_state"],
        );

        let te2 = pipe.text_encoder_2();
        let ids = &r["te2.input_ids"];
        let out = te2.forward(ids, 0).expect("te2");
        assert_close(
            &format!("{config} te2 penultimate"),
            &out.hidden,
            &r["te2.penultimate"],
        );
        assert_close(
            &format!("{config} te2 pooled"),
            &out.pooled.expect("pooled"),
            &r["te2.text_embeds"],
        );
        assert_close(
            &format!("{config} te2 last"),
            &te2.last_hidden_state(ids),
            &r["te2.last_hidden_state"],
        );
    }
}

#[test]
fn unet_matches_diffusers_including_odd_latent_sizes() {
    let _guard = tch::no_grad_guard();
    for config in CONFIGS {
        let pipe = load(config);
        let r = read_tensors(&fixtures().join(config).join("components.safetensors"));
        for tag in ["square", "odd"] {
            let (out, expected) = common::unet_on_fixture(pipe.unet(), &r, tag);
            assert_close(&format!("{config} unet {tag}"), &out, expected);
        }
    }
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    let _guard = tch::no_grad_guard();
    for config in CONFIGS {
        let pipe = load(config);
        let r = read_tensors(&fixtures().join(config).join("components.safetensors"));
        let decoded = pipe.vae().decode(&r["vae.latents"]);
        assert_close(&format!("{config} vae decode"), &decoded, &r["vae.decoded"]);
        let (mean, logvar) = pipe.vae().encode(&r["vae.image"]);
        assert_close(&format!("{config} vae mean"), &mean, &r["vae.mean"]);
        assert_close(&format!("{config} vae logvar"), &logvar, &r["vae.logvar"]);
    }
}

/// The pipeline parameters of a fixture case.
#[test]
fn generations_match_diffusers() {
    for config in CONFIGS {
        let pipe = load(config);
        let dir = fixtures().join(config);
        let cases = common::cases(config, "cases");
        assert!(cases.len() >= 5);
        for (i, case) in cases.iter().enumerate() {
            let params = case.params();
            let r = read_tensors(&dir.join(format!("case_{i}.safetensors")));
            let out = pipe.generate(&params).expect("generate");
            let what = format!(
                "{config} case {i} ({}x{}, {} images)",
                params.width, params.height, params.num_images
            );
            assert_close(&format!("{what} latents"), &out.latents, &r["latents"]);
            assert_images_match(&format!("{what} images"), &out.images, &r["images"]);
        }
    }
}

#[test]
fn absent_and_empty_negative_prompts_differ() {
    // diffusers: no negative prompt means zero embeddings; "" is encoded.
    let pipe = load("tiny2");
    let mut params = GenerateParams {
        prompt: "a cat".into(),
        width: 64,
        height: 64,
        steps: 2,
        seed: 5,
        ..GenerateParams::default()
    };
    let absent = pipe.generate(&params).expect("generate").latents;
    params.negative_prompt = Some(String::new());
    let empty = pipe.generate(&params).expect("generate").latents;
    assert!(common::relative_error(&absent, &empty) > 1e-3);
}

#[test]
fn image_i_of_a_batch_uses_seed_plus_i() {
    let pipe = load("tiny3");
    let params = GenerateParams {
        prompt: "a cat".into(),
        width: 64,
        height: 64,
        steps: 2,
        seed: 10,
        num_images: 2,
        ..GenerateParams::default()
    };
    let batch = pipe.generate(&params).expect("batch").latents;
    let single = GenerateParams {
        seed: 11,
        num_images: 1,
        ..params
    };
    let second = pipe.generate(&single).expect("single").latents;
    assert_close(
        "image 1 of seed 10 vs seed 11",
        &batch.get(1).unsqueeze(0),
        &second,
    );
    let _ = Tensor::from(0);
}
