//! Preprocessor networks in the server: the Preprocess RPC and ControlNet units run the
//! detector a request names or the configured default (loaded into the cache as a
//! model), their maps equal to controlnet_aux's, the images equal to diffusers' given
//! the reference's map; requests beyond the memory budget or the sizes a network takes
//! are refused before running (missing and wrong detectors: `detector_refusals.rs`).

use crate::common;

use std::path::Path;

use common::server::{error_reason, violated_fields, TestServer};
use common::{
    assert_images_match, controlnet_fixtures, decoded_image, detector_fixtures, fixtures,
};
use sdxld::proto::v1 as pb;
use tonic::Code;

/// A folder of detectors under the names the config defaults use (`sk_model`, `netG`,
/// `ControlNetHED`, the depth repository), an anime U-Net under another name, and a
/// truncated file.
pub(crate) fn detector_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = detector_fixtures();
    for (from, to) in [
        ("lineart/lineart_3.safetensors", "sk_model.safetensors"),
        (
            "lineart_anime/lineart_anime_6.safetensors",
            "netG.safetensors",
        ),
        (
            "lineart_anime/lineart_anime_6.safetensors",
            "anime.safetensors",
        ),
        ("hed/narrow.safetensors", "ControlNetHED.safetensors"),
        ("openpose/narrow.safetensors", "body_pose_model.safetensors"),
        ("normal/narrow.safetensors", "scannet.safetensors"),
        ("mlsd/narrow.safetensors", "mlsd_large_512_fp32.safetensors"),
        ("teed/seed3.safetensors", "MTEED.safetensors"),
    ] {
        std::fs::copy(fixtures.join(from), dir.path().join(to)).expect("copy");
    }
    // Depth Anything and UperNet folders under the defaults' names, repository paths.
    for (from, name) in [
        ("depth/small", DEPTH_MODEL),
        ("depth/first", DEPTH_V1_MODEL),
        ("segment/small", SEGMENT_MODEL),
        ("dpt/project", "Intel/dpt-large"),
        ("dpt/hybrid", "Intel/dpt-hybrid-midas"),
    ] {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(fixtures.join(from))
            .expect("dir")
            .flatten()
        {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    common::copy_tree(
        &common::zoe_fixtures().join("zoe/nyu"),
        &dir.path().join(ZOE_MODEL),
    );
    let bytes = std::fs::read(fixtures.join("lineart/lineart_2.safetensors")).expect("read");
    std::fs::write(
        dir.path().join("broken.safetensors"),
        &bytes[..bytes.len() / 3],
    )
    .expect("write");
    dir
}

/// The depth preprocessor's default detector name.
const DEPTH_MODEL: &str = "depth-anything/Depth-Anything-V2-Small-hf";
/// A Depth Anything V1 folder's name.
const DEPTH_V1_MODEL: &str = "LiheYoung/depth-anything-small-hf";
/// A ZoeDepth folder's name.
pub(crate) const ZOE_MODEL: &str = "Intel/zoedepth-nyu";
/// The segmentation preprocessor's default detector name.
const SEGMENT_MODEL: &str = "openmmlab/upernet-convnext-small";

/// A ControlNet root with the tiny2 ControlNet and union model.
pub(crate) fn controlnet_root() -> tempfile::TempDir {
    common::controlnet_root(&[("tiny2/from_unet", "lines_xl"), ("tiny2/union", "union_xl")])
}

pub(crate) async fn server(
    detectors: &Path,
    controlnets: &Path,
    extra: &[(&str, &str)],
) -> TestServer {
    TestServer::with_detectors(detectors, controlnets, extra).await
}

pub(crate) fn photo() -> Vec<u8> {
    std::fs::read(detector_fixtures().join("images/photo.png")).expect("photo")
}

pub(crate) fn request(preprocessor: pb::Preprocessor, model: &str) -> pb::PreprocessRequest {
    pb::PreprocessRequest {
        image: photo(),
        preprocessor: preprocessor as i32,
        preprocessor_params: Some(pb::PreprocessorParams {
            detect_resolution: 64,
            model: model.into(),
            ..Default::default()
        }),
        poses: None,
    }
}

/// Asserts that an 8-bit map is the reference's within one level on at most one pixel
/// in a hundred (a black-and-white scribble: any difference on at most one in a hundred).
fn assert_map(what: &str, png: &[u8], reference: &Path) {
    let got = image::load_from_memory(png).expect("png").to_rgb8();
    let want = image::open(reference).expect("reference").to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions(), "{what}");
    // Black-and-white scribbles and palette colours differ by whole values where they do.
    let most = if ["scribble", "segmentation", "openpose"]
        .iter()
        .any(|kind| what.starts_with(kind))
    {
        255
    } else {
        1
    };
    let mut off = 0;
    for (g, w) in got.as_raw().iter().zip(want.as_raw()) {
        assert!(g.abs_diff(*w) <= most, "{what}: {g} against {w}");
        off += usize::from(g != w);
    }
    assert!(
        off * 100 <= got.as_raw().len(),
        "{what}: {off} values differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preprocess_rpc_runs_the_named_or_default_detector() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let server = server(detectors.path(), controlnets.path(), &[]).await;
    let fixtures = detector_fixtures();
    let lineart = fixtures.join("controlnet/lineart_map.png");
    for model in ["", "sk_model"] {
        let map = server
            .preprocess(request(pb::Preprocessor::Lineart, model))
            .await
            .unwrap_or_else(|e| panic!("lineart {model:?}: {e}"));
        assert_eq!((map.width, map.height), (64, 64));
        assert_map("lineart", &map.control_map, &lineart);
    }
    let anime = fixtures.join("controlnet/lineart_anime_map.png");
    for model in ["", "anime"] {
        let map = server
            .preprocess(request(pb::Preprocessor::LineartAnime, model))
            .await
            .unwrap_or_else(|e| panic!("anime {model:?}: {e}"));
        assert_map("anime", &map.control_map, &anime);
    }
    let map = server
        .preprocess(request(pb::Preprocessor::Depth, ""))
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert_map(
        "depth",
        &map.control_map,
        &fixtures.join("depth/small_map.png"),
    );
    // DPT folders named in the request serve the depth preprocessor too.
    for (name, map_file) in [
        ("Intel/dpt-large", "dpt/project_map.png"),
        ("Intel/dpt-hybrid-midas", "dpt/hybrid_map.png"),
    ] {
        let map = server
            .preprocess(request(pb::Preprocessor::Depth, name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_map(name, &map.control_map, &fixtures.join(map_file));
    }
    // A ZoeDepth folder too, mapped as ZoeDetector maps it.
    let zoe = common::zoe_fixtures();
    let map = server
        .preprocess(pb::PreprocessRequest {
            image: std::fs::read(zoe.join("images/photo.png")).expect("photo"),
            ..request(pb::Preprocessor::Depth, ZOE_MODEL)
        })
        .await
        .unwrap_or_else(|e| panic!("{ZOE_MODEL}: {e}"));
    assert_map(ZOE_MODEL, &map.control_map, &zoe.join("zoe/nyu_map.png"));
    let map = server
        .preprocess(request(pb::Preprocessor::Softedge, ""))
        .await
        .unwrap_or_else(|e| panic!("softedge: {e}"));
    assert_map(
        "softedge",
        &map.control_map,
        &fixtures.join("hed/narrow_map.png"),
    );
    let map = server
        .preprocess(request(pb::Preprocessor::Segmentation, ""))
        .await
        .unwrap_or_else(|e| panic!("segmentation: {e}"));
    assert_map(
        "segmentation",
        &map.control_map,
        &fixtures.join("segment/small_map.png"),
    );
    let map = server
        .preprocess(request(pb::Preprocessor::Openpose, ""))
        .await
        .unwrap_or_else(|e| panic!("openpose: {e}"));
    assert_eq!(
        image::load_from_memory(&map.control_map)
            .expect("png")
            .to_rgb8(),
        image::open(fixtures.join("controlnet/openpose_map.png"))
            .expect("reference")
            .to_rgb8(),
        "the random network's skeletons, pixel for pixel"
    );
    let map = server
        .preprocess(request(pb::Preprocessor::Normal, ""))
        .await
        .unwrap_or_else(|e| panic!("normal: {e}"));
    assert_map(
        "normal",
        &map.control_map,
        &fixtures.join("normal/narrow_map.png"),
    );
    // The detectors stayed in the cache as models, listed with their networks.
    let listed = server.list_models(pb::ModelKind::Preprocessor).await;
    let resident = |name: &str| listed.iter().any(|m| m.name == name && m.resident);
    assert!(resident("sk_model") && resident("netG") && resident("anime"));
    let depth = listed
        .iter()
        .find(|m| m.name == DEPTH_MODEL)
        .expect("the depth folder listed");
    assert!(depth.resident);
    let network_and_version = |name: &str| {
        let entry = listed.iter().find(|m| m.name == name).expect("listed");
        let info = entry.preprocessor.clone().unwrap_or_default();
        (info.network, info.version)
    };
    // Depth Anything's two versions list apart; other networks have no version.
    assert_eq!(
        network_and_version(DEPTH_MODEL),
        ("depth_anything".into(), "2".into())
    );
    assert_eq!(
        network_and_version(DEPTH_V1_MODEL),
        ("depth_anything".into(), "1".into())
    );
    assert_eq!(
        network_and_version("Intel/dpt-large"),
        ("dpt".into(), String::new())
    );
    let dpt = listed
        .iter()
        .find(|m| m.name == "Intel/dpt-large")
        .expect("the DPT folder listed");
    assert_eq!(
        dpt.preprocessor.as_ref().map(|p| p.network.as_str()),
        Some("dpt")
    );
    let zoe_listed = listed.iter().find(|m| m.name == ZOE_MODEL).expect("listed");
    assert!(zoe_listed.resident);
    assert_eq!(
        zoe_listed.preprocessor.as_ref().map(|p| p.network.as_str()),
        Some("zoedepth")
    );
    let ready: Vec<(i32, bool)> = server
        .capabilities()
        .await
        .preprocessor_support
        .iter()
        .map(|s| (s.preprocessor, s.ready))
        .collect();
    for kind in [
        pb::Preprocessor::Canny,
        pb::Preprocessor::Depth,
        pb::Preprocessor::Lineart,
        pb::Preprocessor::LineartAnime,
        pb::Preprocessor::Softedge,
        pb::Preprocessor::Scribble,
        pb::Preprocessor::Segmentation,
        pb::Preprocessor::Openpose,
        pb::Preprocessor::Normal,
        pb::Preprocessor::Mlsd,
        pb::Preprocessor::Anyline,
    ] {
        assert!(
            ready.contains(&(kind as i32, true)),
            "{kind:?} in {ready:?}"
        );
    }
}

/// Every preprocessor on images of a few pixels at their own size either runs, its map
/// that size, or is refused naming `detect_resolution` before it runs (a network whose
/// paddings or poolings need more pixels); none fails inside the network. The line-art
/// generator's reflection paddings need 5 pixels a side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_images_at_their_own_size_run_or_name_the_detect_resolution() {
    let detectors = detector_root();
    let controlnets = controlnet_root();
    let server = server(detectors.path(), controlnets.path(), &[]).await;
    let mut client = server.generation().await;
    let tiny = |(width, height): (u32, u32)| {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 37 % 256) as u8, (y * 91 % 256) as u8, 128])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        png
    };
    let sizes = [(1, 1), (2, 9), (4, 4), (5, 5), (4, 17), (17, 3), (9, 8)];
    let mut ran = std::collections::HashSet::new();
    for preprocessor in (2..=13).filter_map(|k| pb::Preprocessor::try_from(k).ok()) {
        for size in sizes {
            let request = pb::PreprocessRequest {
                image: tiny(size),
                preprocessor: preprocessor as i32,
                preprocessor_params: Some(pb::PreprocessorParams::default()),
                poses: None,
            };
            let what = format!("{} at {size:?}", preprocessor.as_str_name());
            match client.preprocess(request).await {
                Ok(reply) => {
                    let map = image::load_from_memory(&reply.into_inner().control_map)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!((map.width(), map.height()), size, "{what}");
                    ran.insert((preprocessor, size));
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
                    assert_eq!(
                        violated_fields(&status),
                        ["preprocessor_params.detect_resolution"],
                        "{what}"
                    );
                }
            }
        }
    }
    assert!(ran.contains(&(pb::Preprocessor::Lineart, (5, 5))));
    assert!(!ran.contains(&(pb::Preprocessor::Lineart, (4, 17))));
    assert!(ran.contains(&(pb::Preprocessor::Canny, (1, 1))));
    assert!(ran.len() >= sizes.len() * 5, "{} ran", ran.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_run_their_detectors_and_equal_diffusers_given_the_reference_map() {
    let (detectors, controlnets) = (detector_root(), controlnet_root());
    let server = server(detectors.path(), controlnets.path(), &[]).await;
    let reference = common::read_tensors(&detector_fixtures().join("controlnet/cases.safetensors"));
    for (case, model, preprocessor) in [
        ("lineart", "lines_xl", pb::Preprocessor::Lineart),
        ("lineart_anime", "lines_xl", pb::Preprocessor::LineartAnime),
        // A union model's control type follows from the preprocessor.
        ("lineart_union", "union_xl", pb::Preprocessor::Lineart),
        ("depth", "lines_xl", pb::Preprocessor::Depth),
        ("depth_union", "union_xl", pb::Preprocessor::Depth),
        ("softedge", "lines_xl", pb::Preprocessor::Softedge),
        ("scribble", "union_xl", pb::Preprocessor::Scribble),
        ("segmentation", "union_xl", pb::Preprocessor::Segmentation),
        ("openpose", "union_xl", pb::Preprocessor::Openpose),
        ("normal", "union_xl", pb::Preprocessor::Normal),
        ("mlsd", "union_xl", pb::Preprocessor::Mlsd),
        (
            "lineart_standard",
            "union_xl",
            pb::Preprocessor::LineartStandard,
        ),
        // Anyline reads as soft edges.
        ("anyline", "union_xl", pb::Preprocessor::Anyline),
    ] {
        let response = server
            .images(unit_spec(model, preprocessor, ""))
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let expected = reference[&format!("{case}.images")].get(0);
        assert_images_match(case, &decoded_image(&response.images[0].data), &expected);
        let map = detector_fixtures().join(format!("controlnet/{case}_map.png"));
        assert_map(case, &response.control_maps[0].data, &map);
        // sd-webui-controlnet's entries: M-LSD's default thresholds as A and B, depth
        // from Depth Anything.
        let entry = match case {
            "mlsd" => "Module: mlsd, Threshold A: 0.1, Threshold B: 0.1, Processor Res: 64,",
            "depth" => "Module: depth_anything_v2, Processor Res: 64,",
            "anyline" => "Module: softedge_anyline, Processor Res: 64,",
            _ => "",
        };
        let parameters = common::png_parameters(&response.images[0].data);
        assert!(parameters.contains(entry), "{parameters}");
        let completed = response.completed.expect("completed");
        if preprocessor == pb::Preprocessor::LineartStandard {
            // No network: no detector among the models, its module in the PNG's entry.
            let parameters = common::png_parameters(&response.images[0].data);
            let entry = "Module: lineart_standard, Processor Res: 64,";
            assert!(parameters.contains(entry), "{parameters}");
            assert!(
                completed
                    .models
                    .iter()
                    .all(|m| m.kind != pb::ModelKind::Preprocessor as i32),
                "{:?}",
                completed.models
            );
            continue;
        }
        let detector = completed
            .models
            .iter()
            .find(|m| m.kind == pb::ModelKind::Preprocessor as i32)
            .unwrap_or_else(|| panic!("{case}: no detector in {:?}", completed.models));
        let default = match preprocessor {
            pb::Preprocessor::Lineart => "sk_model",
            pb::Preprocessor::Depth => DEPTH_MODEL,
            pb::Preprocessor::Softedge | pb::Preprocessor::Scribble => "ControlNetHED",
            pb::Preprocessor::Segmentation => SEGMENT_MODEL,
            pb::Preprocessor::Openpose => "body_pose_model",
            pb::Preprocessor::Normal => "scannet",
            pb::Preprocessor::Mlsd => "mlsd_large_512_fp32",
            pb::Preprocessor::Anyline => "MTEED",
            _ => "netG",
        };
        assert_eq!(detector.name, default);
        assert!(
            completed
                .stage_timings
                .iter()
                .any(|t| t.stage == pb::Stage::Preprocessing as i32),
            "{case}: a preprocessing timing"
        );
    }
    // Depth from a DPT model: A1111's MiDaS module.
    let spec = unit_spec("lines_xl", pb::Preprocessor::Depth, "Intel/dpt-large");
    let response = server.images(spec).await.expect("dpt unit");
    let parameters = common::png_parameters(&response.images[0].data);
    let entry = "Module: depth_midas, Processor Res: 64, Model: lines_xl";
    assert!(parameters.contains(entry), "{parameters}");
    // From Depth Anything's first version (the neck reads the last four layers): A1111's
    // depth_anything, where the default folder's second version is depth_anything_v2.
    let spec = unit_spec("lines_xl", pb::Preprocessor::Depth, DEPTH_V1_MODEL);
    let response = server.images(spec).await.expect("depth anything v1 unit");
    let parameters = common::png_parameters(&response.images[0].data);
    let entry = "Module: depth_anything, Processor Res: 64, Model: lines_xl";
    assert!(parameters.contains(entry), "{parameters}");
    // From a ZoeDepth model: A1111's depth_zoe, its map ZoeDetector's.
    let spec = unit_spec("lines_xl", pb::Preprocessor::Depth, ZOE_MODEL);
    let response = server.images(spec).await.expect("zoe unit");
    let parameters = common::png_parameters(&response.images[0].data);
    let entry = "Module: depth_zoe, Processor Res: 64, Model: lines_xl";
    assert!(parameters.contains(entry), "{parameters}");
    assert_map(
        ZOE_MODEL,
        &response.control_maps[0].data,
        &common::zoe_fixtures().join("zoe/nyu_map.png"),
    );
}

/// A 64×64 generation in four Euler steps with one unit of `model` on `preprocessor`
/// (detected at 64, by `detector` or the default), returning its control map.
pub(crate) fn unit_spec(
    model: &str,
    preprocessor: pb::Preprocessor,
    detector: &str,
) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a house by a lake".into(),
        seed: Some(42),
        steps: 4,
        guidance_scale: Some(5.0),
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Euler as i32,
        controlnets: vec![pb::ControlNetUnit {
            model: model.into(),
            image: photo(),
            preprocessor: preprocessor as i32,
            preprocessor_params: Some(pb::PreprocessorParams {
                detect_resolution: 64,
                model: detector.into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        output: Some(pb::OutputOptions {
            return_control_maps: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The CLI runs a line-art unit with the detector file it names, as the server does.
#[test]
fn the_cli_runs_a_line_art_unit_with_the_named_detector() {
    let out = tempfile::tempdir().expect("tempdir");
    let reference = common::read_tensors(&detector_fixtures().join("controlnet/cases.safetensors"));
    let unit = format!(
        "{},{},preprocessor=lineart,resolution=64,detector={}",
        controlnet_fixtures().join("tiny2/from_unet").display(),
        detector_fixtures().join("images/photo.png").display(),
        detector_fixtures()
            .join("lineart/lineart_3.safetensors")
            .display(),
    );
    let png = out.path().join("lineart.png");
    common::cli::sdxld("generate")
        .args([
            "--prompt",
            "a house by a lake",
            "--seed",
            "42",
            "--steps",
            "4",
        ])
        .args([
            "--guidance",
            "5",
            "--scheduler",
            "euler",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .flag("--controlnet", unit)
        .flag("--model", fixtures().join("tiny2/pipeline"))
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI line-art unit",
        &common::image_file(&png),
        &reference["lineart.images"].get(0),
    );
}

/// A detector's activations count against the memory budget with its weights: a budget
/// that holds the line-art generator and a 64×64 map refuses the same image detected at
/// 1024 (about 800 MB of full-resolution features), and OpenPose on a strip that its
/// network would see 184 pixels high and 5888 wide, before running them, and serves on;
/// a strip its network would see larger than any image may be is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detector_activations_count_against_the_memory_budget() {
    let detectors = detector_root();
    let weights = std::fs::metadata(detectors.path().join("sk_model.safetensors"))
        .expect("detector")
        .len();
    let budget = (weights + 32_000_000).to_string();
    let server = TestServer::start(&[
        (
            "SDXLD__MODELS__PREPROCESSOR_ROOTS",
            detectors.path().to_str().expect("utf-8"),
        ),
        ("SDXLD__ENGINE__MEMORY_BUDGET_BYTES", &budget),
    ])
    .await;
    server
        .preprocess(request(pb::Preprocessor::Lineart, ""))
        .await
        .expect("a 64x64 map fits");
    let mut large = request(pb::Preprocessor::Lineart, "");
    if let Some(params) = large.preprocessor_params.as_mut() {
        params.detect_resolution = 1024;
    }
    let Err(status) = server.preprocess(large).await else {
        panic!("a 1024x1024 detection ran within a budget that cannot hold it");
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_reason(&status).0, "MEMORY_BUDGET");
    // OpenPose scales an image to a height of 184 for its network: a 512×16 strip makes
    // a 5888×184 input, over this budget; a 4096×8 one a 94208×184 input, more pixels
    // than any image may have, which validation refuses.
    let strip = |width: u32, height: u32| {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(width, height)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        let mut pose = request(pb::Preprocessor::Openpose, "");
        pose.image = png;
        if let Some(params) = pose.preprocessor_params.as_mut() {
            params.detect_resolution = 0;
        }
        pose
    };
    let Err(status) = server.preprocess(strip(512, 16)).await else {
        panic!("a 5888x184 pose network input ran within the budget");
    };
    assert_eq!(error_reason(&status).0, "MEMORY_BUDGET", "{status:?}");
    let Err(status) = server.preprocess(strip(4096, 8)).await else {
        panic!("a 94208x184 pose network input was admitted");
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["preprocessor_params.detect_resolution"]
    );
    // A 1x400 strip scales to less than a pixel's width: refused the same way.
    let Err(status) = server.preprocess(strip(1, 400)).await else {
        panic!("a pose network input no pixel wide was admitted");
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["preprocessor_params.detect_resolution"]
    );
    server
        .preprocess(request(pb::Preprocessor::Lineart, ""))
        .await
        .expect("the server serves on");
}
