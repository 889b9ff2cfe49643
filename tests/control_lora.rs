//! Stability Control-LoRAs built on the base UNet: the ControlNet they make gives the
//! residuals of the reference's, on both tiny pipelines (two and one resnets per block,
//! hint blocks of four and three levels), on a diffusers folder and on a single-file
//! checkpoint, with and without the fused, channels-last layout; and on the file whose
//! low-rank layers keep the UNet's biases, diffusers' own loader's residuals. Files made
//! for another UNet, or that are not whole, are refused naming the tensor. The cache
//! builds one once per base, again for another base, and counts what it builds.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use common::{controlnet_fixtures, fixtures, read_tensors, relative_error};
use sdxld::engine::cache::ModelCache;
use sdxld::engine::device::Placement;
use sdxld::engine::error::EngineError;
use sdxld::engine::loading::control_lora;
use sdxld::engine::models::controlnet::{ControlNetModel, ControlScale};
use sdxld::engine::models::unet::{AddedCond, ControlResiduals};
use sdxld::engine::noise::NoiseStream;
use sdxld::engine::pipeline::SdxlPipeline;
use sdxld::engine::weights::{read_all, recording, WeightLayout};
use tch::{Device, Kind, Tensor};

fn pipeline(path: &Path) -> SdxlPipeline {
    SdxlPipeline::load(path, Placement::cpu()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn build(
    file: &Path,
    base: &SdxlPipeline,
    placement: Placement,
) -> Result<ControlNetModel, EngineError> {
    let unet = base.unet_weights(placement)?;
    control_lora::load(file, unet, base.unet().config(), placement)
}

fn lora_file(config: &str, name: &str) -> PathBuf {
    controlnet_fixtures()
        .join(config)
        .join("control_lora")
        .join(format!("{name}.safetensors"))
}

/// The residuals of `model` on the recorded inputs `r` with their image.
fn residuals_of(
    model: &ControlNetModel,
    r: &HashMap<String, Tensor>,
    scale: f64,
    guess_mode: bool,
) -> ControlResiduals {
    residuals_for(model, r, &r["image"], scale, guess_mode)
}

/// The residuals of `model` on the recorded inputs `r` with the control image `image`.
fn residuals_for(
    model: &ControlNetModel,
    r: &HashMap<String, Tensor>,
    image: &Tensor,
    scale: f64,
    guess_mode: bool,
) -> ControlResiduals {
    let added = AddedCond {
        text_embeds: &r["text_embeds"],
        time_ids: &r["time_ids"],
        timestep_cond: None,
    };
    model.forward(
        &r["sample"],
        &r["timestep"].reshape([]),
        &r["encoder_hidden_states"],
        Some(&added),
        image,
        ControlScale { scale, guess_mode },
    )
}

/// The residuals of `model` on the recorded inputs equal the recorded ones (scale 1 and
/// guess mode at 0.5); the control image moves them.
fn assert_residuals(what: &str, model: &ControlNetModel, recorded: &Path) {
    let r = read_tensors(recorded);
    common::assert_recorded_residuals(what, &r, |scale, guess| {
        residuals_of(model, &r, scale, guess)
    });
    let other = residuals_for(model, &r, &r["image"].zeros_like(), 1.0, false);
    let moved = relative_error(&other.down[0], &r["scale1.down.0"]);
    assert!(
        moved > 1e-2,
        "{what}: the control image moved the residuals by {moved:e}"
    );
}

#[test]
fn control_loras_give_the_reference_residuals() {
    let laid_out = Placement::cpu().with_layout(WeightLayout {
        channels_last: true,
        fused_projections: true,
    });
    for config in ["tiny2", "tiny3"] {
        let base = pipeline(&fixtures().join(config).join("pipeline"));
        for placement in [Placement::cpu(), laid_out] {
            let what = format!("{config} canny {:?}", placement.layout);
            let file = lora_file(config, "canny");
            let model = build(&file, &base, placement).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_residuals(&what, &model, &file.with_file_name("canny_io.safetensors"));
        }
    }
    // diffusers' loader builds the same ControlNet from a file whose low-rank layers keep
    // the UNet's biases (it leaves those biases at the UNet's values).
    let base = pipeline(&fixtures().join("tiny2/pipeline"));
    let file = lora_file("tiny2", "unet_biases");
    let model = build(&file, &base, Placement::cpu()).expect("unet_biases");
    assert_residuals(
        "tiny2 unet_biases",
        &model,
        &file.with_file_name("unet_biases_io.safetensors"),
    );
}

#[test]
fn a_single_file_base_builds_the_same_controlnet() {
    let single = fixtures().join("tiny2/single_file/tiny2-single.safetensors");
    let base = pipeline(&single);
    let file = lora_file("tiny2", "canny");
    let model = build(&file, &base, Placement::cpu()).expect("on the single file");
    assert_residuals(
        "tiny2 canny on the single file",
        &model,
        &file.with_file_name("canny_io.safetensors"),
    );
}

/// The file at `file` with `edit` applied to its tensors, written in `dir`.
fn edited(dir: &Path, file: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut tensors: Vec<(String, Tensor)> = read_all(file, Device::Cpu, Kind::Float)
        .expect("read")
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let out = dir.join("edited.safetensors");
    Tensor::write_safetensors(&tensors, &out).expect("write");
    out
}

fn refusal(file: &Path, base: &SdxlPipeline) -> String {
    match build(file, base, Placement::cpu()) {
        Ok(_) => panic!("{} was built", file.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn control_loras_that_do_not_fit_the_unet_are_refused_naming_the_tensor() {
    let base = pipeline(&fixtures().join("tiny2/pipeline"));
    // Made for SD 1.5's UNet (768-wide text, other widths).
    let sd15 = refusal(
        &controlnet_fixtures().join("sd15_control_lora.safetensors"),
        &base,
    );
    assert!(
        sd15.contains("made for another UNet") && sd15.contains("input_blocks"),
        "{sd15}"
    );
    // Made for tiny3's UNet (one resnet per block).
    let other = refusal(&lora_file("tiny3", "canny"), &base);
    assert!(other.contains("made for another UNet"), "{other}");

    let dir = tempfile::tempdir().expect("tempdir");
    let canny = lora_file("tiny2", "canny");
    let down = "input_blocks.1.0.in_layers.2.down";
    let missing = edited(dir.path(), &canny, |t| t.retain(|(n, _)| n != down));
    let message = refusal(&missing, &base);
    assert!(
        message.contains("input_blocks.1.0.in_layers.2.up"),
        "{message}"
    );

    let rank = edited(dir.path(), &canny, |t| {
        for (name, tensor) in t.iter_mut() {
            if name == down {
                *tensor = tensor.narrow(0, 0, 2);
            }
        }
    });
    let message = refusal(&rank, &base);
    assert!(
        message.contains("input_blocks.1.0.in_layers.2"),
        "{message}"
    );

    // A tensor of the ControlNet's own that the file lacks is named as the file stores it.
    for own in [
        "zero_convs.1.0.weight",
        "middle_block_out.0.bias",
        "input_hint_block.2.weight",
    ] {
        let lacking = edited(dir.path(), &canny, |t| t.retain(|(n, _)| n != own));
        let message = refusal(&lacking, &base);
        assert!(
            message.contains(own) && message.contains("edited.safetensors"),
            "{message}"
        );
    }

    let stray = edited(dir.path(), &canny, |t| {
        t.push((
            "input_blocks.1.0.extra.weight".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ));
    });
    let message = refusal(&stray, &base);
    assert!(
        message.contains("input_blocks.1.0.extra.weight"),
        "{message}"
    );
}

#[test]
fn every_stored_tensor_matters() {
    // A whole bias of a low-rank layer replaces the UNet's: changing it moves the residuals
    // (diffusers' loader ignores it).
    let base = pipeline(&fixtures().join("tiny2/pipeline"));
    let canny = lora_file("tiny2", "canny");
    let dir = tempfile::tempdir().expect("tempdir");
    // The second convolution's: no norm follows it to cancel a change.
    let bias = "input_blocks.1.0.out_layers.3.bias";
    let file = edited(dir.path(), &canny, |t| {
        for (name, tensor) in t.iter_mut() {
            if name == bias {
                *tensor = &*tensor + noise_like(tensor) * 0.5;
            }
        }
    });
    let r = read_tensors(&canny.with_file_name("canny_io.safetensors"));
    let model = build(&file, &base, Placement::cpu()).expect("edited");
    let residuals = residuals_of(&model, &r, 1.0, false);
    let moved = relative_error(&residuals.down[1], &r["scale1.down.1"]);
    assert!(
        moved > 1e-3,
        "the stored bias moved the residuals by {moved:e}"
    );
}

/// Standard normal noise of `tensor`'s shape, drawn while holding the process's random
/// stream (another test's generation may be drawing its noise beside this one).
fn noise_like(tensor: &Tensor) -> Tensor {
    NoiseStream::lock()
        .randn(&tensor.size())
        .to_kind(tensor.kind())
}

/// tiny2's pipeline with its UNet's weights moved, in `dir`.
fn moved_base(dir: &Path) -> PathBuf {
    let base = dir.join("moved");
    common::copy_tree(&fixtures().join("tiny2/pipeline"), &base);
    let file = base.join("unet/diffusion_pytorch_model.safetensors");
    let tensors: Vec<(String, Tensor)> = read_all(&file, Device::Cpu, Kind::Float)
        .expect("read")
        .into_iter()
        .map(|(name, t)| {
            let moved = &t + noise_like(&t) * 0.05;
            (name, moved)
        })
        .collect();
    Tensor::write_safetensors(&tensors, &file).expect("write");
    base
}

#[test]
fn the_cache_builds_a_control_lora_once_per_base_and_counts_what_it_builds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cache = ModelCache::new(Placement::cpu(), None);
    let tiny2 = cache
        .pipeline(&fixtures().join("tiny2/pipeline"))
        .expect("tiny2");
    let moved = cache.pipeline(&moved_base(dir.path())).expect("moved");
    let file = lora_file("tiny2", "canny");
    let recorded = file.with_file_name("canny_io.safetensors");
    let before = cache.stats();
    let on_tiny2 = cache.controlnet(&file, &tiny2).expect("on tiny2");
    let after = cache.stats();
    assert_eq!(after.component_loads, before.component_loads + 1);
    // The budget counts what the build holds: the UNet's encoder and the file's own
    // tensors, not the file.
    let (_, params) = recording(|| build(&file, &tiny2, Placement::cpu())).expect("build");
    let built: u64 = params.iter().map(|p| p.numel() as u64 * 4).sum();
    assert_eq!(after.resident_bytes - before.resident_bytes, built);
    let again = cache.controlnet(&file, &tiny2).expect("again");
    assert!(Rc::ptr_eq(&on_tiny2, &again), "built twice for one base");
    let cached = on_tiny2.controlnet().expect("a ControlNet");
    assert_residuals("cached on tiny2", cached, &recorded);
    // Another base's UNet builds another ControlNet, in its place.
    let on_moved = cache.controlnet(&file, &moved).expect("on moved");
    assert!(!Rc::ptr_eq(&on_tiny2, &on_moved));
    assert_eq!(cache.stats().component_loads, after.component_loads + 1);
    let r = read_tensors(&recorded);
    let residuals = residuals_of(on_moved.controlnet().expect("ControlNet"), &r, 1.0, false);
    let moved_by = relative_error(&residuals.down[0], &r["scale1.down.0"]);
    assert!(
        moved_by > 1e-3,
        "the other base moved the residuals by {moved_by:e}"
    );
    let resident = cache.resident_paths();
    assert_eq!(
        resident.iter().filter(|p| **p == file).count(),
        1,
        "{resident:?}"
    );
}
