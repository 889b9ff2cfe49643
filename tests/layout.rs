//! Weight layouts (channels-last convolutions, fused attention projections) compute what
//! the plain layout computes: the UNet, the VAE and whole generations equal diffusers' on
//! both tiny pipelines, LoRA adapters in both modes included (their attention adapters land on rows
//! of the fused projections, their LoCon adapters on channels-last convolutions), and
//! taking adapters off leaves the weights as they were, bit for bit.

use crate::common;

use common::{assert_close, fixtures, read_tensors, CONFIGS};
use sdxld::engine::models::nn::is_channels_last;
use sdxld::engine::pipeline::{Placement, SdxlPipeline};
use sdxld::engine::weights::WeightLayout;

const LAYOUTS: [WeightLayout; 3] = [
    WeightLayout {
        channels_last: true,
        fused_projections: false,
    },
    WeightLayout {
        channels_last: false,
        fused_projections: true,
    },
    WeightLayout {
        channels_last: true,
        fused_projections: true,
    },
];

fn load(config: &str, layout: WeightLayout) -> SdxlPipeline {
    let placement = Placement::cpu().with_layout(layout);
    SdxlPipeline::load(&fixtures().join(config).join("pipeline"), placement)
        .unwrap_or_else(|e| panic!("{config}: {e}"))
}

/// The layout is in place: self-attention's q/k/v and cross-attention's k/v are rows of
/// one tensor, cross-attention's q is not, convolutions are channels-last.
fn assert_laid_out(what: &str, pipe: &SdxlPipeline, layout: WeightLayout) {
    let layers = pipe.unet().adaptable_layers();
    let mut seen = [0usize; 3];
    for (key, layer) in layers.iter() {
        let fused = layer.rows.is_some();
        if key.ends_with("attn1.to_q") || key.ends_with("attn1.to_v") || key.ends_with("attn2.to_k")
        {
            assert_eq!(fused, layout.fused_projections, "{what}: {key}");
            seen[0] += 1;
        } else if key.ends_with("attn2.to_q") || key.ends_with("proj_in") {
            assert!(!fused, "{what}: {key}");
            seen[1] += 1;
        } else if key == "conv_in" || key.ends_with("conv1") {
            assert_eq!(
                is_channels_last(&layer.tensor),
                layout.channels_last,
                "{what}: {key}"
            );
            seen[2] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n > 0), "{what}: layers {seen:?}");
}

#[test]
fn the_unet_in_every_layout_matches_diffusers() {
    let _guard = tch::no_grad_guard();
    for config in CONFIGS {
        let r = read_tensors(&fixtures().join(config).join("components.safetensors"));
        for layout in LAYOUTS {
            let what = format!("{config} {layout:?}");
            let pipe = load(config, layout);
            assert_laid_out(&what, &pipe, layout);
            for tag in ["square", "odd"] {
                let (out, expected) = common::unet_on_fixture(pipe.unet(), &r, tag);
                assert!(out.is_contiguous(), "{what} {tag}: output not contiguous");
                assert_close(&format!("{what} unet {tag}"), &out, expected);
            }
        }
    }
}

#[test]
fn the_vae_with_channels_last_convolutions_matches_diffusers() {
    let _guard = tch::no_grad_guard();
    for config in CONFIGS {
        let r = read_tensors(&fixtures().join(config).join("components.safetensors"));
        let pipe = load(config, LAYOUTS[0]);
        assert!(
            pipe.vae().is_channels_last(),
            "{config}: VAE not channels-last"
        );
        let decoded = pipe.vae().decode(&r["vae.latents"]);
        assert_close(&format!("{config} vae decode"), &decoded, &r["vae.decoded"]);
        let (mean, logvar) = pipe.vae().encode(&r["vae.image"]);
        assert_close(&format!("{config} vae mean"), &mean, &r["vae.mean"]);
        assert_close(&format!("{config} vae logvar"), &logvar, &r["vae.logvar"]);
        assert!(decoded.is_contiguous() && mean.is_contiguous() && logvar.is_contiguous());
    }
}

#[test]
fn generations_and_loras_in_the_laid_out_pipeline_match_diffusers_and_leave_no_trace() {
    let layout = LAYOUTS[2];
    for config in CONFIGS {
        common::assert_lora_cases_match_and_leave_no_trace(&load(config, layout), config);
    }
}
