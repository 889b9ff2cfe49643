//! Stability Control-LoRAs built on the base UNet: the ControlNet they make gives the
//! residuals of the reference's, on both tiny pipelines (two and one resnets per block,
//! hint blocks of four and three levels), on a diffusers folder and on a single-file
//! checkpoint, with and without the fused, channels-last layout; and on the file whose
//! low-rank layers keep the UNet's biases, diffusers' own loader's residuals. Files made
//! for another UNet, or that are not whole, are refused naming the tensor.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, controlnet_fixtures, fixtures, read_tensors, relative_error};
use sdxld::engine::device::Placement;
use sdxld::engine::error::EngineError;
use sdxld::engine::loading::control_lora;
use sdxld::engine::models::controlnet::{ControlNetModel, ControlScale};
use sdxld::engine::models::unet::AddedCond;
use sdxld::engine::pipeline::SdxlPipeline;
use sdxld::engine::weights::{read_all, WeightLayout};
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

/// The residuals of `model` on the recorded inputs equal the recorded ones (scale 1 and
/// guess mode at 0.5); the control image moves them.
fn assert_residuals(what: &str, model: &ControlNetModel, recorded: &Path) {
    let r = read_tensors(recorded);
    let added = AddedCond {
        text_embeds: &r["text_embeds"],
        time_ids: &r["time_ids"],
        timestep_cond: None,
    };
    let timestep = r["timestep"].reshape([]);
    let run = |image: &Tensor, scale: f64, guess_mode: bool| {
        let scale = ControlScale { scale, guess_mode };
        model.forward(
            &r["sample"],
            &timestep,
            &r["encoder_hidden_states"],
            Some(&added),
            image,
            scale,
        )
    };
    for (tag, scale, guess) in [("scale1", 1.0, false), ("guess05", 0.5, true)] {
        let residuals = run(&r["image"], scale, guess);
        let count = r
            .keys()
            .filter(|k| k.starts_with(&format!("{tag}.down.")))
            .count();
        assert_eq!(residuals.down.len(), count, "{what}");
        for (i, down) in residuals.down.iter().enumerate() {
            assert_close(
                &format!("{what} {tag} down {i}"),
                down,
                &r[&format!("{tag}.down.{i}")],
            );
        }
        assert_close(
            &format!("{what} {tag} mid"),
            &residuals.mid,
            &r[&format!("{tag}.mid")],
        );
    }
    let moved = relative_error(
        &run(&r["image"].zeros_like(), 1.0, false).down[0],
        &r["scale1.down.0"],
    );
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
                *tensor = &*tensor + tensor.randn_like() * 0.5;
            }
        }
    });
    let r = read_tensors(&canny.with_file_name("canny_io.safetensors"));
    let model = build(&file, &base, Placement::cpu()).expect("edited");
    let added = AddedCond {
        text_embeds: &r["text_embeds"],
        time_ids: &r["time_ids"],
        timestep_cond: None,
    };
    let scale = ControlScale {
        scale: 1.0,
        guess_mode: false,
    };
    let residuals = model.forward(
        &r["sample"],
        &r["timestep"].reshape([]),
        &r["encoder_hidden_states"],
        Some(&added),
        &r["image"],
        scale,
    );
    let moved = relative_error(&residuals.down[1], &r["scale1.down.1"]);
    assert!(
        moved > 1e-3,
        "the stored bias moved the residuals by {moved:e}"
    );
}
