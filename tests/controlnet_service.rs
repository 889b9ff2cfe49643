//! ControlNet over the service and the CLI: requests equal diffusers' ControlNet
//! pipelines (two units summed, a window under a second-order scheduler, guess mode,
//! image to image, inpainting, a LoRA), control maps come back as the job used them,
//! and Canny runs in the server as the Preprocess RPC does (bad units:
//! `controlnet_refusals.rs`).

use crate::common;

use std::path::Path;

use common::cli::sdxld;
use common::server::{violated_fields, TestServer};
use common::{
    assert_images_match, controlnet_cases, controlnet_fixtures, decoded_image, fixtures,
    read_tensors, Case,
};
use sdxld::proto::v1 as pb;
use tonic::Code;

/// A ControlNet root holding the fixtures' ControlNets under names of their own: two for
/// the tiny2 pipeline, one of the tiny3 layout and one of the SD 1.5 layout.
pub(crate) fn controlnet_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let cn = controlnet_fixtures();
    for (from, name) in [
        (cn.join("tiny2/from_unet"), "canny_xl"),
        (cn.join("tiny2/own"), "small_xl"),
        (cn.join("tiny3/from_unet"), "wide_xl"),
        (cn.join("sd15"), "sd15_canny"),
        (cn.join("tiny2/union"), "union_xl"),
        (cn.join("tiny2/union"), "union6_xl"),
    ] {
        let to = root.path().join(name);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(&from).expect("read_dir").flatten() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    // A union model's config claiming six types: validation reads it before any load.
    common::set_config(
        &root.path().join("union6_xl/config.json"),
        "num_control_type",
        serde_json::json!(6),
    );
    root
}

pub(crate) async fn server(root: &Path) -> TestServer {
    let pipeline = fixtures().join("tiny2/pipeline");
    TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipeline.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__CONTROLNET_ROOTS",
            root.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__LORA_ROOTS",
            fixtures().join("tiny2/lora").to_str().expect("utf-8"),
        ),
        ("SDXLD__LIMITS__MAX_WIDTH", "256"),
        ("SDXLD__LIMITS__MAX_HEIGHT", "256"),
    ])
    .await
}

pub(crate) fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture case `name` of tiny2.
pub(crate) fn case(name: &str) -> Case {
    controlnet_cases("tiny2")
        .into_iter()
        .find(|c| c.name() == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The unit a case's unit describes, its ControlNet by its name here.
pub(crate) fn unit_of(u: &serde_json::Value) -> pb::ControlNetUnit {
    let dir = controlnet_fixtures().join("tiny2");
    let image = |name: &serde_json::Value| read(&dir.join(name.as_str().expect("image")));
    // ControlType values are the model's slots plus one.
    let control_type = |i: usize| u["types"][i].as_i64().map_or(0, |t| t as i32 + 1);
    let images = u["images"].as_array();
    let more_conditions = images
        .map(|images| {
            images
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, name)| pb::UnionCondition {
                    image: image(name),
                    control_type: control_type(i),
                    conditioning_scale: u["scales"][i].as_f64().map(|s| s as f32),
                    ..Default::default()
                })
                .collect()
        })
        .unwrap_or_default();
    pb::ControlNetUnit {
        model: match u["model"].as_str() {
            Some("from_unet") => "canny_xl".into(),
            Some("union") => "union_xl".into(),
            _ => "small_xl".into(),
        },
        image: image(images.map_or(&u["image"], |i| &i[0])),
        conditioning_scale: u["scales"][0]
            .as_f64()
            .or(u["scale"].as_f64())
            .map(|s| s as f32),
        guidance_start: u["start"].as_f64().unwrap_or(0.0) as f32,
        guidance_end: u["end"].as_f64().map(|e| e as f32),
        control_mode: if u["guess"].as_bool().unwrap_or(false) {
            pb::ControlMode::Guess as i32
        } else {
            0
        },
        control_type: control_type(0),
        more_conditions,
        ..Default::default()
    }
}

/// The request diffusers' case `case` describes, its ControlNets by their names here.
pub(crate) fn spec_of(case: &Case) -> pb::GenerationSpec {
    let scheduler = match case["scheduler"].as_str() {
        Some("HeunDiscreteScheduler") => pb::Scheduler::Heun,
        _ => pb::Scheduler::Euler,
    };
    let units = case["units"].as_array().expect("units");
    let controlnets = units.iter().map(unit_of).collect();
    let kind = case["kind"].as_str().unwrap_or("txt2img");
    let init_image = (kind != "txt2img").then(|| pb::InitImage {
        image: read(&fixtures().join("tiny2/init.png")),
        strength: Some(case.float("strength") as f32),
        mask: if kind == "inpaint" {
            read(&fixtures().join("tiny2/mask.png"))
        } else {
            Vec::new()
        },
        ..Default::default()
    });
    let loras = case["loras"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|l| pb::LoraAdapter {
                    name: l[0].as_str().expect("name").into(),
                    weight: l[1].as_f64().map(|w| w as f32),
                    text_encoder_weight: None,
                })
                .collect()
        })
        .unwrap_or_default();
    pb::GenerationSpec {
        prompt: case.text("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: Some(case.int("seed")),
        steps: case.int("steps") as u32,
        guidance_scale: Some(case.float("guidance") as f32),
        width: case["width"].as_u64().unwrap_or(64) as u32,
        height: case["height"].as_u64().unwrap_or(64) as u32,
        num_images: case["num_images"].as_u64().unwrap_or(1) as u32,
        scheduler: scheduler as i32,
        controlnets,
        init_image,
        loras,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlnet_requests_over_grpc_equal_diffusers() {
    let root = controlnet_root();
    let server = server(root.path()).await;
    let reference = read_tensors(&controlnet_fixtures().join("tiny2/cases.safetensors"));
    for name in [
        "two_units",
        "window_heun",
        "guess",
        "img2img",
        "inpaint",
        "lora",
        "tall",
        "union_two",
        "union_img2img",
    ] {
        let case = case(name);
        let mut spec = spec_of(&case);
        spec.output = Some(pb::OutputOptions {
            return_control_maps: true,
            ..Default::default()
        });
        let response = server
            .images(spec.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = &reference[&format!("{name}.images")];
        assert_eq!(response.images.len() as i64, expected.size()[0], "{name}");
        for (i, image) in response.images.iter().enumerate() {
            let what = format!("gRPC {name} image {i}");
            assert_images_match(&what, &decoded_image(&image.data), &expected.get(i as i64));
        }
        // The maps were given at the output size: they come back as they were sent.
        let sent: Vec<(u32, u32, &[u8])> = spec
            .controlnets
            .iter()
            .enumerate()
            .flat_map(|(i, unit)| {
                let more = unit.more_conditions.iter().map(|c| c.image.as_slice());
                std::iter::once(unit.image.as_slice())
                    .chain(more)
                    .enumerate()
                    .map(move |(j, image)| (i as u32, j as u32, image))
            })
            .collect();
        assert_eq!(response.control_maps.len(), sent.len(), "{name}");
        for (map, (unit, condition, image)) in response.control_maps.iter().zip(sent) {
            assert_eq!((map.unit_index, map.condition_index), (unit, condition));
            assert!(
                decoded_image(&map.data).equal(&decoded_image(image)),
                "{name}: control map {unit}/{condition} differs from the image sent"
            );
        }
        if name == "two_units" {
            // A1111's parameters name each unit as sd-webui-controlnet writes them.
            let text = common::png_parameters(&response.images[0].data);
            assert!(
                text.contains(
                    ", ControlNet 0: \"Module: none, Model: canny_xl [",
                ) && text.contains("Weight: 0.8, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1, Control Mode: Balanced\"")
                    && text.contains(", ControlNet 1: \"Module: none, Model: small_xl [")
                    && text.contains("Guidance End: 0.5"),
                "{text}"
            );
        }
        let completed = response.completed.expect("completed");
        let controlnets: Vec<_> = completed
            .models
            .iter()
            .filter(|m| m.kind == pb::ModelKind::Controlnet as i32)
            .collect();
        assert_eq!(controlnets.len(), spec.controlnets.len(), "{name}");
        for (used, unit) in controlnets.iter().zip(&spec.controlnets) {
            assert_eq!(used.name, unit.model);
            assert_eq!(used.sha256.len(), 64, "{name}: {used:?}");
            assert_eq!(used.weight, unit.conditioning_scale.unwrap_or(1.0));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_reports_preprocessing_and_maps_before_images() {
    let root = controlnet_root();
    let server = server(root.path()).await;
    let mut spec = spec_of(&case("two_units"));
    spec.output = Some(pb::OutputOptions {
        return_control_maps: true,
        ..Default::default()
    });
    let (events, end) = server
        .stream(tonic::Request::new(pb::GenerateRequest {
            spec: Some(spec),
        }))
        .await;
    end.expect("completed");
    use pb::generate_response::Event;
    let position = |pick: &dyn Fn(&Event) -> bool| events.iter().position(pick).expect("event");
    let preprocessing = position(
        &|e| matches!(e, Event::Progress(p) if p.stage == pb::Stage::Preprocessing as i32),
    );
    let first_map = position(&|e| matches!(e, Event::ControlMap(_)));
    let first_image = position(&|e| matches!(e, Event::Image(_)));
    let denoising =
        position(&|e| matches!(e, Event::Progress(p) if p.stage == pb::Stage::Denoising as i32));
    assert!(
        preprocessing < denoising && first_map < first_image,
        "{events:?}"
    );
    let maps = events
        .iter()
        .filter(|e| matches!(e, Event::ControlMap(_)))
        .count();
    assert_eq!(maps, 2);
}

/// The Preprocess RPC's map of `image`.
async fn preprocessed(
    server: &TestServer,
    image: &[u8],
    preprocessor: pb::Preprocessor,
    params: &pb::PreprocessorParams,
) -> pb::PreprocessResponse {
    let request = pb::PreprocessRequest {
        image: image.to_vec(),
        preprocessor: preprocessor as i32,
        preprocessor_params: Some(params.clone()),
        poses: None,
    };
    let response = server.generation().await.preprocess(request).await;
    response.expect("preprocess").into_inner()
}

/// A unit with the Canny preprocessor uses the map the Preprocess RPC returns: at the
/// image's size the same bytes come back; at a detection resolution the map has that
/// size; either way the image equals one made from that map sent as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canny_in_a_unit_equals_the_preprocess_rpc() {
    let root = controlnet_root();
    let server = server(root.path()).await;
    let photo = read(&fixtures().join("tiny2/init.png"));
    for detect_resolution in [0, 128] {
        let params = pb::PreprocessorParams {
            low_threshold: Some(60),
            high_threshold: Some(140),
            detect_resolution,
            ..Default::default()
        };
        let preview = preprocessed(&server, &photo, pb::Preprocessor::Canny, &params).await;
        let mut spec = spec_of(&case("one_unit"));
        spec.num_images = 1;
        spec.controlnets[0].image = photo.clone();
        spec.controlnets[0].preprocessor = pb::Preprocessor::Canny as i32;
        spec.controlnets[0].preprocessor_params = Some(params);
        spec.output = Some(pb::OutputOptions {
            return_control_maps: true,
            embed_metadata: Some(false),
            ..Default::default()
        });
        let in_server = server.images(spec.clone()).await.expect("canny unit");
        if detect_resolution > 0 {
            // sd-webui-controlnet's parameters name the preprocessor's resolution.
            let mut with_metadata = spec.clone();
            with_metadata.output = None;
            let response = server.images(with_metadata).await.expect("canny unit");
            let text = common::png_parameters(&response.images[0].data);
            let module = "Module: canny, Threshold A: 60, Threshold B: 140, Processor Res: 128,";
            assert!(text.contains(module), "{text}");
        }
        let used = &in_server.control_maps[0];
        assert_eq!((used.width, used.height), (spec.width, spec.height));
        if detect_resolution == 0 {
            let map = decoded_image(&used.data);
            assert!(
                map.equal(&decoded_image(&preview.control_map)),
                "the maps differ"
            );
        } else {
            let short = preview.width.min(preview.height);
            assert_eq!(
                short, detect_resolution,
                "{}x{}",
                preview.width, preview.height
            );
        }
        spec.controlnets[0].image = preview.control_map;
        spec.controlnets[0].preprocessor = pb::Preprocessor::None as i32;
        // Canny's thresholds are Canny's only; the resolution changes nothing here.
        spec.controlnets[0].preprocessor_params = Some(pb::PreprocessorParams {
            detect_resolution,
            ..Default::default()
        });
        let given = server.images(spec).await.expect("map unit");
        assert_eq!(in_server.images[0].data, given.images[0].data);
    }
}

/// Tile resampling and blur on a union model make its tile condition: the image equals
/// the one made from the Preprocess RPC's map sent with CONTROL_TYPE_TILE, and another
/// type makes another image; an inverted image implies no type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tile_filters_on_a_union_model_make_its_tile_condition() {
    let root = controlnet_root();
    let server = server(root.path()).await;
    let photo = read(&fixtures().join("tiny2/init.png"));
    let filters = [
        (
            pb::Preprocessor::TileResample,
            Some(2.0),
            None,
            "Module: tile_resample, Threshold A: 2,",
        ),
        (
            pb::Preprocessor::Blur,
            None,
            None,
            "Module: blur_gaussian, Threshold A: 9,",
        ),
        (
            pb::Preprocessor::Blur,
            None,
            Some(2.5),
            "Module: blur_gaussian, Threshold A: 2.5,",
        ),
    ];
    for (preprocessor, rate, sigma, module) in filters {
        let params = pb::PreprocessorParams {
            down_sampling_rate: rate,
            blur_sigma: sigma,
            ..Default::default()
        };
        let preview = preprocessed(&server, &photo, preprocessor, &params).await;
        let mut spec = spec_of(&case("one_unit"));
        spec.num_images = 1;
        let unit = &mut spec.controlnets[0];
        unit.model = "union_xl".into();
        unit.image = photo.clone();
        unit.preprocessor = preprocessor as i32;
        unit.preprocessor_params = Some(params);
        let filtered = server.images(spec.clone()).await.expect("filter unit");
        let text = common::png_parameters(&filtered.images[0].data);
        assert!(text.contains(module), "{text}");
        let image = |response: &pb::GenerateImagesResponse| decoded_image(&response.images[0].data);
        let unit = &mut spec.controlnets[0];
        unit.image = preview.control_map;
        unit.preprocessor = pb::Preprocessor::None as i32;
        unit.preprocessor_params = None;
        unit.control_type = pb::ControlType::Tile as i32;
        let given = server.images(spec.clone()).await.expect("map unit");
        assert!(image(&filtered).equal(&image(&given)), "{module}");
        spec.controlnets[0].control_type = pb::ControlType::CannyLineart as i32;
        let lines = server.images(spec).await.expect("map unit");
        assert!(
            !image(&filtered).equal(&image(&lines)),
            "{module}: the type changes nothing"
        );
    }
    let mut spec = spec_of(&case("one_unit"));
    spec.num_images = 1;
    spec.controlnets[0].model = "union_xl".into();
    spec.controlnets[0].preprocessor = pb::Preprocessor::Invert as i32;
    let status = server.images(spec.clone()).await.expect_err("no type");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        ["spec.controlnets[0].control_type"]
    );
    spec.controlnets[0].control_type = pb::ControlType::CannyLineart as i32;
    let inverted = server.images(spec).await.expect("inverted unit");
    let text = common::png_parameters(&inverted.images[0].data);
    assert!(text.contains("Module: invert, Model: union_xl"), "{text}");
}

/// A recolor unit uses the map the Preprocess RPC returns, records its module and gamma
/// as sd-webui-controlnet does, and on a union model needs a control type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recolor_unit_equals_its_preview_map_and_records_its_gamma() {
    let root = controlnet_root();
    let server = server(root.path()).await;
    let photo = read(&fixtures().join("tiny2/init.png"));
    let recolors = [
        (
            pb::Preprocessor::RecolorLuminance,
            Some(0.7),
            "Module: recolor_luminance, Threshold A: 0.7,",
        ),
        (
            pb::Preprocessor::RecolorIntensity,
            None,
            "Module: recolor_intensity, Threshold A: 1,",
        ),
    ];
    for (preprocessor, gamma, module) in recolors {
        let params = pb::PreprocessorParams {
            gamma_correction: gamma,
            ..Default::default()
        };
        let preview = preprocessed(&server, &photo, preprocessor, &params).await;
        let mut spec = spec_of(&case("one_unit"));
        spec.num_images = 1;
        let unit = &mut spec.controlnets[0];
        unit.image = photo.clone();
        unit.preprocessor = preprocessor as i32;
        unit.preprocessor_params = Some(params);
        let recoloured = server.images(spec.clone()).await.expect("recolor unit");
        let text = common::png_parameters(&recoloured.images[0].data);
        assert!(text.contains(module), "{text}");
        let mut given = spec.clone();
        let unit = &mut given.controlnets[0];
        unit.image = preview.control_map;
        unit.preprocessor = pb::Preprocessor::None as i32;
        unit.preprocessor_params = None;
        let given = server.images(given).await.expect("map unit");
        let image = |response: &pb::GenerateImagesResponse| decoded_image(&response.images[0].data);
        assert!(image(&recoloured).equal(&image(&given)), "{module}");
        let mut unprocessed = spec.clone();
        unprocessed.controlnets[0].preprocessor = pb::Preprocessor::None as i32;
        unprocessed.controlnets[0].preprocessor_params = None;
        let unprocessed = server.images(unprocessed).await.expect("photo unit");
        assert!(!image(&recoloured).equal(&image(&unprocessed)), "{module}");
        spec.controlnets[0].model = "union_xl".into();
        let status = server.images(spec).await.expect_err("no type");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            violated_fields(&status),
            ["spec.controlnets[0].control_type"]
        );
    }
}

/// Maps of extreme aspect (1 x 4,000,000 pixels and the transpose, within the image
/// limit) fit the output in every resize mode without their scaled whole (crop and resize
/// would scale the thin one to 64 x 256,000,000 first), and the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_of_extreme_aspect_fit_in_every_resize_mode() {
    let root = controlnet_root();
    // The default image limit (2048 x 2048 x 4 pixels).
    let pipeline = fixtures().join("tiny2/pipeline");
    let server = TestServer::start(&[
        (
            "SDXLD__ENGINE__DEFAULT_MODEL",
            pipeline.to_str().expect("utf-8"),
        ),
        (
            "SDXLD__MODELS__CONTROLNET_ROOTS",
            root.path().to_str().expect("utf-8"),
        ),
    ])
    .await;
    let mut spec = spec_of(&case("one_unit"));
    spec.num_images = 1;
    spec.steps = 1;
    spec.output = Some(pb::OutputOptions {
        return_control_maps: true,
        ..Default::default()
    });
    let size = (spec.width, spec.height);
    for (w, h) in [(1, 4_000_000), (4_000_000, 1)] {
        let thin =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([((x + y) / 3 % 256) as u8; 3]));
        let mut png = Vec::new();
        thin.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        for mode in [
            pb::ResizeMode::CropAndResize,
            pb::ResizeMode::ResizeAndFill,
            pb::ResizeMode::JustResize,
        ] {
            let mut spec = spec.clone();
            spec.controlnets[0].image = png.clone();
            spec.controlnets[0].resize_mode = mode as i32;
            let response = server
                .images(spec)
                .await
                .unwrap_or_else(|e| panic!("{w}x{h} {mode:?}: {e}"));
            let map = &response.control_maps[0];
            assert_eq!((map.width, map.height), size, "{w}x{h} {mode:?}");
        }
    }
    server.images(spec).await.expect("serving on");
}

#[test]
fn controlnet_over_the_cli_equals_diffusers() {
    let out = tempfile::tempdir().expect("tempdir");
    let dir = fixtures().join("tiny2");
    let cn = controlnet_fixtures().join("tiny2");
    let reference = read_tensors(&cn.join("cases.safetensors"));
    let unit = |folder: &str, image: &str, settings: &str| {
        let mut arg = format!("{},{}", cn.join(folder).display(), cn.join(image).display());
        if !settings.is_empty() {
            arg.push(',');
            arg.push_str(settings);
        }
        arg
    };
    let png = out.path().join("inpaint.png");
    sdxld("generate")
        .args([
            "--prompt",
            "a house by a lake",
            "--seed",
            "42",
            "--steps",
            "8",
        ])
        .args([
            "--guidance",
            "5",
            "--scheduler",
            "euler",
            "--strength",
            "0.75",
        ])
        .flag("--init-image", dir.join("init.png"))
        .flag("--mask", dir.join("mask.png"))
        .flag("--controlnet", unit("own", "control_b.png", "scale=0.9"))
        .flag("--model", dir.join("pipeline"))
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI inpaint with a ControlNet",
        &common::image_file(&png),
        &reference["inpaint.images"].get(0),
    );
    let png = out.path().join("two.png");
    sdxld("generate")
        .args([
            "--prompt",
            "a house by a lake",
            "--negative-prompt",
            "blurry",
        ])
        .args([
            "--seed",
            "42",
            "--steps",
            "6",
            "--guidance",
            "5",
            "--scheduler",
            "euler",
        ])
        .args(["--width", "64", "--height", "64"])
        .flag(
            "--controlnet",
            unit("from_unet", "control_a.png", "scale=0.8"),
        )
        .flag(
            "--controlnet",
            unit("own", "control_b.png", "scale=0.6,end=0.5"),
        )
        .flag("--model", dir.join("pipeline"))
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI two units",
        &common::image_file(&png),
        &reference["two_units.images"].get(0),
    );
    let png = out.path().join("union.png");
    sdxld("generate")
        .args([
            "--prompt",
            "a house by a lake",
            "--seed",
            "42",
            "--steps",
            "6",
        ])
        .args(["--guidance", "5", "--scheduler", "euler"])
        .args(["--width", "64", "--height", "64"])
        .flag(
            "--controlnet",
            unit(
                "union",
                "control_a.png",
                "type=canny,scale=0.8,start=0.1,end=0.9",
            ),
        )
        .flag("--model", dir.join("pipeline"))
        .flag("--output", &png)
        .succeeds();
    assert_images_match(
        "CLI union unit",
        &common::image_file(&png),
        &reference["union_one.images"].get(0),
    );
    let stderr = sdxld("generate")
        .args(["--prompt", "x", "--steps", "1"])
        .flag("--controlnet", unit("own", "control_b.png", "scale=3"))
        .flag("--model", dir.join("pipeline"))
        .flag("--output", out.path().join("x.png"))
        .fails();
    assert!(stderr.contains("--controlnet"), "{stderr}");
}
