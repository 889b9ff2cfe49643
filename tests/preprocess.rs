//! Preprocessors against the implementations users know: Canny equals OpenCV's
//! `cv2.Canny` byte for byte on the image controlnet_aux hands it, at the image's size
//! and after controlnet_aux's `resize_image` to a detection resolution.

use crate::common;

use sdxld::engine::preprocess::{
    canny::canny, hwc3, resize_for_detection, Networks, Preprocessing, Preprocessor,
};

/// Pixels of `actual` that differ from `expected` (sizes equal).
fn differing(actual: &[u8], expected: &[u8]) -> usize {
    actual.iter().zip(expected).filter(|(a, e)| a != e).count()
}

/// A resize case of the fixtures' `{name}.json`: the case, its input image through
/// `HWC3`, the size asked for and OpenCV's result.
fn resize_cases(
    name: &str,
) -> Vec<(
    serde_json::Value,
    image::RgbImage,
    (u32, u32),
    image::RgbImage,
)> {
    let root = common::preprocess_fixtures();
    let path = root.join(format!("{name}.json"));
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    assert_eq!(cases.len(), 20);
    cases
        .into_iter()
        .map(|case| {
            let open =
                |key: &str| image::open(root.join(case[key].as_str().expect("path"))).expect("png");
            let (image, expected) = (hwc3(&open("image")), open("expected").to_rgb8());
            let side = |key: &str| case[key].as_u64().expect("side") as u32;
            let size = (side("width"), side("height"));
            (case, image, size, expected)
        })
        .collect()
}

#[test]
fn bicubic_resizing_equals_opencv_within_a_level() {
    use sdxld::engine::preprocess::cv_resize::{resize, resize_plane_cubic, Interpolation};
    let (mut off, mut total) = (0, 0);
    for (case, image, (w, h), expected) in resize_cases("cubic") {
        let got = resize(&image, w, h, Interpolation::Cubic);
        assert_eq!(got.dimensions(), expected.dimensions(), "{case}");
        for (g, e) in got.as_raw().iter().zip(expected.as_raw()) {
            assert!(g.abs_diff(*e) <= 1, "{case}: {g} against {e}");
            off += usize::from(g != e);
        }
        total += got.as_raw().len();
    }
    // IPP's float32 sums differ from these in the last bit now and then.
    assert!(off * 10_000 <= total, "{off} of {total} values differ");
    assert_planes("cubic_float", 4, resize_plane_cubic, 1e-3);
}

/// A resize of one-channel float planes: (plane, its (width, height), width, height).
type PlaneResize = fn(&[f32], (usize, usize), usize, usize) -> Vec<f32>;

/// Asserts `resize` turns each input plane of the fixtures' `{file}.safetensors` into its
/// output within `tolerance`.
fn assert_planes(file: &str, count: usize, resize: PlaneResize, tolerance: f32) {
    let path = common::preprocess_fixtures().join(format!("{file}.safetensors"));
    let planes = common::read_tensors(&path);
    for k in 0..count {
        let input = &planes[&format!("input.{k}")];
        let expected = &planes[&format!("output.{k}")];
        let (h, w) = (input.size()[0] as usize, input.size()[1] as usize);
        let (dh, dw) = (expected.size()[0] as usize, expected.size()[1] as usize);
        let values = Vec::<f32>::try_from(input.contiguous().view(-1)).expect("floats");
        let got = resize(&values, (w, h), dw, dh);
        let want = Vec::<f32>::try_from(expected.contiguous().view(-1)).expect("floats");
        let most = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(
            most < tolerance,
            "{file} {k} ({w}x{h} to {dw}x{dh}): differs by {most}"
        );
    }
}

#[test]
fn float_lanczos_and_area_resizing_equal_opencv_bit_for_bit() {
    use sdxld::engine::preprocess::cv_plane::{resize_plane_area, resize_plane_lanczos4};
    assert_planes("lanczos_float", 6, resize_plane_lanczos4, f32::MIN_POSITIVE);
    assert_planes("area_float", 5, resize_plane_area, f32::MIN_POSITIVE);
}

#[test]
fn float_bilinear_resizing_equals_opencv() {
    use sdxld::engine::preprocess::cv_resize::resize_plane_linear;
    assert_planes("linear_float", 5, resize_plane_linear, 1e-5);
}

#[test]
fn bilinear_resizing_equals_opencv() {
    use sdxld::engine::preprocess::cv_resize::{resize, Interpolation};
    for (case, image, (w, h), expected) in resize_cases("linear") {
        let got = resize(&image, w, h, Interpolation::Linear);
        assert_eq!(got.dimensions(), expected.dimensions(), "{case}");
        let off = differing(got.as_raw(), expected.as_raw());
        assert_eq!(off, 0, "{case}: {off} values differ");
    }
}

#[test]
fn detection_resizing_equals_controlnet_aux_with_opencv() {
    let root = common::preprocess_fixtures();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("detect.json")).expect("read"))
            .expect("json");
    assert!(cases.len() >= 15, "{} cases", cases.len());
    let open = |key: &str, case: &serde_json::Value| {
        image::open(root.join(case[key].as_str().expect(key))).expect("png")
    };
    for case in &cases {
        let image = open("image", case);
        let resolution = case["resolution"].as_u64().expect("resolution") as u32;
        let expected = open("resized", case).to_rgb8();
        let resized = resize_for_detection(&hwc3(&image), resolution);
        assert_eq!(resized.dimensions(), expected.dimensions(), "{case}");
        let off = differing(resized.as_raw(), expected.as_raw());
        assert_eq!(off, 0, "{case}: {off} values differ");
        // The unit's whole preprocessing: the map at the detection size.
        let canny = Preprocessing {
            preprocessor: Preprocessor::Canny {
                low: 100,
                high: 200,
            },
            detect_resolution: Some(resolution),
        };
        let map = canny.run(&image, Networks::default()).expect("canny");
        let expected = open("canny", case).to_rgb8();
        let off = differing(map.as_raw(), expected.as_raw());
        assert_eq!(off, 0, "{case}: {off} map values differ");
    }
}

#[test]
fn canny_equals_opencv_on_every_image_and_threshold() {
    let root = common::preprocess_fixtures();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("canny.json")).expect("read"))
            .expect("json");
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut edges_seen = 0;
    for case in &cases {
        let image = image::open(root.join(case["image"].as_str().expect("image"))).expect("png");
        let expected = image::open(root.join(case["expected"].as_str().expect("expected")))
            .expect("png")
            .to_luma8();
        let (low, high) = (
            case["low"].as_u64().expect("low"),
            case["high"].as_u64().expect("high"),
        );
        let actual = canny(&hwc3(&image), low as u32, high as u32);
        assert_eq!(actual.dimensions(), expected.dimensions(), "{case}");
        let differing = actual
            .iter()
            .zip(expected.iter())
            .filter(|(a, e)| a != e)
            .count();
        assert_eq!(differing, 0, "{case}: {differing} pixels differ");
        edges_seen += usize::from(expected.contains(&255));
    }
    // The cases exercise edges, not only empty maps.
    assert!(
        edges_seen * 2 > cases.len(),
        "{edges_seen} of {} cases have edges",
        cases.len()
    );
}

#[test]
fn float_gaussian_blur_equals_opencv_bit_for_bit() {
    use sdxld::engine::preprocess::cv_blur::blur_f32;
    let path = common::preprocess_fixtures().join("gaussian_float.safetensors");
    let tensors = common::read_tensors(&path);
    for k in 0..9 {
        let input = &tensors[&format!("input.{k}")];
        let (h, w, c) = (
            input.size()[0] as usize,
            input.size()[1] as usize,
            input.size()[2] as usize,
        );
        let sigma = tensors[&format!("sigma.{k}")].double_value(&[0]);
        let values = Vec::<f32>::try_from(input.contiguous().view(-1)).expect("floats");
        let expected = &tensors[&format!("output.{k}")];
        let want = Vec::<f32>::try_from(expected.contiguous().view(-1)).expect("floats");
        let got = blur_f32(&values, (w, h), c, sigma);
        let off = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(off, 0, "{w}x{h}x{c} at sigma {sigma}: {off} values differ");
    }
}

#[test]
fn standard_line_art_equals_controlnet_aux_pixel_for_pixel() {
    let root = common::preprocess_fixtures();
    let path = root.join("lineart_standard.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    assert_eq!(cases.len(), 12);
    let mut with_lines = 0;
    for case in &cases {
        let open = |key: &str| image::open(root.join(case[key].as_str().expect(key))).expect("png");
        let resolution = case["resolution"].as_u64().expect("resolution") as u32;
        let standard = Preprocessing {
            preprocessor: Preprocessor::LineartStandard,
            detect_resolution: (resolution > 0).then_some(resolution),
        };
        let map = standard
            .run(&open("image"), Networks::default())
            .expect("a line map");
        let expected = open("expected").to_rgb8();
        assert_eq!(map.dimensions(), expected.dimensions(), "{case}");
        let off = differing(map.as_raw(), expected.as_raw());
        assert_eq!(off, 0, "{case}: {off} values differ");
        with_lines += usize::from(expected.iter().filter(|&&v| v > 64).count() > 10);
    }
    // Every case but the blank page and the six pixels shows lines.
    assert_eq!(with_lines, cases.len() - 2);
}

#[test]
fn tile_resampling_blur_and_invert_equal_sd_webui_controlnet_byte_for_byte() {
    use sdxld::engine::preprocess::image_filters::Param;
    let root = common::preprocess_fixtures();
    let path = root.join("filters.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    assert_eq!(cases.len(), 27);
    let mut changed = 0;
    for case in &cases {
        let open = |key: &str| image::open(root.join(case[key].as_str().expect(key))).expect("png");
        let value = Param(case["value"].as_f64().expect("value") as f32);
        let resolution = case["resolution"].as_u64().expect("resolution") as u32;
        let preprocessor = match case["preprocessor"].as_str().expect("name") {
            "tile_resample" => Preprocessor::TileResample { rate: value },
            "blur_gaussian" => Preprocessor::Blur { sigma: value },
            "invert" => Preprocessor::Invert,
            other => panic!("unknown filter {other}"),
        };
        let filter = Preprocessing {
            preprocessor,
            detect_resolution: (resolution > 0).then_some(resolution),
        };
        let image = open("image");
        let map = filter.run(&image, Networks::default()).expect("a map");
        let expected = open("expected").to_rgb8();
        assert_eq!(map.dimensions(), expected.dimensions(), "{case}");
        let off = differing(map.as_raw(), expected.as_raw());
        assert_eq!(off, 0, "{case}: {off} values differ");
        changed += usize::from(map != hwc3(&image));
    }
    // All but the rates below 1.1, the one-tap sigma and the single pixel change the image.
    assert_eq!(changed, cases.len() - 4);
}

mod over_grpc {
    use super::common;
    use super::common::server::TestServer;
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
                true, true, false, false, false, false, false, false, false, false, false, true,
                false, true, true, true, false, false, false, false, true, true, true, false
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
        let read =
            |name: &str| std::fs::read(root.join(format!("images/{name}.png"))).expect("read");
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
}
