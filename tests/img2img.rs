//! Image to image equals diffusers' StableDiffusionXLImg2ImgPipeline: latents and 8-bit
//! images at several strengths and schedulers (first- and second-order, stochastic with a
//! batch of two), on both tiny configurations, and over gRPC.

use crate::common;

use common::{assert_images_match, cases, fixtures, read_tensors, Case, CONFIGS};
use sdxld::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};

fn params(case: &Case, init: &[u8]) -> GenerateParams {
    let strength = case.float("strength");
    GenerateParams {
        init_image: Some(common::init_image(init, strength).expect("init image")),
        ..case.params()
    }
}

#[test]
fn img2img_matches_diffusers() {
    for config in CONFIGS {
        let dir = fixtures().join(config);
        let pipe = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
        let init = std::fs::read(dir.join("init.png")).expect("init.png");
        let reference = read_tensors(&dir.join("img2img.safetensors"));
        let cases = cases(config, "img2img");
        assert!(cases.len() >= 7);
        for case in cases {
            let name = case.name();
            let out = pipe
                .generate(&params(&case, &init))
                .unwrap_or_else(|e| panic!("{config} {name}: {e}"));
            let what = format!(
                "{config} {name} ({} strength {})",
                case["scheduler"], case["strength"]
            );
            common::assert_matches_case(&what, &out, &reference, name);
        }
    }
}

#[test]
fn strength_that_runs_no_step_is_refused() {
    let dir = fixtures().join("tiny2");
    let pipe = SdxlPipeline::load(&dir.join("pipeline"), Placement::cpu()).expect("load");
    let init = std::fs::read(dir.join("init.png")).expect("init.png");
    let p = GenerateParams {
        prompt: "x".into(),
        steps: 4,
        width: 64,
        height: 64,
        init_image: Some(common::init_image(&init, 0.1).expect("init")),
        ..GenerateParams::default()
    };
    let err = pipe.generate(&p).err().expect("refused");
    assert!(err.to_string().contains("strength"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_over_grpc_matches_diffusers() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;

    let dir = fixtures().join("tiny2");
    let pipeline = dir.join("pipeline");
    let server = TestServer::start(&[(
        "SDXLD__ENGINE__DEFAULT_MODEL",
        pipeline.to_str().expect("utf-8"),
    )])
    .await;
    let init = std::fs::read(dir.join("init.png")).expect("init.png");
    let reference = read_tensors(&dir.join("img2img.safetensors"));
    // Case 2: Euler ancestral, strength 0.5, 8 steps, two images (seeds 21, 22).
    let case = &cases("tiny2", "img2img")[2];
    assert_eq!(case["scheduler"], "EulerAncestralDiscreteScheduler");
    let spec = pb::GenerationSpec {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        seed: Some(21),
        steps: 8,
        num_images: 2,
        scheduler: pb::Scheduler::EulerAncestral as i32,
        init_image: Some(pb::InitImage {
            image: init,
            strength: Some(0.5),
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = server.images(spec).await.expect("img2img");
    assert_eq!(response.images.len(), 2);
    let expected = &reference["img2img_2.images"];
    for (i, image) in response.images.iter().enumerate() {
        assert_eq!((image.width, image.height), (64, 64));
        let got = common::decoded_image(&image.data);
        assert_images_match(
            &format!("gRPC img2img image {i}"),
            &got,
            &expected.get(i as i64),
        );
    }
}
