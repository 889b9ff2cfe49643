//! A VAE chosen per request equals diffusers' pipelines with that VAE swapped in: it
//! decodes text-to-image latents and encodes the init image of image to image. Over the
//! engine, the CLI and gRPC; a VAE of another latent space is refused.

use crate::common;

use std::rc::Rc;

use common::cli::sdxld;
use common::{assert_close, assert_images_match, cases, fixtures, read_tensors, Case, CONFIGS};
use sdxld::engine::codec::VaeCodec;
use sdxld::engine::error::EngineError;
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};

fn params(case: &Case, picture: &[u8]) -> GenerateParams {
    let init_image = (case["kind"] == "img2img")
        .then(|| common::init_image(picture, case.float("strength")).expect("init"));
    GenerateParams {
        init_image,
        ..case.params()
    }
}

#[test]
fn a_swapped_vae_matches_diffusers() {
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let base = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
        let vae = VaeCodec::load(&dir.join("vae_alt"), Placement::cpu()).expect("vae");
        let pipe = base.with_vae(Rc::new(vae)).expect("same latent space");
        let picture = std::fs::read(dir.join("init.png")).expect("init.png");
        let reference = read_tensors(&dir.join("vae.safetensors"));
        for case in cases(config, "vae") {
            let name = case.name();
            let out = pipe
                .generate(&params(&case, &picture))
                .unwrap_or_else(|e| panic!("{config} {name}: {e}"));
            let what = format!("{config} {name} ({})", case["kind"]);
            common::assert_matches_case(&what, &out, &reference, name);
            // The model's own VAE gives another image: the swap is not a no-op.
            let own = base.generate(&params(&case, &picture)).expect("own VAE");
            let diff = common::image_difference(&own.images, &out.images);
            assert!(diff > 2, "{what}: the swapped VAE changed nothing");
        }
    }
}

#[test]
fn a_vae_of_another_latent_space_is_refused() {
    let tiny2 =
        SdxlPipeline::load(&fixtures().join("tiny2/pipeline"), Placement::cpu()).expect("load");
    // tiny3's VAE has a scale factor of 4, tiny2's 8.
    let other = VaeCodec::load(&fixtures().join("tiny3/vae_alt"), Placement::cpu()).expect("vae");
    let err = tiny2.with_vae(Rc::new(other)).err().expect("refused");
    assert!(matches!(err, EngineError::Incompatible(_)), "{err}");
}

#[test]
fn vae_over_the_cli_matches_diffusers() {
    let dir = fixtures().join("tiny3");
    let out = tempfile::tempdir().expect("tempdir");
    let png = out.path().join("vae.png");
    sdxld("generate")
        .args(["--width", "64", "--height", "64"])
        .args(["--prompt", "a lighthouse", "--seed", "51", "--steps", "6"])
        .flag("--model", dir.join("pipeline"))
        .flag("--vae", dir.join("vae_alt"))
        .flag("--output", &png)
        .succeeds();
    let got = common::image_file(&png);
    let reference = read_tensors(&dir.join("vae.safetensors"));
    assert_images_match("CLI --vae", &got, &reference["vae_0.images"].get(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vae_over_grpc_matches_diffusers() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;

    let dir = fixtures().join("tiny2");
    let server = TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            dir.join("pipeline").to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__VAE_ROOTS",
            fixtures().to_str().expect("utf-8"),
        ),
    ])
    .await;
    let mut client = server.generation().await;
    let reference = read_tensors(&dir.join("vae.safetensors"));
    let picture = std::fs::read(dir.join("init.png")).expect("init.png");
    for (k, init_image) in [
        None,
        Some(pb::InitImage {
            image: picture,
            strength: Some(0.6),
            ..Default::default()
        }),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = pb::GenerationSpec {
            prompt: "a lighthouse".into(),
            seed: Some(51),
            steps: 6,
            width: 64,
            height: 64,
            vae: "tiny2/vae_alt".into(),
            init_image,
            ..Default::default()
        };
        let response = server.images(spec).await.expect("generated");
        let got = common::decoded_image(&response.images[0].data);
        assert_images_match(
            &format!("gRPC vae_{k}"),
            &got,
            &reference[&format!("vae_{k}.images")].get(0),
        );
        let completed = response.completed.expect("completed");
        assert!(completed
            .models
            .iter()
            .any(|m| m.name == "tiny2/vae_alt" && m.kind == pb::ModelKind::Vae as i32));
    }

    let mut spec = pb::GenerationSpec {
        prompt: "x".into(),
        steps: 2,
        width: 64,
        height: 64,
        vae: "tiny3/vae_alt".into(),
        ..Default::default()
    };
    let status = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect_err("another latent space");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    spec.vae = "absent".into();
    let status = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect_err("absent");
    assert_eq!(status.code(), tonic::Code::NotFound);
    spec.vae = "../tiny2/vae_alt".into();
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("traversal");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn tiled_decoding_matches_diffusers() {
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let pipe = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
        let reference = read_tensors(&dir.join("tiled_decode.safetensors"));
        let latents = &reference["latents"];
        let vae = pipe.vae();
        let decoded =
            tch::no_grad(|| vae.decode_tiled(&vae.unscale_latents(latents))).expect("tiled decode");
        assert_close(
            &format!("{config} tiled decode"),
            &decoded,
            &reference["decoded"],
        );
        let tiled = pipe
            .vae_codec()
            .decode_with(&latents.get(0), true, &mut || Ok(()))
            .expect("tiled");
        assert_images_match(
            &format!("{config} tiled image"),
            &tiled.image,
            &reference["images"].get(0),
        );
        // Tiles are blended, so the result differs from decoding the whole at once.
        let whole = pipe.vae_codec().decode(&latents.get(0)).expect("whole");
        // A whole decode is stopped between the decoder's blocks as well: the mid block,
        // each resnet and upsampler (4 levels here: at least 8 checks); the checks leave
        // the image alone.
        let what = format!("{config} whole decode");
        let checked = common::assert_stops_between_passes(&what, 8, |between| {
            pipe.vae_codec()
                .decode_with(&latents.get(0), false, between)
        });
        assert!(checked.image.equal(&whole.image), "{what}");
        let diff = common::image_difference(&whole.image, &tiled.image);
        assert!(diff > 2, "{config}: tiling changed nothing");
        assert_stops_between_tiles(config, &pipe, &latents.get(0));
    }
}

/// A check runs before every tile (and between each tile's blocks), and a decode
/// stopped at the first or the last check decodes no further.
fn assert_stops_between_tiles(config: &str, pipe: &SdxlPipeline, latents: &tch::Tensor) {
    let codec = pipe.vae_codec();
    let what = format!("{config} tiled decode");
    common::assert_stops_between_passes(&what, 4, |between_tiles| {
        codec.decode_with(latents, true, between_tiles)
    });
}

#[test]
fn decoding_in_bands_equals_decoding_whole() {
    use sdxld::engine::weights::WeightLayout;

    for config in CONFIGS {
        let dir = fixtures().join(config).join("pipeline");
        let latents =
            &read_tensors(&fixtures().join(config).join("tiled_decode.safetensors"))["latents"];
        for channels_last in [false, true] {
            let placement = Placement::cpu().with_layout(WeightLayout {
                channels_last,
                fused_projections: false,
            });
            let pipe = SdxlPipeline::load(&dir, placement).expect("load");
            let vae = pipe.vae();
            let z = vae.unscale_latents(latents);
            let whole = tch::no_grad(|| vae.decode(&z));
            let height = whole.size()[2];
            // Bands of one row, uneven bands, and bands that leave only the top level whole.
            for rows in [1, 5, 16, height / 2 + 3, height - 1] {
                let banded = tch::no_grad(|| vae.decode_in_bands(&z, Some(rows)));
                assert_close(
                    &format!("{config} channels_last={channels_last} bands of {rows} rows"),
                    &banded,
                    &whole,
                );
                assert!(
                    !banded.equal(&whole) || rows >= height,
                    "{config}: bands of {rows} rows ran as the whole"
                );
            }
            // Two samples, each normalised with its own statistics.
            let pair = tch::Tensor::cat(&[&z, &z.flip([3])], 0);
            assert_close(
                &format!("{config} channels_last={channels_last} two samples in bands"),
                &tch::no_grad(|| vae.decode_in_bands(&pair, Some(5))),
                &tch::no_grad(|| vae.decode(&pair)),
            );
            // Through the codec, as the engine decodes, tiled too.
            let banded = SdxlPipeline::load(&dir, placement.with_vae_band_rows(7)).expect("load");
            for tiled in [false, true] {
                let image = |p: &SdxlPipeline| {
                    p.vae_codec()
                        .decode_with(&latents.get(0), tiled, &mut || Ok(()))
                        .expect("decode")
                        .image
                };
                assert_images_match(
                    &format!("{config} codec in bands, tiled={tiled}"),
                    &image(&banded),
                    &image(&pipe),
                );
            }
        }
    }
}
