//! NaN and infinities are refused in every float field of the contract, each named with
//! the value sent, before admission, and the server serves on.

use crate::bad_requests::png;
use crate::common;

use common::server::{quick_spec, TestServer};
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

/// Every float field of the contract, set to `value` in an otherwise valid request.
fn float_fields(value: f32) -> Vec<(&'static str, pb::GenerationSpec)> {
    let base = quick_spec(1);
    let with = |f: &dyn Fn(&mut pb::GenerationSpec)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let refiner = |f: &dyn Fn(&mut pb::RefinerStage)| {
        let mut r = pb::RefinerStage::default();
        f(&mut r);
        Some(r)
    };
    let unit = |f: &dyn Fn(&mut pb::ControlNetUnit)| {
        let mut u = pb::ControlNetUnit {
            model: "canny".into(),
            image: png(64, 64),
            ..Default::default()
        };
        f(&mut u);
        vec![u]
    };
    let init = |f: &dyn Fn(&mut pb::InitImage)| {
        let mut i = pb::InitImage {
            image: png(64, 64),
            ..Default::default()
        };
        f(&mut i);
        Some(i)
    };
    let guider = |f: &dyn Fn(&mut pb::Guider)| {
        let mut g = pb::Guider {
            kind: pb::GuiderKind::Apg as i32,
            ..Default::default()
        };
        f(&mut g);
        Some(g)
    };
    vec![
        (
            "spec.guidance_scale",
            with(&|s| s.guidance_scale = Some(value)),
        ),
        (
            "spec.sigmas",
            with(&|s| {
                s.scheduler = pb::Scheduler::Euler as i32;
                s.steps = 2;
                s.sigmas = vec![5.0, value, 0.0];
            }),
        ),
        (
            "spec.guider.start",
            with(&|s| s.guider = guider(&|g| g.start = Some(value))),
        ),
        (
            "spec.guider.stop",
            with(&|s| s.guider = guider(&|g| g.stop = Some(value))),
        ),
        (
            "spec.guider.momentum",
            with(&|s| s.guider = guider(&|g| g.momentum = Some(value))),
        ),
        (
            "spec.guider.norm_threshold",
            with(&|s| s.guider = guider(&|g| g.norm_threshold = Some(value))),
        ),
        (
            "spec.guider.eta",
            with(&|s| s.guider = guider(&|g| g.eta = Some(value))),
        ),
        (
            "spec.guidance_rescale",
            with(&|s| s.guidance_rescale = value),
        ),
        (
            "spec.micro_conditioning.aesthetic_score",
            with(&|s| {
                s.micro_conditioning = Some(pb::MicroConditioning {
                    aesthetic_score: Some(value),
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.micro_conditioning.negative_aesthetic_score",
            with(&|s| {
                s.micro_conditioning = Some(pb::MicroConditioning {
                    negative_aesthetic_score: Some(value),
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.scheduler_options.eta",
            with(&|s| {
                s.scheduler = pb::Scheduler::Ddim as i32;
                s.scheduler_options = Some(pb::SchedulerOptions {
                    eta: Some(value),
                    ..Default::default()
                });
            }),
        ),
        (
            "spec.refiner.high_noise_fraction",
            with(&|s| s.refiner = refiner(&|r| r.high_noise_fraction = Some(value))),
        ),
        (
            "spec.refiner.strength",
            with(&|s| s.refiner = refiner(&|r| r.strength = Some(value))),
        ),
        (
            "spec.refiner.guidance_scale",
            with(&|s| s.refiner = refiner(&|r| r.guidance_scale = Some(value))),
        ),
        (
            "spec.refiner.aesthetic_score",
            with(&|s| s.refiner = refiner(&|r| r.aesthetic_score = Some(value))),
        ),
        (
            "spec.refiner.negative_aesthetic_score",
            with(&|s| s.refiner = refiner(&|r| r.negative_aesthetic_score = Some(value))),
        ),
        (
            "spec.refiner.scheduler_options.eta",
            with(&|s| {
                s.refiner = refiner(&|r| {
                    r.scheduler = pb::Scheduler::Ddim as i32;
                    r.scheduler_options = Some(pb::SchedulerOptions {
                        eta: Some(value),
                        ..Default::default()
                    });
                })
            }),
        ),
        (
            "spec.loras[0].weight",
            with(&|s| {
                s.loras = vec![pb::LoraAdapter {
                    name: "style".into(),
                    weight: Some(value),
                    text_encoder_weight: None,
                }]
            }),
        ),
        (
            "spec.controlnets[0].conditioning_scale",
            with(&|s| s.controlnets = unit(&|u| u.conditioning_scale = Some(value))),
        ),
        (
            "spec.controlnets[0].guidance_start",
            with(&|s| s.controlnets = unit(&|u| u.guidance_start = value)),
        ),
        (
            "spec.controlnets[0].guidance_end",
            with(&|s| s.controlnets = unit(&|u| u.guidance_end = Some(value))),
        ),
        (
            "spec.init_image.strength",
            with(&|s| s.init_image = init(&|i| i.strength = Some(value))),
        ),
        (
            "spec.init_image.denoising_start",
            with(&|s| s.init_image = init(&|i| i.denoising_start = Some(value))),
        ),
    ]
}

#[tokio::test]
async fn nan_and_infinities_are_refused_in_every_float_field() {
    let server = TestServer::start(&[]).await;
    let mut client = server.generation().await;
    // At one step too, where a default standing in for a bad strength would leave no step:
    // the field is named for the value sent, not for the default.
    for (value, steps) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .into_iter()
        .flat_map(|value| [(value, 2), (value, 1)])
    {
        let fields = float_fields(value);
        assert_eq!(fields.len(), 23, "every float field of the contract");
        for (field, mut spec) in fields {
            spec.steps = steps;
            let status = client
                .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
                .await
                .expect_err(field);
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{field} = {value}: {status:?}"
            );
            let violations = status
                .get_details_bad_request()
                .unwrap_or_else(|| panic!("{field}: no BadRequest"))
                .field_violations;
            assert!(
                violations.iter().any(|v| v.field == field),
                "{field} = {value}: {violations:?}"
            );
            let sent = format!("got {value}");
            assert!(
                violations
                    .iter()
                    .filter(|v| v.field == field)
                    .all(|v| v.description.contains(&sent)),
                "{field} = {value}, {steps} steps: {violations:?}"
            );
        }
    }
    client
        .generate_images(pb::GenerateImagesRequest {
            spec: Some(quick_spec(5)),
        })
        .await
        .expect("the server still serves");
}
