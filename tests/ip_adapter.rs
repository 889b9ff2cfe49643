//! IP-Adapters against diffusers (`load_ip_adapter`, `ip_adapter_image`) and transformers'
//! CLIPVisionModelWithProjection and CLIPImageProcessor, on the fixtures of
//! `tests/fixtures/make_ip_adapter_fixtures.py`: the image encoder's input pixels, its
//! image embeddings and penultimate hidden states for two encoder shapes and three images
//! (one with transparency); each case's image tokens; and whole generations with a plain
//! adapter, a Plus adapter of two images, two adapters at once without guidance, on both
//! tiny pipelines.

use crate::common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::rc::Rc;

use common::{assert_close, cases_at, fixtures, read_tensors, Case};
use sdxld::engine::ip_adapter::pixels::{clip_pixels, composite_over_white};
use sdxld::engine::ip_adapter::{ImagePrompt, IpAdapter, PromptLayers};
use sdxld::engine::models::clip_vision::ClipVisionModel;
use sdxld::engine::noise::NoiseStream;
use sdxld::engine::pipeline::{Placement, SdxlPipeline, Start};
use tch::{Device, Kind, Tensor};

fn ip_fixtures() -> PathBuf {
    common::ip_adapter_fixtures()
}

fn encoder(name: &str) -> ClipVisionModel {
    ClipVisionModel::load_dir(
        &ip_fixtures().join("encoders").join(name),
        Device::Cpu,
        Kind::Float,
    )
    .expect("image encoder")
}

fn image(name: &str) -> image::RgbImage {
    let decoded = image::open(ip_fixtures().join("images").join(format!("{name}.png")))
        .expect("image prompt");
    composite_over_white(&decoded)
}

#[test]
fn image_encoders_see_the_pixels_and_give_the_embeddings_transformers_gives() {
    let expected = read_tensors(&ip_fixtures().join("components.safetensors"));
    for name in ["vision_g", "vision_h"] {
        let model = encoder(name);
        for picture in ["lighthouse", "harbour", "sail"] {
            let key = format!("{name}.{picture}");
            let pixels = clip_pixels(&image(picture), model.config().image_size, Device::Cpu);
            let diff = (&pixels - &expected[&format!("{key}.pixels")])
                .abs()
                .max()
                .double_value(&[]);
            // One 8-bit level is 0.0146 after normalisation: this is float rounding only.
            assert!(diff < 1e-5, "{key}: pixels differ by {diff}");
            let out = tch::no_grad(|| model.forward(&pixels));
            assert_close(
                &format!("{key} image_embeds"),
                &out.image_embeds,
                &expected[&format!("{key}.image_embeds")],
            );
            assert_close(
                &format!("{key} penultimate"),
                &out.penultimate,
                &expected[&format!("{key}.penultimate")],
            );
        }
    }
}

/// A case's adapter: the adapter, its images, scale and layers.
type CaseAdapter = (Rc<IpAdapter>, Vec<image::RgbImage>, f64, PromptLayers);

/// A case's adapters.
fn adapters(config: &str, case: &Case) -> Vec<CaseAdapter> {
    let folder = ip_fixtures().join(config).join("ip_adapters");
    case["adapters"]
        .as_array()
        .expect("adapters")
        .iter()
        .map(|a| {
            let name = a[0].as_str().expect("name");
            let path = folder.join(format!("{name}.safetensors"));
            let adapter = IpAdapter::load(&path, Device::Cpu, Kind::Float).expect("adapter");
            let images = a[1]
                .as_array()
                .expect("images")
                .iter()
                .map(|i| image(i.as_str().expect("image")))
                .collect();
            let layers = match a[3].as_str() {
                Some("style") => PromptLayers::Style,
                _ => PromptLayers::All,
            };
            (
                Rc::new(adapter),
                images,
                a[2].as_f64().expect("scale"),
                layers,
            )
        })
        .collect()
}

fn image_prompts(config: &str, case: &Case) -> Vec<ImagePrompt> {
    let model = encoder(case.text("encoder"));
    adapters(config, case)
        .into_iter()
        .map(|(adapter, images, scale, layers)| {
            let images: Vec<_> = images.iter().collect();
            ImagePrompt::encode(adapter, &model, &images, scale, layers)
        })
        .collect()
}

#[test]
fn generations_with_image_prompts_match_diffusers() {
    for config in ["tiny2", "tiny3"] {
        let root = ip_fixtures().join(config);
        let expected = read_tensors(&root.join("cases.safetensors"));
        let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
            .expect("pipeline");
        // Image to image and ControlNet cases run over gRPC (tests/ip_adapter_service.rs).
        let text_to_image = cases_at(&root.join("cases.json"))
            .into_iter()
            .filter(|c| c["kind"].is_null());
        for case in text_to_image {
            let name = format!("{config} {}", case.name());
            let prompts = image_prompts(config, &case);
            let guided = case.float("guidance") > 1.0;
            for (k, prompt) in prompts.iter().enumerate() {
                let tokens = &expected[&format!("{}.tokens_{k}", case.name())];
                let flat = |t: Tensor| t.reshape([t.size()[0], -1, tokens.size()[3]]);
                let want = flat(tokens.shallow_clone());
                let got = if guided {
                    Tensor::cat(&[&prompt.negative, &prompt.tokens], 0)
                } else {
                    prompt.tokens.shallow_clone()
                };
                assert_close(&format!("{name} tokens {k}"), &got, &want);
            }
            let mut p = case.params();
            let n = p.num_images;
            p.num_images = 1;
            let mut latents = Vec::new();
            for i in 0..n {
                p.seed = case.int("seed") + i as u64;
                let mut embeds = pipe.encode_prompt(&p).expect("prompt");
                embeds.images = image_prompts(config, &case);
                let mut noise = NoiseStream::lock();
                let flow = pipe
                    .denoise::<()>(&p, &embeds, Start::Request, &[], &mut noise, &mut |_| {
                        ControlFlow::Continue(())
                    })
                    .expect("denoise");
                let ControlFlow::Continue(out) = flow else {
                    panic!("stopped")
                };
                latents.push(out);
            }
            let latents = Tensor::cat(&latents, 0);
            assert_close(
                &name,
                &latents,
                &expected[&format!("{}.latents", case.name())],
            );
        }
    }
}
