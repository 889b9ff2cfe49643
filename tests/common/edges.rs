//! Shared pieces of the edge-network tests (PiDiNet, TEED): map comparisons, a server
//! with one detector file and the tiny2 ControlNet, and the PNG entry of a unit.

use std::path::Path;

use sdxld::proto::v1 as pb;

use super::server::TestServer;

/// Within `most` levels everywhere, and different on at most one pixel in a hundred (the
/// last bit of a float32 edge before its 8 bits or its steps).
pub fn assert_map(what: &str, got: &image::GrayImage, want: &image::GrayImage, most: u8) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}");
    let mut off = 0;
    for (g, w) in got.iter().zip(want.iter()) {
        assert!(g.abs_diff(*w) <= most, "{what}: {g} against {w}");
        off += usize::from(g != w);
    }
    assert!(off * 100 <= got.len(), "{what}: {off} pixels differ");
}

/// A server on the tiny2 pipeline with the detector `file` as `name` in its
/// preprocessor root, the tiny2 ControlNet as `lines_xl` and the `extra` settings; the
/// roots live as long as the returned folders.
pub async fn server_with_detector(
    file: &Path,
    name: &str,
    extra: &[(&str, &str)],
) -> (TestServer, [tempfile::TempDir; 2]) {
    let detectors = tempfile::tempdir().expect("tempdir");
    std::fs::copy(file, detectors.path().join(format!("{name}.safetensors"))).expect("copy");
    let controlnets = tempfile::tempdir().expect("tempdir");
    let lines = controlnets.path().join("lines_xl");
    std::fs::create_dir_all(&lines).expect("mkdir");
    let from = super::controlnet_fixtures().join("tiny2/from_unet");
    for entry in std::fs::read_dir(from).expect("dir").flatten() {
        std::fs::copy(entry.path(), lines.join(entry.file_name())).expect("copy");
    }
    let pipeline = super::fixtures().join("tiny2/pipeline");
    let root = |dir: &Path| dir.to_str().expect("utf-8").to_string();
    let (pipeline, detector_root) = (root(&pipeline), root(detectors.path()));
    let controlnet_root = root(controlnets.path());
    let mut settings = vec![
        ("SDXLD__ENGINE__DEFAULT_MODEL", pipeline.as_str()),
        ("SDXLD__MODELS__PREPROCESSOR_ROOTS", detector_root.as_str()),
        ("SDXLD__MODELS__CONTROLNET_ROOTS", controlnet_root.as_str()),
    ];
    settings.extend_from_slice(extra);
    let server = TestServer::start(&settings).await;
    (server, [detectors, controlnets])
}

/// The PNG `parameters` of a 64×64 generation with one `lines_xl` unit on `preprocessor`
/// of `image` with `params`.
pub async fn unit_parameters(
    server: &TestServer,
    preprocessor: pb::Preprocessor,
    image: &[u8],
    params: Option<pb::PreprocessorParams>,
) -> String {
    let spec = pb::GenerationSpec {
        prompt: "a house by a lake".into(),
        seed: Some(42),
        steps: 2,
        width: 64,
        height: 64,
        controlnets: vec![pb::ControlNetUnit {
            model: "lines_xl".into(),
            image: image.to_vec(),
            preprocessor: preprocessor as i32,
            preprocessor_params: params,
            ..Default::default()
        }],
        ..Default::default()
    };
    let response = server.images(spec).await.expect("generated");
    super::png_parameters(&response.images[0].data)
}

/// A black RGB PNG of `width`×`height`.
pub fn black_png(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::new(width, height))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    png
}
