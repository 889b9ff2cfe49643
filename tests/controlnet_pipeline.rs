//! ControlNet pipelines against diffusers' StableDiffusionXLControlNetPipeline and its
//! img2img and inpaint variants, on both tiny pipelines: one unit at scale 1 and 0.5 (a
//! batch of two), a 0.2–0.7 window with first- and second-order schedulers and a
//! multistep one, guess mode, a pooled ControlNet, two units summed, a tall image, image
//! to image and inpainting with a separate control image, a LoRA on the base UNet, and
//! Control-LoRAs built on the pipeline's UNet (alone and beside a ControlNet).

use crate::common;

use std::path::Path;

use common::{controlnet_cases, controlnet_fixtures, fixtures, read_tensors, Case};
use sdxld::engine::control::{ControlCondition, ControlMode, ControlType, ControlUnit};
use sdxld::engine::loading::control_lora;
use sdxld::engine::lora::{apply, LoraMode};
use sdxld::engine::models::control_model::ControlModel;
use sdxld::engine::pipeline::{Control, GenerateOutput, GenerateParams, Placement, SdxlPipeline};
use tch::Tensor;

/// A case's units: their ControlNets, maps and settings.
struct Units {
    models: Vec<ControlModel>,
    /// Per unit: its map, or a union unit's map per condition.
    maps: Vec<Vec<Tensor>>,
    settings: Vec<ControlUnit>,
}

impl Units {
    fn of(config: &str, case: &Case, pipe: &SdxlPipeline) -> Self {
        let root = controlnet_fixtures().join(config);
        let units = case["units"].as_array().expect("units");
        let number =
            |u: &serde_json::Value, key: &str, default: f64| u[key].as_f64().unwrap_or(default);
        Units {
            models: units
                .iter()
                .map(|u| unit_model(&root.join(u["model"].as_str().expect("model")), pipe))
                .collect(),
            maps: units
                .iter()
                .map(|u| match u["images"].as_array() {
                    Some(images) => images
                        .iter()
                        .map(|i| map_file(&root.join(i.as_str().expect("image"))))
                        .collect(),
                    None => vec![map_file(&root.join(u["image"].as_str().expect("image")))],
                })
                .collect(),
            settings: units
                .iter()
                .map(|u| ControlUnit {
                    scale: number(u, "scale", 1.0),
                    guidance_start: number(u, "start", 0.0),
                    guidance_end: number(u, "end", 1.0),
                    mode: if u["guess"].as_bool().unwrap_or(false) {
                        ControlMode::Guess
                    } else {
                        ControlMode::Balanced
                    },
                    conditions: union_conditions(u),
                })
                .collect(),
        }
    }

    fn controls(&self) -> Vec<Control<'_>> {
        (0..self.models.len())
            .map(|i| Control {
                model: &self.models[i],
                maps: &self.maps[i],
                unit: &self.settings[i],
            })
            .collect()
    }
}

/// A unit's model: a ControlNet folder, or a Control-LoRA built on `pipe`'s UNet.
fn unit_model(path: &Path, pipe: &SdxlPipeline) -> ControlModel {
    if !control_lora::is_control_lora_file(path) {
        return ControlModel::load_path(path, Placement::cpu()).expect("controlnet");
    }
    let unet = pipe.unet_weights(Placement::cpu()).expect("unet weights");
    let model = control_lora::load(path, unet, pipe.unet().config(), Placement::cpu())
        .expect("control-lora");
    ControlModel::ControlNet(Box::new(model))
}

/// A union unit's conditions: `types` (model slots) with `scales` (else the unit's).
fn union_conditions(u: &serde_json::Value) -> Vec<ControlCondition> {
    let Some(types) = u["types"].as_array() else {
        return Vec::new();
    };
    let all = [
        ControlType::OpenPose,
        ControlType::Depth,
        ControlType::HedScribble,
        ControlType::CannyLineart,
        ControlType::Normal,
        ControlType::Segment,
        ControlType::Tile,
        ControlType::Repaint,
    ];
    types
        .iter()
        .enumerate()
        .map(|(i, t)| ControlCondition {
            control_type: all[t.as_u64().expect("type") as usize],
            scale: u["scales"][i]
                .as_f64()
                .unwrap_or(u["scale"].as_f64().unwrap_or(1.0)),
        })
        .collect()
}

fn map_file(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).expect("control map");
    sdxld::engine::pixels::unit_range(&image::load_from_memory(&bytes).expect("png").to_rgb8())
}

/// The request of a case, with its init image and mask for image to image and inpainting.
fn params(config: &str, case: &Case) -> GenerateParams {
    let mut p = case.params();
    let kind = case["kind"].as_str().unwrap_or("txt2img");
    if kind != "txt2img" {
        let dir = fixtures().join(config);
        let init = std::fs::read(dir.join("init.png")).expect("init.png");
        let mut image = common::init_image(&init, case.float("strength")).expect("init");
        if kind == "inpaint" {
            let mask = std::fs::read(dir.join("mask.png")).expect("mask.png");
            image = common::with_mask(image, &mask).expect("mask");
        }
        p.init_image = Some(image);
    }
    p
}

fn generate(pipe: &SdxlPipeline, p: &GenerateParams, units: &Units) -> GenerateOutput {
    pipe.generate_controlled(p, &units.controls())
        .unwrap_or_else(|e| panic!("generate: {e}"))
}

#[test]
fn controlnet_pipelines_equal_diffusers() {
    for config in ["tiny2", "tiny3"] {
        let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
            .expect("pipeline");
        let reference = read_tensors(&controlnet_fixtures().join(config).join("cases.safetensors"));
        for case in controlnet_cases(config) {
            let what = format!("{config} {}", case.name());
            let units = Units::of(config, &case, &pipe);
            let applied =
                apply(&pipe, &common::case_loras(config, &case), LoraMode::Merge).expect("lora");
            let out = generate(&pipe, &params(config, &case), &units);
            drop(applied);
            common::assert_matches_case(&what, &out, &reference, case.name());
        }
    }
}

#[test]
fn the_control_map_and_the_window_change_the_image() {
    let config = "tiny2";
    let pipe = SdxlPipeline::load(&fixtures().join(config).join("pipeline"), Placement::cpu())
        .expect("pipeline");
    let case = controlnet_cases(config)
        .into_iter()
        .find(|c| c.name() == "half_scale")
        .expect("case");
    let p = params(config, &case);
    let mut units = Units::of(config, &case, &pipe);
    let controlled = generate(&pipe, &p, &units);
    let plain = pipe.generate(&p).expect("plain");
    let differs = |a: &GenerateOutput, b: &GenerateOutput| {
        (&a.latents - &b.latents).abs().max().double_value(&[]) > 1e-2
    };
    assert!(differs(&controlled, &plain), "the ControlNet has no effect");
    units.maps[0] = vec![map_file(
        &controlnet_fixtures().join(config).join("control_b.png"),
    )];
    let other_map = generate(&pipe, &p, &units);
    assert!(
        differs(&controlled, &other_map),
        "the control map has no effect"
    );
    // A window that closes before the first call leaves the plain image, bit for bit.
    units.settings[0].guidance_start = 0.9;
    units.settings[0].guidance_end = 0.95;
    let p_four = GenerateParams { steps: 4, ..p };
    let closed = generate(&pipe, &p_four, &units);
    let plain_four = pipe.generate(&p_four).expect("plain");
    assert!(
        closed.latents.equal(&plain_four.latents),
        "a closed window changed the image"
    );
}

/// The three resize modes give diffusers' image processor's bytes (Pillow's Lanczos
/// resampling) for maps taller, wider and smaller than the output, three output shapes.
#[test]
fn resize_modes_fit_control_maps_as_diffusers_does() {
    use sdxld::engine::control::{fit, ResizeMode};
    let dir = controlnet_fixtures().join("resize");
    let modes = [
        ("default", ResizeMode::JustResize),
        ("crop", ResizeMode::CropAndResize),
        ("fill", ResizeMode::ResizeAndFill),
    ];
    let mut compared = 0;
    for source in ["tall", "wide", "small"] {
        let map = image::open(dir.join(format!("{source}.png")))
            .expect("source")
            .to_rgb8();
        for (w, h) in [(64u32, 64u32), (96, 64), (64, 104)] {
            for (name, mode) in modes {
                let what = format!("{source} {name} {w}x{h}");
                let expected = image::open(dir.join(format!("{source}_{name}_{w}x{h}.png")))
                    .expect("reference")
                    .to_rgb8();
                let got = fit(&map, w, h, mode);
                assert_eq!(got.dimensions(), expected.dimensions(), "{what}");
                let differing = got
                    .as_raw()
                    .iter()
                    .zip(expected.as_raw())
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(
                    differing, 0,
                    "{what}: {differing} bytes differ from diffusers'"
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 27);
}
