//! Bad hires passes are refused before admission naming the field (INVALID_ARGUMENT),
//! an unknown upscaler is NOT_FOUND, a hires pass after inpainting UNIMPLEMENTED, and a
//! default pass then runs.

use crate::common;
use crate::hires::{listed_upscaler, server};

use common::server::violated_fields;
use sdxld::proto::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hires_passes_are_refused_naming_the_field() {
    let server = server().await;
    let mut client = server.generation().await;
    let quick = |hires: pb::HiresPass| pb::GenerationSpec {
        prompt: "a field".into(),
        width: 64,
        height: 64,
        steps: 2,
        seed: Some(1),
        hires: Some(hires),
        ..Default::default()
    };
    let invalid = [
        (
            pb::HiresPass {
                scale: Some(4.5),
                ..Default::default()
            },
            "spec.hires.scale",
        ),
        (
            pb::HiresPass {
                scale: Some(f32::NAN),
                ..Default::default()
            },
            "spec.hires.scale",
        ),
        (
            pb::HiresPass {
                width: 128,
                ..Default::default()
            },
            "spec.hires.width",
        ),
        (
            pb::HiresPass {
                width: 100,
                height: 128,
                ..Default::default()
            },
            "spec.hires.width",
        ),
        (
            pb::HiresPass {
                width: 128,
                height: 56,
                ..Default::default()
            },
            "spec.hires.height",
        ),
        (
            pb::HiresPass {
                strength: Some(0.0),
                ..Default::default()
            },
            "spec.hires.strength",
        ),
        (
            pb::HiresPass {
                steps: 2,
                strength: Some(0.2),
                ..Default::default()
            },
            "spec.hires.strength",
        ),
        (
            pb::HiresPass {
                guidance_scale: Some(f32::INFINITY),
                ..Default::default()
            },
            "spec.hires.guidance_scale",
        ),
        (
            pb::HiresPass {
                latent_upscale: pb::LatentUpscale::Nearest as i32,
                upscaler: "hires_rrdb_x2".into(),
                ..Default::default()
            },
            "spec.hires.upscaler",
        ),
        (
            pb::HiresPass {
                latent_upscale: 99,
                ..Default::default()
            },
            "spec.hires.latent_upscale",
        ),
        (
            pb::HiresPass {
                scheduler_options: Some(pb::SchedulerOptions::default()),
                ..Default::default()
            },
            "spec.hires.scheduler_options",
        ),
        (
            pb::HiresPass {
                steps: 100_000,
                ..Default::default()
            },
            "spec.hires.steps",
        ),
        (
            pb::HiresPass {
                upscaler: "hires_rrdb_x2".into(),
                tile_size: 16,
                ..Default::default()
            },
            "spec.hires.tile_size",
        ),
    ];
    for (hires, field) in invalid {
        let request = pb::GenerateImagesRequest {
            spec: Some(quick(hires.clone())),
        };
        let status = client
            .generate_images(request)
            .await
            .expect_err(&format!("{hires:?} is refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{hires:?}");
        assert_eq!(
            violated_fields(&status),
            vec![field.to_string()],
            "{hires:?}"
        );
    }
    // A final size over the limits, from the scale.
    let mut big = quick(pb::HiresPass {
        scale: Some(4.0),
        ..Default::default()
    });
    big.width = 1024;
    big.height = 1024;
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(big) })
        .await
        .expect_err("4096 pixels wide is refused");
    assert_eq!(
        violated_fields(&status),
        vec!["spec.hires.scale".to_string()]
    );
    // An unknown upscaler; a hires pass after inpainting.
    let unknown = quick(pb::HiresPass {
        upscaler: "no_such_upscaler".into(),
        ..Default::default()
    });
    let status = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(unknown),
        })
        .await
        .expect_err("unknown upscaler");
    assert_eq!(status.code(), Code::NotFound);
    let mut png = Vec::new();
    image::RgbImage::new(64, 64)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    let mut after_inpainting = quick(pb::HiresPass::default());
    after_inpainting.init_image = Some(pb::InitImage {
        image: png.clone(),
        strength: Some(0.5),
        mask: png,
        ..Default::default()
    });
    let status = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(after_inpainting),
        })
        .await
        .expect_err("inpainting with hires");
    assert_eq!(status.code(), Code::Unimplemented);
    // The server serves on: the default pass (scale 2, bilinear latents, strength 0.7).
    let done = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick(pb::HiresPass::default())),
        })
        .await
        .expect("a default hires pass")
        .into_inner();
    assert_eq!(
        done.images
            .iter()
            .map(|i| (i.width, i.height))
            .collect::<Vec<_>>(),
        vec![(128, 128)]
    );
    // Latents output comes at the final size; post-processing follows the second pass.
    let mut latents = quick(pb::HiresPass::default());
    latents.output = Some(pb::OutputOptions {
        format: pb::ImageFormat::LatentsSafetensors as i32,
        ..Default::default()
    });
    let done = client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(latents),
        })
        .await
        .expect("latents")
        .into_inner();
    let image = &done.images[0];
    assert_eq!((image.width, image.height), (128, 128));
    let tensors = safetensors::SafeTensors::deserialize(&image.data).expect("safetensors");
    let shape = tensors.tensor("latents").expect("latents").shape().to_vec();
    assert_eq!(shape, [1, 4, 16, 16], "tiny2's VAE scale factor is 8");
    let upscaler = listed_upscaler(&server, "hires_compact_x4").await;
    let mut post = quick(pb::HiresPass {
        scale: Some(1.5),
        ..Default::default()
    });
    post.post_processing = vec![pb::PostProcessStep {
        step: Some(pb::post_process_step::Step::Upscale(pb::UpscaleStep {
            model: upscaler,
            factor: 2,
            ..Default::default()
        })),
    }];
    let done = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(post) })
        .await
        .expect("hires then post-processing")
        .into_inner();
    assert_eq!(
        (done.images[0].width, done.images[0].height),
        (192, 192),
        "96 after the hires pass, then x2"
    );
}
