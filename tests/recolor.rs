//! The recolor preprocessors against sd-webui-controlnet's `recolor_luminance` and
//! `recolor_intensity` on OpenCV and numpy: OpenCV's 8-bit Lab lightness byte for byte
//! for every colour, the gamma within a level of numpy's float32 power, the maps as the
//! Preprocess RPC returns them, and the gamma's refusals.

use crate::common;

use sdxld::engine::preprocess::image_filters::Param;
use sdxld::engine::preprocess::recolor::{gamma_table, lab_lightness, Lightness};
use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};

fn json(path: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

/// (values more than a level apart, values apart at all) of two maps of equal size.
fn apart(actual: &[u8], expected: &[u8]) -> (usize, usize) {
    assert_eq!(actual.len(), expected.len());
    let diff = |(a, e): (&u8, &u8)| a.abs_diff(*e);
    let far = actual.iter().zip(expected).filter(|p| diff(*p) > 1).count();
    let off = actual.iter().zip(expected).filter(|p| diff(*p) > 0).count();
    (far, off)
}

#[test]
fn the_lightness_equals_opencvs_lab_l_for_every_8_bit_colour() {
    let root = common::preprocess_fixtures();
    let expected = image::open(root.join("recolor/lightness.png"))
        .expect("png")
        .to_luma8();
    assert_eq!(expected.dimensions(), (4096, 4096));
    let mut off = 0;
    for (i, &l) in expected.as_raw().iter().enumerate() {
        let bytes = [(i >> 16) as u8, (i >> 8) as u8, i as u8];
        if lab_lightness(bytes) != l {
            off += 1;
            assert!(
                off < 10,
                "colour {bytes:?}: {} against {l}",
                lab_lightness(bytes)
            );
        }
    }
    assert_eq!(off, 0, "{off} colours differ");
    // All but three lightnesses occur (the fixed-point cube root steps over 4, 13 and
    // 22 near black): the check is not a constant's.
    let mut seen = [false; 256];
    expected
        .as_raw()
        .iter()
        .for_each(|&l| seen[usize::from(l)] = true);
    assert_eq!(seen.iter().filter(|s| **s).count(), 253);
}

#[test]
fn the_gamma_is_within_a_level_of_numpys_float32_power_and_mostly_equal() {
    let root = common::preprocess_fixtures();
    let tables = json(root.join("recolor/gammas.json"));
    let tables = tables.as_array().expect("tables");
    assert_eq!(tables.len(), 381);
    let (mut far, mut off, mut total) = (0, 0, 0);
    for table in tables {
        let gamma = table["gamma"].as_f64().expect("gamma") as f32;
        let expected: Vec<u8> = table["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_u64().expect("value") as u8)
            .collect();
        let (f, o) = apart(&gamma_table(gamma), &expected);
        if [0.5, 1.0, 2.0].contains(&gamma) {
            // numpy's exact fast paths (sqrt, the value, the square) are met exactly.
            assert_eq!(o, 0, "gamma {gamma}");
        }
        (far, off, total) = (far + f, off + o, total + expected.len());
    }
    assert_eq!(far, 0, "{far} values more than a level from numpy's");
    // numpy's vectorised power is within an ulp, not correctly rounded: a value whose
    // power lands on a level's edge may fall either side of it.
    assert!(off * 1000 < total, "{off} of {total} values differ");
}

#[test]
fn the_maps_equal_sd_webui_controlnets_within_a_level() {
    let root = common::preprocess_fixtures();
    let cases = json(root.join("recolor.json"));
    let cases = cases.as_array().expect("cases");
    assert_eq!(cases.len(), 12);
    let mut changed = 0;
    for case in cases {
        let open = |key: &str| image::open(root.join(case[key].as_str().expect(key))).expect("png");
        let gamma = case["gamma"].as_f64().expect("gamma") as f32;
        let resolution = case["resolution"].as_u64().expect("resolution") as u32;
        let lightness = match case["preprocessor"].as_str().expect("name") {
            "recolor_luminance" => Lightness::Luminance,
            "recolor_intensity" => Lightness::Intensity,
            other => panic!("unknown preprocessor {other}"),
        };
        let recolor = Preprocessing {
            preprocessor: Preprocessor::Recolor {
                lightness,
                gamma: Param(gamma),
            },
            detect_resolution: (resolution > 0).then_some(resolution),
        };
        let image = open("image");
        let map = recolor.run(&image, Networks::default()).expect("a map");
        let expected = open("expected").to_rgb8();
        assert_eq!(map.dimensions(), expected.dimensions(), "{case}");
        let (far, off) = apart(map.as_raw(), expected.as_raw());
        assert_eq!(far, 0, "{case}: {far} values more than a level apart");
        // Elsewhere a level's edge that numpy's power falls the other side of moves every
        // pixel of that lightness; how rare such edges are is the gamma test's to say.
        if [0.5, 1.0, 2.0].contains(&gamma) {
            assert_eq!(off, 0, "{case}: {off} values differ");
        }
        // Grey: three equal channels.
        assert!(map.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "{case}");
        changed += usize::from(map != image.to_rgb8());
    }
    assert_eq!(changed, cases.len());
}

mod over_grpc {
    use super::common;
    use super::common::server::TestServer;
    use sdxld::proto::v1 as pb;
    use tonic::Code;
    use tonic_types::StatusExt;

    fn request(
        png: &[u8],
        preprocessor: pb::Preprocessor,
        params: pb::PreprocessorParams,
    ) -> pb::PreprocessRequest {
        pb::PreprocessRequest {
            image: png.to_vec(),
            preprocessor: preprocessor as i32,
            preprocessor_params: Some(params),
            poses: None,
        }
    }

    fn gamma(gamma: f32) -> pb::PreprocessorParams {
        pb::PreprocessorParams {
            gamma_correction: Some(gamma),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_preprocess_rpc_returns_the_recolor_maps_and_names_a_bad_gamma() {
        let root = common::preprocess_fixtures();
        let server = TestServer::start(&[]).await;
        let read =
            |name: &str| std::fs::read(root.join(format!("images/{name}.png"))).expect("read");
        let cases = [
            (
                "photo_160x120",
                pb::Preprocessor::RecolorLuminance,
                None,
                0,
                "recolor_luminance_1.0_0",
            ),
            (
                "grey_photo_96",
                pb::Preprocessor::RecolorLuminance,
                Some(0.5),
                0,
                "recolor_luminance_0.5_0",
            ),
            (
                "noise_33x17",
                pb::Preprocessor::RecolorIntensity,
                Some(2.0),
                0,
                "recolor_intensity_2.0_0",
            ),
            (
                "photo_160x120",
                pb::Preprocessor::RecolorIntensity,
                None,
                0,
                "recolor_intensity_1.0_0",
            ),
        ];
        for (name, preprocessor, gamma, resolution, case) in cases {
            let params = pb::PreprocessorParams {
                gamma_correction: gamma,
                detect_resolution: resolution,
                ..Default::default()
            };
            let map = server
                .preprocess(request(&read(name), preprocessor, params))
                .await
                .expect(case);
            let expected = root.join(format!("recolor/{name}_{case}.png"));
            let expected = image::open(expected).expect("png").to_rgb8();
            assert_eq!((map.width, map.height), expected.dimensions(), "{case}");
            let map = image::load_from_memory(&map.control_map).expect("png");
            assert_eq!(map.to_rgb8(), expected, "{name} {case}");
        }
        let photo = read("photo_160x120");
        let luminance = pb::Preprocessor::RecolorLuminance;
        let sigma = pb::PreprocessorParams {
            blur_sigma: Some(2.0),
            ..Default::default()
        };
        let invalid = [
            (
                request(&photo, luminance, gamma(f32::NAN)),
                "gamma_correction",
                "NaN",
            ),
            (
                request(&photo, luminance, gamma(0.05)),
                "gamma_correction",
                "0.05",
            ),
            (
                request(&photo, luminance, gamma(2.5)),
                "gamma_correction",
                "2.5",
            ),
            (
                request(
                    &photo,
                    pb::Preprocessor::RecolorIntensity,
                    gamma(f32::INFINITY),
                ),
                "gamma_correction",
                "inf",
            ),
            (
                request(&photo, pb::Preprocessor::Blur, gamma(1.2)),
                "gamma_correction",
                "PREPROCESSOR_RECOLOR_LUMINANCE and PREPROCESSOR_RECOLOR_INTENSITY only",
            ),
            (
                request(&photo, luminance, sigma),
                "blur_sigma",
                "PREPROCESSOR_BLUR only",
            ),
            (
                request(
                    &photo,
                    luminance,
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
            let bad = status.get_details_bad_request().expect("BadRequest");
            let fields: Vec<&str> = bad
                .field_violations
                .iter()
                .map(|f| f.field.as_str())
                .collect();
            assert_eq!(fields, [field.as_str()], "{status:?}");
            let description = &bad.field_violations[0].description;
            assert!(description.contains(says), "{field}: {description}");
        }
        // The server serves on, and both preprocessors are ready without a detector.
        let map = server
            .preprocess(request(&photo, luminance, gamma(0.1)))
            .await
            .expect("a map");
        assert_eq!((map.width, map.height), (160, 120));
        let capabilities = server.capabilities().await;
        for preprocessor in [luminance, pb::Preprocessor::RecolorIntensity] {
            let support = capabilities
                .preprocessor_support
                .iter()
                .find(|s| s.preprocessor == preprocessor as i32)
                .expect("listed");
            assert!(
                support.ready && support.default_model.is_empty(),
                "{support:?}"
            );
        }
    }
}
