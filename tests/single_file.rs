//! Single-file SDXL checkpoints: the fixture script writes each tiny pipeline in the
//! original single-file layout (checked there against diffusers' own converters), and
//! sdxld gives identical latents and images from the folder and from the file, equal to
//! diffusers' reference; over the CLI and gRPC (a `.safetensors` name under a base root).

mod common;

use common::cli::sdxld;
use common::{assert_close, assert_images_match, fixtures, read_tensors, CONFIGS};
use sdxld::engine::error::EngineError;
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};

fn single_file(config: &str) -> std::path::PathBuf {
    fixtures()
        .join(config)
        .join("single_file")
        .join(format!("{config}-single.safetensors"))
}

/// The first end-to-end case of a configuration, as GenerateParams.
/// Case 0 of `config`'s generations and the name of its reference.
fn case_params(config: &str) -> (GenerateParams, String) {
    (common::cases(config, "cases")[0].params(), "case_0".into())
}

#[test]
fn a_single_file_gives_what_the_folder_gives() {
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let folder = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("folder");
        let file = SdxlPipeline::load(&single_file(config), Placement::cpu()).expect("file");
        let (p, case) = case_params(config);
        let from_folder = folder.generate(&p).expect("folder generates");
        let from_file = file.generate(&p).expect("file generates");
        assert!(
            from_folder.latents.equal(&from_file.latents),
            "{config}: latents differ between folder and single file"
        );
        assert!(
            from_folder.images.equal(&from_file.images),
            "{config}: images differ"
        );
        let reference = read_tensors(&dir.join(format!("{case}.safetensors")));
        assert_close(
            &format!("{config} single file"),
            &from_file.latents,
            &reference["latents"],
        );
        assert_images_match(
            &format!("{config} single file"),
            &from_file.images,
            &reference["images"],
        );
    }
}

#[test]
fn files_that_are_not_sdxl_checkpoints_are_refused() {
    let out = tempfile::tempdir().expect("tempdir");
    // A diffusers component file is not a single-file checkpoint.
    let unet_only = fixtures().join("tiny2/pipeline/unet/diffusion_pytorch_model.safetensors");
    let err = SdxlPipeline::load(&unet_only, Placement::cpu())
        .err()
        .expect("refused");
    assert!(matches!(err, EngineError::Incompatible(_)), "{err}");
    // A truncated checkpoint names the file.
    let bytes = std::fs::read(single_file("tiny2")).expect("read");
    let truncated = out.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = SdxlPipeline::load(&truncated, Placement::cpu())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("truncated.safetensors"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_file_over_grpc_and_the_cli() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;

    let dir = fixtures().join("tiny3");
    let reference = read_tensors(&dir.join("case_0.safetensors"));
    let (p, _) = case_params("tiny3");

    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("single.png");
    let (steps, seed) = (p.steps.to_string(), p.seed.to_string());
    let (width, height) = (p.width.to_string(), p.height.to_string());
    sdxld("generate")
        .flag("--model", single_file("tiny3"))
        .args(["--prompt", &p.prompt, "--steps", &steps, "--seed", &seed])
        .args(["--width", &width, "--height", &height])
        .args(["--guidance", &p.guidance_scale.to_string()])
        .flag("--output", &png)
        .succeeds();
    let got = common::image_file(&png);
    assert_images_match("CLI single file", &got, &reference["images"].get(0));

    let server = TestServer::start(&[(
        "SDXLD__MODELS__BASE_ROOTS",
        dir.join("single_file").to_str().expect("utf-8"),
    )])
    .await;
    let spec = pb::GenerationSpec {
        model: "tiny3-single".into(),
        prompt: p.prompt.clone(),
        steps: p.steps as u32,
        seed: Some(p.seed),
        width: p.width as u32,
        height: p.height as u32,
        guidance_scale: Some(p.guidance_scale as f32),
        ..Default::default()
    };
    let response = server.images(spec).await.expect("generated");
    let got = common::decoded_image(&response.images[0].data);
    assert_images_match("gRPC single file", &got, &reference["images"].get(0));
    let listed = server.list_models(pb::ModelKind::Base).await;
    let entry = listed
        .iter()
        .find(|m| m.name == "tiny3-single")
        .expect("listed");
    assert_eq!(entry.format, pb::ModelFormat::Safetensors as i32);
    assert!(entry.resident);
}
