//! The Preprocess RPC over gRPC: OpenCV's Canny with its thresholds, the resampling,
//! blur and invert filters with their parameters, and the fields each refusal names.

use crate::common;

use common::server::TestServer;
use sdxld::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

fn request(image: Vec<u8>, preprocessor: pb::Preprocessor) -> pb::PreprocessRequest {
    pb::PreprocessRequest {
        image,
        preprocessor: preprocessor as i32,
        preprocessor_params: None,
        poses: None,
    }
}

fn fields(status: &tonic::Status) -> Vec<String> {
    let bad = status.get_details_bad_request().expect("BadRequest");
    bad.field_violations.into_iter().map(|f| f.field).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preprocess_rpc_returns_opencvs_canny_and_names_what_it_refuses() {
    let root = common::preprocess_fixtures();
    let server = TestServer::start(&[]).await;
    let png = std::fs::read(root.join("images/photo_160x120.png")).expect("read");
    for (low, high) in [(100, 200), (10, 30)] {
        let mut canny = request(png.clone(), pb::Preprocessor::Canny);
        canny.preprocessor_params = Some(pb::PreprocessorParams {
            low_threshold: Some(low),
            high_threshold: Some(high),
            ..Default::default()
        });
        let map = server.preprocess(canny).await.expect("a control map");
        assert_eq!((map.width, map.height), (160, 120));
        let map = image::load_from_memory(&map.control_map)
            .expect("png")
            .to_rgb8();
        let expected = image::open(root.join(format!("canny/photo_160x120_{low}_{high}.png")))
            .expect("png")
            .to_rgb8();
        assert_eq!(map, expected, "thresholds {low} {high}");
    }
    // At a detection resolution: controlnet_aux's resize_image first; the map at that
    // size. Without a preprocessor the resolution changes nothing.
    let at = |preprocessor| pb::PreprocessRequest {
        preprocessor_params: Some(pb::PreprocessorParams {
            detect_resolution: 64,
            ..Default::default()
        }),
        ..request(png.clone(), preprocessor)
    };
    let map = server
        .preprocess(at(pb::Preprocessor::Canny))
        .await
        .expect("a control map");
    assert_eq!((map.width, map.height), (64, 64));
    let expected = image::open(root.join("detect/photo_160x120_64_canny.png"))
        .expect("png")
        .to_rgb8();
    let decoded = image::load_from_memory(&map.control_map).expect("png");
    assert_eq!(decoded.to_rgb8(), expected);
    let plain = server
        .preprocess(at(pb::Preprocessor::None))
        .await
        .expect("the image");
    assert_eq!((plain.width, plain.height), (160, 120));
    // No preprocessing: the image itself.
    let plain = server
        .preprocess(request(png.clone(), pb::Preprocessor::None))
        .await
        .expect("the image");
    let original = image::load_from_memory(&png).expect("png").to_rgb8();
    assert_eq!(
        image::load_from_memory(&plain.control_map)
            .expect("png")
            .to_rgb8(),
        original
    );

    // A column 9 pixels tall at 2048: 2048x18432 for detection, over the image limit.
    let column = std::fs::read(root.join("images/column_1x9.png")).expect("read");
    let invalid = [
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    detect_resolution: 2048,
                    ..Default::default()
                }),
                ..request(column, pb::Preprocessor::Canny)
            },
            "preprocessor_params.detect_resolution",
        ),
        (request(Vec::new(), pb::Preprocessor::Canny), "image"),
        (
            request(b"not an image".to_vec(), pb::Preprocessor::Canny),
            "image",
        ),
        (
            pb::PreprocessRequest {
                preprocessor: 99,
                ..request(png.clone(), pb::Preprocessor::Canny)
            },
            "preprocessor",
        ),
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    low_threshold: Some(201),
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::Canny)
            },
            "preprocessor_params.low_threshold",
        ),
        // A high threshold alone, below the default low one: the field sent is named.
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    high_threshold: Some(40),
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::Canny)
            },
            "preprocessor_params.high_threshold",
        ),
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    high_threshold: Some(256),
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::Canny)
            },
            "preprocessor_params.high_threshold",
        ),
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    detect_resolution: 32,
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::Canny)
            },
            "preprocessor_params.detect_resolution",
        ),
        // Each preprocessor's own parameters are refused on another, where they
        // would change nothing.
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    high_threshold: Some(150),
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::LineartStandard)
            },
            "preprocessor_params.high_threshold",
        ),
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    low_threshold: Some(50),
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::None)
            },
            "preprocessor_params.low_threshold",
        ),
        (
            pb::PreprocessRequest {
                preprocessor_params: Some(pb::PreprocessorParams {
                    mlsd_distance_threshold: Some(1.0),
                    ..Default::default()
                }),
                ..request(png.clone(), pb::Preprocessor::Canny)
            },
            "preprocessor_params.mlsd_distance_threshold",
        ),
    ];
    for (request, field) in invalid {
        let status = server.preprocess(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(fields(&status), [field], "{status:?}");
    }
    let capabilities = server.capabilities().await;
    assert_eq!(
        capabilities.preprocessors,
        [
            pb::Preprocessor::None as i32,
            pb::Preprocessor::Canny as i32,
            pb::Preprocessor::Depth as i32,
            pb::Preprocessor::Openpose as i32,
            pb::Preprocessor::Scribble as i32,
            pb::Preprocessor::Normal as i32,
            pb::Preprocessor::Segmentation as i32,
            pb::Preprocessor::Lineart as i32,
            pb::Preprocessor::LineartAnime as i32,
            pb::Preprocessor::Softedge as i32,
            pb::Preprocessor::Mlsd as i32,
            pb::Preprocessor::LineartStandard as i32,
            pb::Preprocessor::Anyline as i32,
            pb::Preprocessor::TileResample as i32,
            pb::Preprocessor::Blur as i32,
            pb::Preprocessor::Invert as i32,
            pb::Preprocessor::OpenposeFace as i32,
            pb::Preprocessor::OpenposeFaceonly as i32,
            pb::Preprocessor::OpenposeHand as i32,
            pb::Preprocessor::OpenposeFull as i32,
            pb::Preprocessor::RecolorLuminance as i32,
            pb::Preprocessor::RecolorIntensity as i32,
            pb::Preprocessor::ScribbleXdog as i32,
            pb::Preprocessor::Sketch as i32,
        ]
    );
    // No detectors here: the network preprocessors are listed, not ready.
    let ready: Vec<bool> = capabilities
        .preprocessor_support
        .iter()
        .map(|s| s.ready)
        .collect();
    assert_eq!(
        ready,
        [
            true, true, false, false, false, false, false, false, false, false, false, true, false,
            true, true, true, false, false, false, false, true, true, true, false
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preprocess_rpc_draws_standard_line_art_and_takes_no_detector() {
    let root = common::preprocess_fixtures();
    let server = TestServer::start(&[]).await;
    for (name, resolution) in [("drawing_97x61", 0), ("photo_384x256", 128)] {
        let png = std::fs::read(root.join(format!("images/{name}.png"))).expect("read");
        let standard = pb::PreprocessRequest {
            preprocessor_params: Some(pb::PreprocessorParams {
                detect_resolution: resolution,
                ..Default::default()
            }),
            ..request(png, pb::Preprocessor::LineartStandard)
        };
        let map = server.preprocess(standard).await.expect("a line map");
        let expected = root.join(format!("lineart_standard/{name}_{resolution}.png"));
        let expected = image::open(expected).expect("png").to_rgb8();
        assert_eq!((map.width, map.height), expected.dimensions());
        let map = image::load_from_memory(&map.control_map).expect("png");
        assert_eq!(map.to_rgb8(), expected, "{name} at {resolution}");
    }
    let png = std::fs::read(root.join("images/drawing_128x96.png")).expect("read");
    let with_model = pb::PreprocessRequest {
        preprocessor_params: Some(pb::PreprocessorParams {
            model: "sk_model".into(),
            ..Default::default()
        }),
        ..request(png, pb::Preprocessor::LineartStandard)
    };
    let status = server
        .preprocess(with_model)
        .await
        .expect_err("no detector");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(fields(&status), ["preprocessor_params.model"]);
}

/// A request for a filter preprocessor with its parameters.
fn filter(
    png: &[u8],
    preprocessor: pb::Preprocessor,
    params: pb::PreprocessorParams,
) -> pb::PreprocessRequest {
    pb::PreprocessRequest {
        preprocessor_params: Some(params),
        ..request(png.to_vec(), preprocessor)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preprocess_rpc_resamples_blurs_and_inverts_and_names_bad_parameters() {
    let root = common::preprocess_fixtures();
    let server = TestServer::start(&[]).await;
    let read = |name: &str| std::fs::read(root.join(format!("images/{name}.png"))).expect("read");
    let cases = [
        (
            "photo_75x133",
            pb::Preprocessor::TileResample,
            Some(3.3),
            None,
            "tile_resample_3.299999952316284_0",
        ),
        (
            "photo_384x256",
            pb::Preprocessor::TileResample,
            Some(3.0),
            None,
            "tile_resample_3.0_128",
        ),
        (
            "photo_160x120",
            pb::Preprocessor::TileResample,
            None,
            None,
            "tile_resample_1.0_0",
        ),
        (
            "photo_160x120",
            pb::Preprocessor::Blur,
            None,
            None,
            "blur_gaussian_9.0_0",
        ),
        // The slider's least sigma, sent as a float32 (0.00999999977...).
        (
            "photo_160x120",
            pb::Preprocessor::Blur,
            None,
            Some(0.01),
            "blur_gaussian_0.009999999776482582_0",
        ),
        (
            "noise_33x17",
            pb::Preprocessor::Blur,
            None,
            Some(4.7),
            "blur_gaussian_4.699999809265137_0",
        ),
        (
            "rgba_64x48",
            pb::Preprocessor::Invert,
            None,
            None,
            "invert_0.0_0",
        ),
    ];
    for (name, preprocessor, rate, sigma, case) in cases {
        let resolution = if case.ends_with("_128") { 128 } else { 0 };
        let params = pb::PreprocessorParams {
            down_sampling_rate: rate,
            blur_sigma: sigma,
            detect_resolution: resolution,
            ..Default::default()
        };
        let map = server
            .preprocess(filter(&read(name), preprocessor, params))
            .await
            .expect(case);
        let expected = root.join(format!("filters/{name}_{case}.png"));
        let expected = image::open(expected).expect("png").to_rgb8();
        assert_eq!((map.width, map.height), expected.dimensions(), "{case}");
        let map = image::load_from_memory(&map.control_map).expect("png");
        assert_eq!(map.to_rgb8(), expected, "{name} {case}");
    }
    let rate = |rate: f32| pb::PreprocessorParams {
        down_sampling_rate: Some(rate),
        ..Default::default()
    };
    let sigma = |sigma: f32| pb::PreprocessorParams {
        blur_sigma: Some(sigma),
        ..Default::default()
    };
    let tile = pb::Preprocessor::TileResample;
    let photo = read("photo_160x120");
    let invalid = [
        (
            filter(&photo, tile, rate(f32::NAN)),
            "down_sampling_rate",
            "NaN",
        ),
        (filter(&photo, tile, rate(0.5)), "down_sampling_rate", "0.5"),
        (filter(&photo, tile, rate(8.5)), "down_sampling_rate", "8.5"),
        (
            filter(&read("tiny_3x2"), tile, rate(2.5)),
            "down_sampling_rate",
            "3x2 image to 1x0",
        ),
        (
            filter(&photo, pb::Preprocessor::Blur, sigma(0.0)),
            "blur_sigma",
            "0",
        ),
        (
            filter(&photo, pb::Preprocessor::Blur, sigma(0.009_999)),
            "blur_sigma",
            "got 0.009999",
        ),
        (
            filter(&photo, pb::Preprocessor::Blur, sigma(f32::INFINITY)),
            "blur_sigma",
            "inf",
        ),
        (
            filter(&photo, pb::Preprocessor::Blur, rate(2.0)),
            "down_sampling_rate",
            "PREPROCESSOR_TILE_RESAMPLE only",
        ),
        (
            filter(&photo, pb::Preprocessor::Canny, sigma(2.0)),
            "blur_sigma",
            "PREPROCESSOR_BLUR only",
        ),
        (
            filter(&photo, pb::Preprocessor::Invert, sigma(2.0)),
            "blur_sigma",
            "PREPROCESSOR_BLUR only",
        ),
        (
            filter(
                &photo,
                pb::Preprocessor::Invert,
                pb::PreprocessorParams {
                    model: "sk_model".into(),
                    ..Default::default()
                },
            ),
            "model",
            "runs none",
        ),
    ];
    for (request, field, says) in invalid {
        let status = server.preprocess(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let field = format!("preprocessor_params.{field}");
        assert_eq!(fields(&status), std::slice::from_ref(&field), "{status:?}");
        let bad = status.get_details_bad_request().expect("BadRequest");
        let description = &bad.field_violations[0].description;
        assert!(description.contains(says), "{field}: {description}");
    }
    // The server serves on.
    let map = server
        .preprocess(filter(&photo, tile, rate(2.0)))
        .await
        .expect("a map");
    assert_eq!((map.width, map.height), (80, 60));
}
