//! `PREPROCESSOR_SCRIBBLE_XDOG` against sd-webui-controlnet's `scribble_xdog` on OpenCV
//! and numpy, byte for byte, in the engine and over gRPC, and its threshold's refusals.

use crate::common;

use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};

#[test]
fn xdog_scribbles_equal_sd_webui_controlnets_byte_for_byte() {
    let root = common::preprocess_fixtures();
    let text = std::fs::read_to_string(root.join("xdog.json")).expect("read");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
    assert_eq!(cases.len(), 11);
    let mut drawn = 0;
    for case in &cases {
        let open = |key: &str| image::open(root.join(case[key].as_str().expect(key))).expect("png");
        let resolution = case["resolution"].as_u64().expect("resolution") as u32;
        let xdog = Preprocessing {
            preprocessor: Preprocessor::ScribbleXdog {
                threshold: case["threshold"].as_u64().expect("threshold") as u32,
            },
            detect_resolution: (resolution > 0).then_some(resolution),
        };
        let map = xdog
            .run(&open("image"), Networks::default())
            .expect("a map");
        let expected = open("expected").to_rgb8();
        assert_eq!(map.dimensions(), expected.dimensions(), "{case}");
        let off = map
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(off, 0, "{case}: {off} values differ");
        assert!(
            map.iter().all(|&v| v == 0 || v == 255),
            "{case}: black and white"
        );
        drawn += usize::from(map.as_raw().contains(&255));
    }
    // All but the flat tiny image draw strokes.
    assert!(drawn >= cases.len() - 1, "{drawn} of {} draw", cases.len());
}

mod over_grpc {
    use super::common;
    use super::common::server::{violated_fields, TestServer};
    use sdxld::proto::v1 as pb;
    use tonic::Code;

    fn request(name: &str, params: pb::PreprocessorParams) -> pb::PreprocessRequest {
        let root = common::preprocess_fixtures();
        pb::PreprocessRequest {
            image: std::fs::read(root.join(format!("images/{name}.png"))).expect("read"),
            preprocessor: pb::Preprocessor::ScribbleXdog as i32,
            preprocessor_params: Some(params),
            poses: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_preprocess_rpc_draws_xdog_scribbles_and_names_a_bad_threshold() {
        let root = common::preprocess_fixtures();
        let server = TestServer::start(&[]).await;
        for (name, threshold, resolution) in [
            ("drawing_97x61", None, 0),
            ("drawing_97x61", Some(64), 0),
            ("photo_384x256", None, 128),
        ] {
            let params = pb::PreprocessorParams {
                xdog_threshold: threshold,
                detect_resolution: resolution,
                ..Default::default()
            };
            let map = server
                .preprocess(request(name, params))
                .await
                .expect("a scribble");
            let case = format!("{name}_{}_{resolution}", threshold.unwrap_or(32));
            let expected = image::open(root.join(format!("xdog/{case}.png")))
                .expect("png")
                .to_rgb8();
            let got = image::load_from_memory(&map.control_map)
                .expect("png")
                .to_rgb8();
            assert_eq!(got, expected, "{case}");
        }
        let field = "preprocessor_params.xdog_threshold";
        let threshold = |t: u32| pb::PreprocessorParams {
            xdog_threshold: Some(t),
            ..Default::default()
        };
        let mut canny = request("drawing_97x61", threshold(10));
        canny.preprocessor = pb::Preprocessor::Canny as i32;
        for request in [
            request("drawing_97x61", threshold(0)),
            request("drawing_97x61", threshold(65)),
            canny,
        ] {
            let status = server.preprocess(request).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(violated_fields(&status), [field], "{status:?}");
        }
        let capabilities = server.capabilities().await;
        let support = capabilities
            .preprocessor_support
            .iter()
            .find(|s| s.preprocessor == pb::Preprocessor::ScribbleXdog as i32)
            .expect("listed");
        assert!(support.ready, "no detector needed");
    }
}
