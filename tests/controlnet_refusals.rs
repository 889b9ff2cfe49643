//! Bad ControlNet units are refused by field (INVALID_ARGUMENT) or by model (NOT_FOUND,
//! FAILED_PRECONDITION) before admission, and leave nothing behind: the next plain
//! request gives the same bytes as before them.

use crate::common;
use crate::controlnet_service::{case, controlnet_root, read, server, spec_of};

use common::controlnet_fixtures;
use common::server::violated_fields;
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_units_are_refused_and_leave_nothing_behind() {
    let root = controlnet_root();
    let server = server(root.path()).await;
    let mut plain = spec_of(&case("one_unit"));
    plain.controlnets.clear();
    plain.num_images = 1;
    plain.output = Some(pb::OutputOptions {
        embed_metadata: Some(false),
        ..Default::default()
    });
    let before = server.images(plain.clone()).await.expect("plain");
    let with_unit = |model: &str, image: Vec<u8>| {
        let mut spec = spec_of(&case("one_unit"));
        spec.controlnets[0].model = model.into();
        spec.controlnets[0].image = image;
        spec
    };
    let map = read(&controlnet_fixtures().join("tiny2/control_a.png"));

    let status = server
        .images(with_unit("no_such_cn", map.clone()))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["model"], "no_such_cn");

    for (model, why) in [
        ("wide_xl", "block_out_channels"),
        ("sd15_canny", "cross_attention_dim"),
    ] {
        let status = server
            .images(with_unit(model, map.clone()))
            .await
            .expect_err(model);
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{model}: {status:?}"
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INCOMPATIBLE_MODELS", "{model}");
        let message = status.message();
        assert!(
            message.contains(model) && message.contains("pipeline"),
            "{message}"
        );
        assert!(message.contains(why), "{model}: {message}");
        assert!(message.contains("spec.controlnets[0].model"), "{message}");
    }

    let mut huge = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(600, 500)
        .write_to(&mut huge, image::ImageFormat::Png)
        .expect("png");
    let status = server
        .images(with_unit("canny_xl", huge.into_inner()))
        .await
        .expect_err("huge");
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = violated_fields(&status);
    assert_eq!(fields, ["spec.controlnets[0].image"]);

    let mut bad_modes = with_unit("canny_xl", map);
    bad_modes.controlnets[0].resize_mode = 9;
    bad_modes.controlnets[0].control_mode = -1;
    let status = server.images(bad_modes).await.expect_err("modes");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        [
            "spec.controlnets[0].control_mode",
            "spec.controlnets[0].resize_mode"
        ]
    );

    // Union fields: on a plain ControlNet, missing on a union model, beyond its types.
    let cases = [
        ("canny_xl", 4, vec!["spec.controlnets[0].control_type"]),
        ("union_xl", 0, vec!["spec.controlnets[0].control_type"]),
        ("union6_xl", 7, vec!["spec.controlnets[0].control_type"]),
    ];
    for (model, control_type, expected) in cases {
        let map = read(&controlnet_fixtures().join("tiny2/control_a.png"));
        let mut spec = with_unit(model, map);
        spec.controlnets[0].control_type = control_type;
        let status = server.images(spec).await.expect_err(model);
        assert_eq!(status.code(), Code::InvalidArgument, "{model}: {status:?}");
        let fields = violated_fields(&status);
        assert_eq!(fields, expected, "{model}");
    }

    let after = server.images(plain).await.expect("plain again");
    assert_eq!(
        before.images[0].data, after.images[0].data,
        "a unit left a trace"
    );

    let listed = server.list_models(pb::ModelKind::Controlnet).await;
    let base_of = |name: &str| {
        listed
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.controlnet.as_ref())
            .map(|c| (c.base.clone(), c.union))
    };
    assert_eq!(base_of("canny_xl"), Some(("unknown".to_string(), false)));
    assert_eq!(base_of("sd15_canny"), Some(("sd1".to_string(), false)));
    assert_eq!(base_of("union_xl"), Some(("unknown".to_string(), true)));
    let types = |name: &str| {
        listed
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.controlnet.as_ref())
            .map(|c| c.control_types)
    };
    assert_eq!((types("union_xl"), types("union6_xl")), (Some(8), Some(6)));
    assert_eq!(listed.len(), 6);
}
