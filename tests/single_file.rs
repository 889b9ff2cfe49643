//! Single-file SDXL checkpoints: the fixture script writes each tiny pipeline in the
//! original single-file layout (checked there against diffusers' own converters), and
//! sdxld gives identical latents and images from the folder and from the file, equal to
//! diffusers' reference; over the CLI and gRPC (a `.safetensors` name under a base root).

use crate::common;

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

/// Single files of non-stock shapes with no configs in their metadata (an SSD-1B-like
/// UNet with shallower up-block layers, a Vega-like one with convolutional projections,
/// text encoders of other widths and depths, VAEs of other levels): every config value the
/// tensors determine is inferred, so the file gives the folder's latents bit for bit; the
/// inferred configs equal the folder's where the tensors decide them.
#[test]
fn single_files_of_other_shapes_are_inferred_from_their_tensors() {
    use sdxld::engine::loading::single_file::Configs;
    for name in ["distilled3", "vega2"] {
        let dir = common::single_file_fixtures().join(name);
        let file = dir.join(format!("{name}.safetensors"));
        let (shapes, metadata) = sdxld::engine::weights::read_shapes(&file).expect("header");
        assert!(
            !metadata.contains_key("sdxld.configs"),
            "{name}: the file carries configs"
        );
        let inferred = Configs::infer(&file, &shapes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let folder = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("folder");
        let unet = folder.unet().config();
        assert_eq!(
            inferred.unet.block_out_channels, unet.block_out_channels,
            "{name}"
        );
        assert_eq!(
            inferred.unet.down_block_types, unet.down_block_types,
            "{name}"
        );
        assert_eq!(inferred.unet.up_block_types, unet.up_block_types, "{name}");
        assert_eq!(
            inferred.unet.layers_per_block, unet.layers_per_block,
            "{name}"
        );
        assert_eq!(
            inferred.unet.use_linear_projection, unet.use_linear_projection,
            "{name}"
        );
        assert_eq!(
            inferred.unet.projection_class_embeddings_input_dim,
            unet.projection_class_embeddings_input_dim,
            "{name}"
        );
        let te2 = folder.text_encoder_2().config();
        assert_eq!(
            (
                inferred.text_encoder_2.num_hidden_layers,
                inferred.text_encoder_2.hidden_size,
                inferred.text_encoder_2.projection_dim
            ),
            (te2.num_hidden_layers, te2.hidden_size, te2.projection_dim),
            "{name}"
        );
        let from_file =
            SdxlPipeline::load(&file, Placement::cpu()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let p = GenerateParams {
            prompt: "a castle on a hill".into(),
            negative_prompt: Some("blurry".into()),
            steps: 3,
            width: 64,
            height: 64,
            seed: 5,
            ..GenerateParams::default()
        };
        let a = folder.generate(&p).expect("folder generates");
        let b = from_file.generate(&p).expect("file generates");
        assert!(
            a.latents.equal(&b.latents) && a.images.equal(&b.images),
            "{name}: the file differs from the folder"
        );
    }
}

/// A stock SDXL base checkpoint's tensor layout (names and shapes only) infers to
/// stabilityai/stable-diffusion-xl-base-1.0's configs exactly: inference changes nothing
/// for the files that worked before it.
#[test]
fn the_stock_layout_infers_to_the_stock_configs() {
    use sdxld::engine::loading::single_file::Configs;
    let path = common::single_file_fixtures().join("stock_shapes.json");
    let text = std::fs::read_to_string(&path).expect("stock_shapes.json");
    let map: std::collections::BTreeMap<String, Vec<i64>> =
        serde_json::from_str(&text).expect("shapes");
    let shapes: Vec<(String, Vec<i64>)> = map.into_iter().collect();
    let inferred = Configs::infer(&path, &shapes).expect("stock shapes infer");
    assert_eq!(inferred, Configs::sdxl_base());
}
