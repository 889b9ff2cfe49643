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
