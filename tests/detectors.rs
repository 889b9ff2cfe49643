//! Preprocessor networks against their reference implementations (controlnet_aux
//! 0.0.10) on random weights built by `tests/fixtures/make_detector_fixtures.py`: the
//! same inputs through both, outputs within 1e-3 relative at several sizes (odd ones
//! change the size as the reference's strided stages do), the whole detector's 8-bit
//! map, and files of another network refused naming the tensor that is missing.

use crate::common;

use common::{assert_close, assert_io_cases, detector_fixtures, read_tensors};
use sdxld::engine::error::EngineError;
use sdxld::engine::preprocess::lineart::LineartGenerator;
use tch::{Device, Kind};

const LINEART: [&str; 2] = ["lineart_3", "lineart_2"];

#[test]
fn the_lineart_generator_equals_controlnet_aux() {
    let root = detector_fixtures().join("lineart");
    for name in LINEART {
        let network = LineartGenerator::load(
            &root.join(format!("{name}.safetensors")),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_tensors(&root.join(format!("{name}.io.safetensors")));
        let cases = io.keys().filter(|k| k.starts_with("input.")).count();
        assert_eq!(cases, 3, "{name}: three input sizes");
        assert_io_cases(name, &io, cases, |x| {
            network.forward(x, &mut || Ok(())).expect("a pass")
        });
    }
}

#[test]
fn the_lineart_detectors_map_equals_controlnet_aux() {
    let root = detector_fixtures();
    let photo = image::open(root.join("images/photo.png"))
        .expect("photo")
        .to_rgb8();
    for name in LINEART {
        let network = LineartGenerator::load(
            &root.join(format!("lineart/{name}.safetensors")),
            Device::Cpu,
            Kind::Float,
        )
        .expect("load");
        // A stop asked between the generator's stages and blocks ends the map there.
        let map = common::assert_stops_between_passes(name, 4, |between| {
            network.detect_between(&photo, between)
        });
        let expected = image::open(root.join(format!("lineart/{name}_map.png")))
            .expect("map")
            .to_rgb8();
        assert_eq!(map.dimensions(), expected.dimensions());
        // Truncation to 8 bits may flip a level where float sums differ in the last bit.
        let mut off = 0;
        for (got, want) in map.pixels().zip(expected.pixels()) {
            let diff = got[0].abs_diff(want[0]);
            assert!(diff <= 1, "{name}: a pixel differs by {diff}");
            off += usize::from(diff > 0);
        }
        assert!(off * 1000 <= map.len(), "{name}: {off} pixels differ");
        assert!(
            expected.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
            "a grey map"
        );
        // Sides that are no multiples of 4: the network's 52×36 map fitted back to 50×34
        // with OpenCV's INTER_LINEAR, then inverted.
        let odd = image::open(root.join("images/photo_odd.png"))
            .expect("photo")
            .to_rgb8();
        let map = network.detect(&odd).expect("detect");
        let expected = image::open(root.join(format!("lineart/{name}_map_odd.png")))
            .expect("map")
            .to_rgb8();
        assert_eq!(map.dimensions(), (50, 34));
        let most = map
            .pixels()
            .zip(expected.pixels())
            .map(|(g, w)| g[0].abs_diff(w[0]))
            .max();
        assert!(most <= Some(1), "{name} odd: differs by {most:?}");
    }
}

#[test]
fn a_file_of_another_network_is_refused_naming_the_missing_tensor() {
    let root = detector_fixtures().join("lineart");
    let other = common::hires_fixtures().join("upscalers/hires_compact_x4.safetensors");
    match LineartGenerator::load(&other, Device::Cpu, Kind::Float) {
        Err(EngineError::MissingTensor { name, .. }) => assert_eq!(name, "model0.1.weight"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("an upscaler loaded as a line-art network"),
    }
    // A truncated file names itself.
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(root.join("lineart_2.safetensors")).expect("read");
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let error = LineartGenerator::load(&truncated, Device::Cpu, Kind::Float)
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("truncated.safetensors"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessor_networks_are_listed_loaded_and_refused_by_what_they_hold() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;
    use tonic::Code;

    let dir = tempfile::tempdir().expect("tempdir");
    let lineart = detector_fixtures().join("lineart/lineart_3.safetensors");
    std::fs::copy(&lineart, dir.path().join("lineart_realistic.safetensors")).expect("copy");
    let foreign = common::hires_fixtures().join("upscalers/hires_compact_x4.safetensors");
    std::fs::copy(&foreign, dir.path().join("not_a_detector.safetensors")).expect("copy");
    let roots = dir.path().to_str().expect("utf-8");
    let server = TestServer::start(&[
        ("SDXLD__MODELS__PREPROCESSOR_ROOTS", roots),
        ("SDXLD__SERVER__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
    ])
    .await;
    let listed = server.list_models(pb::ModelKind::Preprocessor).await;
    let info = |name: &str| {
        listed
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.preprocessor.clone())
            .unwrap_or_else(|| panic!("{name} is not listed"))
    };
    assert_eq!(info("lineart_realistic").network, "lineart");
    let foreign_info = info("not_a_detector");
    assert!(foreign_info.network.is_empty());
    assert!(
        foreign_info.error.contains("not_a_detector") && foreign_info.error.contains("body.0"),
        "{}",
        foreign_info.error
    );
    assert!(!foreign_info.error.contains(roots), "no server path");
    let mut models = server.models().await;
    let load = |name: &str| pb::LoadModelRequest {
        name: name.into(),
        kind: pb::ModelKind::Preprocessor as i32,
    };
    let loaded = models
        .load_model(load("lineart_realistic"))
        .await
        .expect("loads")
        .into_inner()
        .model
        .expect("model");
    assert!(loaded.resident);
    let status = models
        .load_model(load("not_a_detector"))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("body.0"), "{}", status.message());
    // The server serves on.
    server
        .images(common::server::quick_spec(1))
        .await
        .expect("a generation");
}

const LINEART_ANIME: [&str; 2] = ["lineart_anime_8", "lineart_anime_6"];

#[test]
fn the_anime_lineart_unet_equals_controlnet_aux() {
    use sdxld::engine::preprocess::detector::{network_of, DetectorNetwork};
    use sdxld::engine::preprocess::lineart_anime::LineartAnimeUnet;
    let root = detector_fixtures().join("lineart_anime");
    for (name, levels) in LINEART_ANIME.into_iter().zip([8, 6]) {
        let path = root.join(format!("{name}.safetensors"));
        assert_eq!(
            network_of(&path).expect("known"),
            DetectorNetwork::LineartAnime
        );
        let network = LineartAnimeUnet::load(&path, Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(network.depth(), levels, "{name}");
        let io = read_tensors(&root.join(format!("{name}.io.safetensors")));
        assert_io_cases(name, &io, 2, |x| {
            network.forward(x, &mut || Ok(())).expect("a pass")
        });
    }
    // The whole detector: at its network's size, and at sizes it resizes to 256 and back
    // with bicubic (64×64 as resize_image hands it, 50×34 as a unit without a detect
    // resolution may).
    let network = LineartAnimeUnet::load(
        &root.join("lineart_anime_8.safetensors"),
        Device::Cpu,
        Kind::Float,
    )
    .expect("load");
    for (photo, map) in [
        ("photo256.png", "lineart_anime_8_map.png"),
        ("photo.png", "lineart_anime_8_map64.png"),
        ("photo_odd.png", "lineart_anime_8_map_odd.png"),
    ] {
        let photo = image::open(detector_fixtures().join("images").join(photo))
            .expect("photo")
            .to_rgb8();
        // A stop asked before any of the U-Net's levels ends the map there.
        let got = common::assert_stops_between_passes(map, 2, |between| {
            network.detect_between(&photo, between)
        });
        let expected = image::open(root.join(map)).expect("map").to_rgb8();
        assert_eq!(got.dimensions(), expected.dimensions(), "{map}");
        let mut off = 0;
        for (got, want) in got.pixels().zip(expected.pixels()) {
            let diff = got[0].abs_diff(want[0]);
            assert!(diff <= 1, "{map}: a pixel differs by {diff}");
            off += usize::from(diff > 0);
        }
        // Float sums in another order flip a truncation now and then (OpenCV's IPP bicubic
        // and the network alike); at most one pixel in a hundred, by one level.
        assert!(off * 100 <= got.len(), "{map}: {off} pixels differ");
    }
}

const HED: [&str; 2] = ["full", "narrow"];

#[test]
fn the_hed_network_and_its_soft_edges_equal_controlnet_aux() {
    use sdxld::engine::preprocess::detector::{network_of, DetectorNetwork};
    use sdxld::engine::preprocess::hed::Hed;
    let root = detector_fixtures();
    for name in HED {
        let path = root.join(format!("hed/{name}.safetensors"));
        assert_eq!(network_of(&path).expect("known"), DetectorNetwork::Hed);
        let network =
            Hed::load(&path, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_tensors(&root.join(format!("hed/{name}.io.safetensors")));
        for k in 0..3 {
            let got = network
                .forward(&io[&format!("input.{k}")], &mut || Ok(()))
                .expect("a pass");
            assert_eq!(got.len(), 5, "{name}: five side outputs");
            for (j, edges) in got.iter().enumerate() {
                assert_close(
                    &format!("{name} input {k} side {j}"),
                    edges,
                    &io[&format!("output.{k}.{j}")],
                );
            }
        }
        for (photo, map) in [("photo.png", "map"), ("photo_odd.png", "map_odd")] {
            let photo = image::open(root.join("images").join(photo))
                .expect("photo")
                .to_rgb8();
            // A stop asked between the blocks ends the map there.
            let got = common::assert_stops_between_passes(name, 5, |between| {
                network.detect_levels(&photo, 0, between)
            });
            let want = image::open(root.join(format!("hed/{name}_{map}.png")))
                .expect("map")
                .to_luma8();
            assert_eq!(got.dimensions(), want.dimensions(), "{name} {map}");
            let mut off = 0;
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.abs_diff(*w) <= 1, "{name} {map}: {g} against {w}");
                off += usize::from(g != w);
            }
            assert!(off * 100 <= got.len(), "{name} {map}: {off} pixels differ");
            let distinct: std::collections::HashSet<u8> = got.iter().copied().collect();
            assert!(
                distinct.len() > 32,
                "{name} {map}: soft edges, not a saturated map"
            );
        }
        // safe=True: three levels; an edge a bit from a step may land on its other side.
        let photo = image::open(root.join("images/photo.png")).expect("photo");
        let got = network
            .detect_levels(&photo.to_rgb8(), 2, &mut || Ok(()))
            .expect("safe");
        let want = image::open(root.join(format!("hed/{name}_safe.png")))
            .expect("map")
            .to_luma8();
        assert!(got.iter().all(|v| [0, 127, 255].contains(v)), "{name} safe");
        let off = got.iter().zip(want.iter()).filter(|(g, w)| g != w).count();
        assert!(off * 100 <= got.len(), "{name} safe: {off} pixels differ");
        assert!(got.contains(&127) && got.iter().any(|&v| v != 127));
    }
}

#[test]
fn scribbles_equal_controlnet_aux() {
    use sdxld::engine::preprocess::detector::Detector;
    use sdxld::engine::preprocess::scribble::scribble;
    use sdxld::engine::preprocess::{Networks, Preprocessing, Preprocessor};
    let root = detector_fixtures();
    let compare = |what: &str, got: &image::GrayImage, want: &image::GrayImage| {
        assert_eq!(got.dimensions(), want.dimensions(), "{what}");
        let off = got.iter().zip(want.iter()).filter(|(g, w)| g != w).count();
        // The float blur before the thinning may round differently in its last bits from
        // OpenCV's vectorised one; a flipped maximum would move a stroke's edge (none
        // does on these images).
        assert!(off * 400 <= got.len(), "{what}: {off} pixels differ");
        assert!(
            got.iter().all(|&v| v == 0 || v == 255),
            "{what}: black and white"
        );
        assert!(got.contains(&255), "{what}: some strokes");
    };
    for name in HED {
        // The post-processing alone, on the reference's soft edges.
        for suffix in ["", "_odd"] {
            let soft = image::open(root.join(format!("hed/{name}_map{suffix}.png")))
                .expect("soft")
                .to_luma8();
            let want = image::open(root.join(format!("hed/{name}_scribble{suffix}.png")))
                .expect("scribble")
                .to_luma8();
            compare(
                &format!("{name}{suffix} post-processing"),
                &scribble(&soft),
                &want,
            );
        }
        // The whole preprocessor.
        let detector = Detector::load(
            &root.join(format!("hed/{name}.safetensors")),
            Device::Cpu,
            Kind::Float,
        )
        .expect("load");
        let photo = image::open(root.join("images/photo.png")).expect("photo");
        let preprocessing = Preprocessing {
            preprocessor: Preprocessor::Scribble,
            detect_resolution: Some(64),
        };
        let map = preprocessing
            .run(&photo, Networks::detector(Some(&detector)))
            .expect("scribble");
        let want = image::open(root.join(format!("hed/{name}_scribble.png")))
            .expect("scribble")
            .to_luma8();
        compare(
            &format!("{name} scribble"),
            &image::DynamicImage::ImageRgb8(map).to_luma8(),
            &want,
        );
    }
}

#[test]
fn the_openpose_body_network_equals_controlnet_aux() {
    use sdxld::engine::preprocess::openpose::BodyPose;
    let root = detector_fixtures().join("openpose");
    for name in ["wide", "narrow"] {
        let network = BodyPose::load(
            &root.join(format!("{name}.safetensors")),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_tensors(&root.join(format!("{name}.io.safetensors")));
        for k in 0..3 {
            let (pafs, heatmaps) = network
                .forward(&io[&format!("input.{k}")], &mut || Ok(()))
                .expect("a pass");
            assert_close(
                &format!("{name} input {k} affinities"),
                &pafs,
                &io[&format!("pafs.{k}")],
            );
            assert_close(
                &format!("{name} input {k} heatmaps"),
                &heatmaps,
                &io[&format!("heatmaps.{k}")],
            );
        }
    }
}

#[test]
fn openpose_decoding_finds_the_people_controlnet_aux_finds() {
    use sdxld::engine::preprocess::pose_decode::{decode, PoseMaps};
    let io = read_tensors(&detector_fixtures().join("openpose/decode.safetensors"));
    let floats = |name: &str| Vec::<f64>::try_from(io[name].contiguous().view(-1)).expect("f64");
    let size = io["heatmaps"].size();
    let (heatmaps, affinities) = (floats("heatmaps"), floats("pafs"));
    let maps = PoseMaps {
        width: size[1] as usize,
        height: size[0] as usize,
        heatmaps: &heatmaps,
        affinities: &affinities,
    };
    let (candidates, people) = decode(&maps);
    let expected = floats("candidate");
    assert_eq!(candidates.len() * 4, expected.len(), "every part candidate");
    for (c, want) in candidates.iter().zip(expected.chunks(4)) {
        assert_eq!(
            [c.x, c.y, c.score, c.id as f64],
            [want[0], want[1], want[2], want[3]]
        );
    }
    let expected = floats("subset");
    assert_eq!(people.len() * 20, expected.len(), "the same people");
    assert_eq!(people.len(), 4);
    for (person, want) in people.iter().zip(expected.chunks(20)) {
        assert_eq!(
            person.parts.as_slice(),
            &want[..18],
            "the same candidates per part"
        );
        assert!(
            (person.score - want[18]).abs() < 1e-9,
            "{} against {}",
            person.score,
            want[18]
        );
        assert_eq!(person.count, want[19]);
    }
}

#[test]
fn opencv_limbs_and_joints_are_drawn_pixel_for_pixel() {
    use sdxld::engine::preprocess::pose_draw::{ellipse_polygon, fill_circle, fill_convex_polygon};
    let io = read_tensors(&detector_fixtures().join("openpose/draw.safetensors"));
    let ints = |name: &str| Vec::<i32>::try_from(io[name].contiguous().view(-1)).expect("i32");
    let (limbs, polygons, joints) = (ints("limbs"), ints("polygons"), ints("joints"));
    let mut canvas = image::RgbImage::new(120, 90);
    let colour = |c: &[i32]| [c[0] as u8, c[1] as u8, c[2] as u8];
    for (limb, expected) in limbs.chunks(7).zip(polygons.chunks(800)) {
        let polygon = ellipse_polygon((limb[0], limb[1]), (limb[2], 4), limb[3]);
        let want: Vec<(i32, i32)> = expected
            .chunks(2)
            .take_while(|p| p[0] != -99999)
            .map(|p| (p[0], p[1]))
            .collect();
        assert_eq!(polygon, want, "ellipse2Poly of {limb:?}");
        fill_convex_polygon(&mut canvas, &polygon, colour(&limb[4..]));
    }
    for joint in joints.chunks(6) {
        fill_circle(
            &mut canvas,
            (joint[0], joint[1]),
            joint[2],
            colour(&joint[3..]),
        );
    }
    let want = Vec::<u8>::try_from(io["canvas"].contiguous().view(-1)).expect("u8");
    let differing = canvas
        .as_raw()
        .chunks(3)
        .zip(want.chunks(3))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "pixels unlike OpenCV's");
}

#[test]
fn the_openpose_pipeline_draws_the_people_controlnet_aux_draws() {
    use sdxld::engine::preprocess::pose::{draw_people, network_input, pose_maps};
    let root = detector_fixtures().join("openpose");
    for case in ["landscape", "small", "portrait"] {
        let image = image::open(root.join(format!("pipeline_{case}.png")))
            .expect("image")
            .to_rgb8();
        let io = read_tensors(&root.join(format!("pipeline_{case}.safetensors")));
        let (input, geometry) = network_input(&image).expect("input");
        assert_eq!(
            input.size(),
            io["input"].size(),
            "{case}: the network's input size"
        );
        let most = (&input - &io["input"]).abs().max().double_value(&[]);
        assert_eq!(most, 0.0, "{case}: the network's input");
        let maps = pose_maps(&io["pafs"], &io["heatmaps"], geometry).expect("maps");
        let smoothed =
            Vec::<f64>::try_from(io["smoothed_input"].contiguous().view(-1)).expect("f64");
        let heatmaps: Vec<f64> = maps
            .heatmaps
            .chunks(19)
            .flat_map(|pixel| pixel[..18].iter().copied())
            .collect();
        assert_eq!(
            heatmaps.len(),
            smoothed.len(),
            "{case}: heatmaps at the image size"
        );
        let off = heatmaps
            .iter()
            .zip(&smoothed)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(off, 0, "{case}: heatmap values unlike the reference's");
        let (width, height) = geometry.image;
        let (candidates, people) = maps.decode();
        let subset = Vec::<f64>::try_from(io["subset"].contiguous().view(-1)).expect("f64");
        assert_eq!(people.len() * 20, subset.len(), "{case}: the same people");
        for (person, want) in people.iter().zip(subset.chunks(20)) {
            assert_eq!(
                person.parts.as_slice(),
                &want[..18],
                "{case}: the same parts"
            );
        }
        let map = draw_people(&candidates, &people, width, height);
        let reference = root.join(format!("pipeline_{case}_map.png"));
        common::assert_same_map(&format!("{case}: pose map"), &map, &reference);
    }
}

#[test]
fn the_normal_bae_network_and_its_map_equal_controlnet_aux() {
    use sdxld::engine::preprocess::normal_bae::{NormalBae, NormalDetector};
    let root = detector_fixtures().join("normal");
    for name in ["wide", "narrow"] {
        let path = root.join(format!("{name}.safetensors"));
        let network = NormalBae::load(&path, Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_tensors(&root.join(format!("{name}.io.safetensors")));
        for k in 0..3 {
            let (coarse, fine) = network
                .forward(&io[&format!("input.{k}")], &mut || Ok(()))
                .expect("a pass");
            assert_close(
                &format!("{name} {k} coarse"),
                &coarse,
                &io[&format!("coarse.{k}")],
            );
            assert_close(
                &format!("{name} {k} normals"),
                &fine,
                &io[&format!("output.{k}")],
            );
        }
        let detector = NormalDetector::load(&path, Device::Cpu, Kind::Float).expect("detector");
        let photo = image::open(detector_fixtures().join("images/photo.png"))
            .expect("photo")
            .to_rgb8();
        // A stop asked between the encoder's blocks ends the map there.
        let map = common::assert_stops_between_passes(name, 4, |between| {
            detector.detect_between(&photo, between)
        });
        let want = image::open(root.join(format!("{name}_map.png")))
            .expect("map")
            .to_rgb8();
        let (mut off, mut most) = (0, 0);
        for (g, w) in map.as_raw().iter().zip(want.as_raw()) {
            most = most.max(g.abs_diff(*w));
            off += usize::from(g != w);
        }
        assert!(
            most <= 1 && off * 100 <= want.as_raw().len(),
            "{name}: {off} values differ, by up to {most}"
        );
    }
}
