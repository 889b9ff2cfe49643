//! A missing default detector, a file of another network, a corrupt file and an unknown
//! name are each refused naming the key, field or file, and the server serves on.

use crate::common;
use crate::detector_service::{controlnet_root, detector_root, photo, request, server, ZOE_MODEL};

use common::detector_fixtures;
use common::server::{error_reason, violated_fields};
use sdxld::proto::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_wrong_and_corrupt_detectors_are_refused_by_name() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let empty = tempfile::tempdir().expect("tempdir");
    // No detectors at all: the defaults are missing.
    let bare = server(empty.path(), controlnets.path(), &[]).await;
    let status = bare
        .preprocess(request(pb::Preprocessor::Lineart, ""))
        .await
        .expect_err("no detector");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (why, metadata) = error_reason(&status);
    assert_eq!(why, "PREPROCESSOR_MODEL_MISSING");
    assert_eq!(metadata["config_key"], "preprocessing.lineart_model");
    assert_eq!(metadata["expected_file"], "sk_model.safetensors");
    assert!(
        status.message().contains("sk_model.safetensors"),
        "{}",
        status.message()
    );
    // A unit of a generation says the same before it is admitted.
    let unit_spec = pb::GenerationSpec {
        steps: 2,
        width: 64,
        height: 64,
        controlnets: vec![pb::ControlNetUnit {
            model: "lines_xl".into(),
            image: photo(),
            preprocessor: pb::Preprocessor::LineartAnime as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = bare.images(unit_spec).await.expect_err("no detector");
    assert_eq!(error_reason(&status).0, "PREPROCESSOR_MODEL_MISSING");
    assert_eq!(
        error_reason(&status).1["config_key"],
        "preprocessing.lineart_anime_model"
    );
    let support = bare.capabilities().await.preprocessor_support;
    let lineart = support
        .iter()
        .find(|s| s.preprocessor == pb::Preprocessor::Lineart as i32)
        .expect("lineart listed");
    assert!(!lineart.ready && lineart.config_key == "preprocessing.lineart_model");
    let status = bare
        .preprocess(request(pb::Preprocessor::Depth, ""))
        .await
        .expect_err("no depth model");
    let (why, metadata) = error_reason(&status);
    assert_eq!(why, "PREPROCESSOR_MODEL_MISSING");
    assert_eq!(metadata["config_key"], "preprocessing.depth_model");
    assert!(
        metadata["expected_file"].contains("Depth-Anything-V2-Small-hf/ with config.json"),
        "{metadata:?}"
    );
    assert!(
        lineart.reason.contains("sk_model.safetensors"),
        "{}",
        lineart.reason
    );

    // The default names an anime U-Net for line art; requests name wrong, broken and
    // unknown files.
    let server = server(
        detectors.path(),
        controlnets.path(),
        &[("SDXLD__PREPROCESSING__LINEART_MODEL", "anime")],
    )
    .await;
    let status = server
        .preprocess(request(pb::Preprocessor::Lineart, ""))
        .await
        .expect_err("wrong default");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&status).0, "PREPROCESSOR_MODEL_MISMATCH");
    assert!(
        status.message().contains("lineart_anime"),
        "{}",
        status.message()
    );
    let status = server
        .preprocess(request(pb::Preprocessor::LineartAnime, "sk_model"))
        .await
        .expect_err("wrong file");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["preprocessor_params.model"]);
    let status = server
        .preprocess(request(pb::Preprocessor::Lineart, "broken"))
        .await
        .expect_err("broken file");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("broken"), "{}", status.message());
    assert!(
        !status
            .message()
            .contains(&*detectors.path().to_string_lossy()),
        "no server path"
    );
    let status = server
        .preprocess(request(pb::Preprocessor::Lineart, "nowhere"))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    let status = server
        .preprocess(request(pb::Preprocessor::Canny, "sk_model"))
        .await
        .expect_err("canny runs no network");
    assert_eq!(violated_fields(&status), ["preprocessor_params.model"]);
    // Normals need sides that are multiples of 8: a 50×34 image at its own size is
    // refused before admission; with a detect resolution it runs.
    let odd = std::fs::read(detector_fixtures().join("images/photo_odd.png")).expect("odd");
    let mut normal = request(pb::Preprocessor::Normal, "");
    normal.image = odd;
    if let Some(params) = normal.preprocessor_params.as_mut() {
        params.detect_resolution = 0;
    }
    let status = server
        .preprocess(normal.clone())
        .await
        .expect_err("odd sides");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["preprocessor_params.detect_resolution"]
    );
    if let Some(params) = normal.preprocessor_params.as_mut() {
        params.detect_resolution = 64;
    }
    let map = server.preprocess(normal).await.expect("normals at 64");
    assert_eq!((map.width, map.height), (64, 64));
    // A strip ZoeDepth's processor would shrink to no row is refused before admission.
    let mut strip = request(pb::Preprocessor::Depth, ZOE_MODEL);
    strip.image = common::edges::black_png(2000, 6);
    if let Some(params) = strip.preprocessor_params.as_mut() {
        params.detect_resolution = 0;
    }
    let status = server.preprocess(strip).await.expect_err("a strip");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["preprocessor_params.detect_resolution"]
    );
    assert!(
        status.message().contains("aspect ratio"),
        "{}",
        status.message()
    );
    // The server serves on, the anime default included.
    server
        .preprocess(request(pb::Preprocessor::LineartAnime, ""))
        .await
        .expect("the anime default");
    server
        .images(common::server::quick_spec(1))
        .await
        .expect("a generation");
}
