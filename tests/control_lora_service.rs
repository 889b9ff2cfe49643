//! Control-LoRAs over gRPC: listed as such, a unit with one gives diffusers' image of the
//! ControlNet it builds on the request's base model (a diffusers folder, then the same
//! UNet as a single-file checkpoint, which builds it again), and one that does not fit
//! the base model is FAILED_PRECONDITION naming both, with the server serving on.

use crate::common;

use common::server::TestServer;
use common::{
    assert_images_match, controlnet_cases, controlnet_fixtures, decoded_image, fixtures,
    read_tensors,
};
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

/// Roots: the tiny2 pipeline, its single-file checkpoint and the tiny3 pipeline as base
/// models; tiny2's and tiny3's Control-LoRAs and an SD 1.5 one as ControlNets.
struct Roots {
    bases: tempfile::TempDir,
    controlnets: tempfile::TempDir,
}

fn roots() -> Roots {
    let bases = tempfile::tempdir().expect("tempdir");
    common::copy_tree(
        &fixtures().join("tiny2/pipeline"),
        &bases.path().join("tiny2"),
    );
    common::copy_tree(
        &fixtures().join("tiny3/pipeline"),
        &bases.path().join("tiny3"),
    );
    let single = fixtures().join("tiny2/single_file/tiny2-single.safetensors");
    std::fs::copy(single, bases.path().join("tiny2_single.safetensors")).expect("copy");
    let controlnets = tempfile::tempdir().expect("tempdir");
    let cn = controlnet_fixtures();
    for (from, name) in [
        (
            cn.join("tiny2/control_lora/canny.safetensors"),
            "canny_lora",
        ),
        (
            cn.join("tiny3/control_lora/canny.safetensors"),
            "tiny3_lora",
        ),
        (cn.join("sd15_control_lora.safetensors"), "sd15_lora"),
    ] {
        std::fs::copy(from, controlnets.path().join(format!("{name}.safetensors"))).expect("copy");
    }
    Roots { bases, controlnets }
}

async fn server(roots: &Roots) -> TestServer {
    TestServer::start(&[
        (
            "SDXLD__MODELS__BASE_ROOTS",
            roots.bases.path().to_str().expect("utf-8"),
        ),
        ("SDXLD__ENGINE__DEFAULT_MODEL", "tiny2"),
        (
            "SDXLD__MODELS__CONTROLNET_ROOTS",
            roots.controlnets.path().to_str().expect("utf-8"),
        ),
        ("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
    ])
    .await
}

/// The request of tiny2's fixture case `control_lora` on the base `model`, its unit
/// naming `controlnet`.
fn spec(model: &str, controlnet: &str) -> pb::GenerationSpec {
    let case = controlnet_cases("tiny2")
        .into_iter()
        .find(|c| c.name() == "control_lora")
        .expect("case control_lora");
    let unit = &case["units"][0];
    let image = controlnet_fixtures()
        .join("tiny2")
        .join(unit["image"].as_str().expect("image"));
    pb::GenerationSpec {
        model: model.into(),
        prompt: case.text("prompt").into(),
        seed: Some(case.int("seed")),
        steps: case.int("steps") as u32,
        guidance_scale: Some(case.float("guidance") as f32),
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        controlnets: vec![pb::ControlNetUnit {
            model: controlnet.into(),
            image: std::fs::read(image).expect("control image"),
            conditioning_scale: unit["scale"].as_f64().map(|s| s as f32),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_lora_unit_gives_the_image_of_the_controlnet_it_builds() {
    let roots = roots();
    let server = server(&roots).await;
    let listed = server.list_models(pb::ModelKind::Controlnet).await;
    for name in ["canny_lora", "tiny3_lora", "sd15_lora"] {
        let info = listed
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.controlnet.clone())
            .unwrap_or_else(|| panic!("{name} is not listed: {listed:?}"));
        assert!(info.control_lora, "{name}: {info:?}");
        assert!(!info.union && !info.t2i_adapter, "{name}: {info:?}");
    }
    let sd15 = listed
        .iter()
        .find(|m| m.name == "sd15_lora")
        .and_then(|m| m.controlnet.clone());
    assert_eq!(sd15.map(|c| c.base), Some("sd1".to_string()));

    let reference = read_tensors(&controlnet_fixtures().join("tiny2/cases.safetensors"));
    let expected = reference["control_lora.images"].get(0);
    // On the folder, on the single file (built again on its UNet), on the folder again.
    for model in ["tiny2", "tiny2_single", "tiny2"] {
        let response = server
            .images(spec(model, "canny_lora"))
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_images_match(
            &format!("on {model}"),
            &decoded_image(&response.images[0].data),
            &expected,
        );
        let completed = response.completed.expect("completed");
        assert!(
            completed
                .models
                .iter()
                .any(|m| m.kind == pb::ModelKind::Controlnet as i32 && m.name == "canny_lora"),
            "{completed:?}"
        );
    }
    // It stays resident once built (listed as loaded).
    let listed = server.list_models(pb::ModelKind::Controlnet).await;
    let resident: Vec<_> = listed
        .iter()
        .filter(|m| m.resident)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(resident, ["canny_lora"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_loras_for_another_unet_are_refused_naming_both() {
    let roots = roots();
    let server = server(&roots).await;
    for (model, controlnet) in [
        ("tiny2", "sd15_lora"),
        ("tiny2", "tiny3_lora"),
        ("tiny3", "canny_lora"),
    ] {
        let status = server
            .images(spec(model, controlnet))
            .await
            .expect_err("another UNet's Control-LoRA");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INCOMPATIBLE_MODELS", "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!("`{controlnet}` (spec.controlnets[0].model)"))
                && message.contains(&format!("base model `{model}`"))
                && message.contains("made for another UNet"),
            "{message}"
        );
        assert!(
            !message.contains(roots.controlnets.path().to_str().expect("utf-8")),
            "{message}"
        );
    }
    // Loading one alone has no base to build it on.
    let status = server
        .models()
        .await
        .load_model(pb::LoadModelRequest {
            name: "canny_lora".into(),
            kind: pb::ModelKind::Controlnet as i32,
        })
        .await
        .expect_err("loaded alone");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("Control-LoRA"), "{status:?}");
    // The server serves on: the fitting pair still works.
    server
        .images(spec("tiny2", "canny_lora"))
        .await
        .expect("after the refusals");
}
