//! ControlNets against diffusers: tiny random-weight ControlNets of both pipelines, one
//! copied from the UNet's encoder and one with a config of its own (blocks without
//! attention, a mid block of one resnet, BGR, other heads and depths, pooled residuals),
//! give diffusers' residuals at scale 1 and in guess mode, and the UNet adds them as
//! diffusers does.

use crate::common;

use common::{assert_close, controlnet_fixtures, fixtures, read_tensors, relative_error};
use sdxld::engine::device::Placement;
use sdxld::engine::models::attention::Context;
use sdxld::engine::models::controlnet::{ControlNetModel, ControlScale};
use sdxld::engine::models::unet::{AddedCond, ControlAdditions, UNet2DConditionModel};
use sdxld::engine::weights::WeightLayout;

#[test]
fn controlnet_residuals_and_the_controlled_unet_equal_diffusers() {
    // Also with channels-last convolutions and fused attention projections.
    let laid_out = Placement::cpu().with_layout(WeightLayout {
        channels_last: true,
        fused_projections: true,
    });
    for (config, placement) in [("tiny2", Placement::cpu()), ("tiny3", Placement::cpu())]
        .into_iter()
        .chain([("tiny2", laid_out), ("tiny3", laid_out)])
    {
        let unet = UNet2DConditionModel::load_dir(
            &fixtures().join(config).join("pipeline/unet"),
            placement,
        )
        .expect("unet");
        for kind in ["from_unet", "own"] {
            let what = format!("{config}/{kind} {:?}", placement.layout);
            let root = controlnet_fixtures().join(config);
            let model = ControlNetModel::load_dir(&root.join(kind), placement)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let r = read_tensors(&root.join(format!("{kind}.safetensors")));
            let added = AddedCond {
                text_embeds: &r["text_embeds"],
                time_ids: &r["time_ids"],
                timestep_cond: None,
            };
            let timestep = r["timestep"].reshape([]);
            let run = |image: &tch::Tensor, scale: ControlScale| {
                model.forward(
                    &r["sample"],
                    &timestep,
                    &r["encoder_hidden_states"],
                    Some(&added),
                    image,
                    scale,
                )
            };
            common::assert_recorded_residuals(&what, &r, |scale, guess_mode| {
                run(&r["image"], ControlScale { scale, guess_mode })
            });
            let residuals = run(
                &r["image"],
                ControlScale {
                    scale: 1.0,
                    guess_mode: false,
                },
            );
            let first_down = residuals.down[0].shallow_clone();
            let out = unet.forward_controlled(
                &r["sample"],
                &timestep,
                &Context::text(&r["encoder_hidden_states"]),
                Some(&added),
                Some(&ControlAdditions {
                    residuals: Some(residuals),
                    features: Vec::new(),
                }),
            );
            assert_close(&format!("{what} controlled unet"), &out, &r["unet.out"]);
            // The control image matters: another one gives other residuals.
            let other = run(
                &r["image"].zeros_like(),
                ControlScale {
                    scale: 1.0,
                    guess_mode: false,
                },
            );
            let moved = relative_error(&other.down[0], &first_down);
            assert!(
                moved > 1e-2,
                "{what}: the control image moved the residuals by {moved:e}"
            );
        }
    }
}

#[test]
fn impossible_controlnet_configs_are_refused_naming_the_key() {
    let source = controlnet_fixtures().join("tiny2/own");
    let cases = [
        (
            "controlnet_conditioning_channel_order",
            serde_json::json!("xyz"),
        ),
        ("conditioning_embedding_out_channels", serde_json::json!([])),
        ("conditioning_channels", serde_json::json!(0)),
        (
            "mid_block_type",
            serde_json::json!("UNetMidBlock2DSimpleCrossAttn"),
        ),
        ("norm_num_groups", serde_json::json!(5)),
        ("conv_in_kernel", serde_json::json!(5)),
    ];
    for (key, value) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(source.join(file), dir.path().join(file)).expect("copy");
        }
        common::set_config(&dir.path().join("config.json"), key, value.clone());
        let error = match ControlNetModel::load_dir(dir.path(), Placement::cpu()) {
            Ok(_) => panic!("{key}={value} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains("config.json") && error.contains(&format!("`{key}`")),
            "{key}={value}: {error}"
        );
    }
}

/// A tiny ControlNetUnionModel per pipeline (one and two fusion layers): the residuals
/// for one condition (scaled after), two conditions with their own scales (scaled inside
/// the fusion) and one in guess mode equal diffusers'.
#[test]
fn union_controlnet_residuals_equal_diffusers() {
    use sdxld::engine::models::controlnet::UnionCondition;
    for config in ["tiny2", "tiny3"] {
        let root = controlnet_fixtures().join(config);
        let model = ControlNetModel::load_dir(&root.join("union"), Placement::cpu())
            .unwrap_or_else(|e| panic!("{config}: {e}"));
        assert!(model.is_union());
        assert_eq!(model.control_types(), 8);
        let r = read_tensors(&root.join("union.safetensors"));
        let added = AddedCond {
            text_embeds: &r["text_embeds"],
            time_ids: &r["time_ids"],
            timestep_cond: None,
        };
        let timestep = r["timestep"].reshape([]);
        let condition = |image: &str, control_type: i64, scale: f64| UnionCondition {
            image: &r[image],
            control_type,
            scale,
        };
        let runs = [
            ("single", vec![condition("image_a", 3, 0.6)], false),
            (
                "multi",
                vec![condition("image_a", 1, 0.7), condition("image_b", 6, 1.2)],
                false,
            ),
            ("guess", vec![condition("image_b", 0, 0.5)], true),
        ];
        for (tag, conditions, guess) in runs {
            let what = format!("{config} union {tag}");
            let residuals = model
                .forward_union(
                    &r["sample"],
                    &timestep,
                    &r["encoder_hidden_states"],
                    Some(&added),
                    &conditions,
                    guess,
                )
                .expect("a union model");
            for (i, down) in residuals.down.iter().enumerate() {
                assert_close(
                    &format!("{what} down {i}"),
                    down,
                    &r[&format!("{tag}.down.{i}")],
                );
            }
            assert_close(
                &format!("{what} mid"),
                &residuals.mid,
                &r[&format!("{tag}.mid")],
            );
        }
    }
}

/// Single-file ControlNets in diffusers key names load with their config inferred from
/// the shapes (a full one with three transformer layers in its second block, a "small"
/// one without attention and with convolutional projections, a union model) and give
/// diffusers' residuals; a file in the original ControlNet layout is refused naming its
/// key; the registry lists the files by name.
#[test]
fn single_file_controlnets_are_inferred_from_their_shapes() {
    use sdxld::engine::models::controlnet::UnionCondition;
    use sdxld::engine::registry::{ModelKind, ModelRoots, Registry};
    let root = controlnet_fixtures();
    for name in ["full_xl", "small_xl", "union_xl"] {
        let file = root.join("single").join(format!("{name}.safetensors"));
        let model = ControlNetModel::load_file(&file, Placement::cpu())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = read_tensors(&root.join("single_io").join(format!("{name}.safetensors")));
        let added = AddedCond {
            text_embeds: &r["text_embeds"],
            time_ids: &r["time_ids"],
            timestep_cond: None,
        };
        let timestep = r["timestep"].reshape([]);
        let (sample, context) = (&r["sample"], &r["encoder_hidden_states"]);
        let residuals = if name == "union_xl" {
            assert!(model.is_union());
            let condition = UnionCondition {
                image: &r["image"],
                control_type: 2,
                scale: 0.9,
            };
            model
                .forward_union(
                    sample,
                    &timestep,
                    context,
                    Some(&added),
                    &[condition],
                    false,
                )
                .expect("union")
        } else {
            let scale = ControlScale {
                scale: 0.9,
                guess_mode: false,
            };
            model.forward(sample, &timestep, context, Some(&added), &r["image"], scale)
        };
        for (i, down) in residuals.down.iter().enumerate() {
            assert_close(&format!("{name} down {i}"), down, &r[&format!("down.{i}")]);
        }
        assert_close(&format!("{name} mid"), &residuals.mid, &r["mid"]);
    }
    let ldm = root.join("single/ldm_layout.safetensors");
    let err = ControlNetModel::load_file(&ldm, Placement::cpu())
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("control_model.input_blocks.0.0.weight"),
        "{err}"
    );
    let roots = ModelRoots {
        controlnet: vec![root.join("single")],
        ..Default::default()
    };
    let registry = Registry::new(roots, fixtures_default_model());
    let mut names: Vec<String> = registry
        .list()
        .into_iter()
        .filter(|m| m.kind == ModelKind::ControlNet)
        .map(|m| m.name)
        .collect();
    names.sort();
    assert_eq!(names, ["full_xl", "ldm_layout", "small_xl", "union_xl"]);
}

fn fixtures_default_model() -> sdxld::engine::registry::ModelEntry {
    let path = fixtures().join("tiny2/pipeline");
    sdxld::engine::registry::ModelEntry::from_path(&path).expect("the tiny2 pipeline")
}
