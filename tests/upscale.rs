//! Upscalers against spandrel (the loader A1111 and ComfyUI use) on random weights in
//! every published key layout: the same architecture, scale and sizes detected, the
//! same output on whole images, Real-ESRGAN's tiling reproduced, blended overlapping
//! tiles equal to the whole image where they have the network's context (refusals are
//! in `upscale_refusals.rs`).

use crate::common;

use std::path::{Path, PathBuf};

use sdxld::engine::checkpoint::Between;
use sdxld::engine::error::EngineError;
use sdxld::engine::noise::{NoiseStream, SideGenerator};
use sdxld::engine::pixels::unit_range as to_tensor;
use sdxld::engine::upscale::layout::Architecture;
use sdxld::engine::upscale::tiles::{self, Checkpoint, Tiling};
use sdxld::engine::upscale::{UpscaleNoise, Upscaler};
use tch::{Device, Kind, Tensor};

pub(crate) fn cases() -> (PathBuf, Vec<serde_json::Value>) {
    let root = common::upscaler_fixtures();
    let text = std::fs::read_to_string(root.join("cases.json")).expect("cases.json");
    (root, serde_json::from_str(&text).expect("json"))
}

/// The network's pass over `image`, never stopped, any noise drawn from seed 0.
fn pass(upscaler: &Upscaler, image: &Tensor) -> Tensor {
    seeded_pass(upscaler, image, 0, &mut || Ok(())).expect("a pass")
}

/// The network's pass over `image`, any noise drawn from a generator at `seed` (as
/// `torch.manual_seed(seed)` before spandrel's call).
fn seeded_pass(
    upscaler: &Upscaler,
    image: &Tensor,
    seed: u64,
    between: &mut Between<'_>,
) -> Result<Tensor, EngineError> {
    let mut generator = SideGenerator::new(seed);
    let mut draw = |shape: &[i64]| generator.randn(&mut NoiseStream::lock(), shape);
    upscaler.forward(image, &mut draw, between)
}

/// The seed a case's reference drew its noise from (0 for networks that draw none).
fn seed_of(case: &serde_json::Value) -> u64 {
    case["seed"].as_u64().unwrap_or(0)
}

pub(crate) fn load(path: &Path) -> Upscaler {
    Upscaler::load(path, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The input as the server decodes it: grey to RGB, alpha composited over white.
fn input(path: &Path) -> image::RgbImage {
    sdxld::engine::preprocess::hwc3(&image::open(path).expect("png"))
}

/// The largest difference between two images of one size, in 8-bit levels, and how many
/// values differ.
fn difference(a: &image::RgbImage, b: &image::RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let pairs = a.as_raw().iter().zip(b.as_raw());
    let largest = pairs
        .clone()
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    (largest, pairs.filter(|(x, y)| x != y).count())
}

#[test]
fn every_layout_is_detected_as_spandrel_detects_it_and_computes_the_same_image() {
    let (root, models) = cases();
    assert_eq!(models.len(), 113);
    for model in &models {
        let upscaler = load(&root.join(model["model"].as_str().expect("model")));
        let architecture = upscaler.architecture();
        let id = match architecture {
            Architecture::Rrdb { .. } => "ESRGAN",
            Architecture::Compact { .. } => "Compact",
            Architecture::Span { .. } => "SPAN",
            Architecture::Plksr { .. } | Architecture::RealPlksr { .. } => "PLKSR",
            Architecture::Safmn { .. } => "SAFMN",
            Architecture::MoSr { .. } => "MoSR",
            Architecture::SwinIr { .. } => "SwinIR",
            Architecture::Swin2Sr { .. } => "Swin2SR",
            Architecture::Hat { .. } => "HAT",
            Architecture::Atd { .. } => "ATD",
            Architecture::Dctlsa { .. } => "DCTLSA",
            Architecture::AuraSr(_) => "AuraSR",
            Architecture::Craft { .. } => "CRAFT",
            Architecture::MmRealSr { .. } => "MMRealSR",
            Architecture::Dat { .. } => "DAT",
            Architecture::Drct { .. } => "DRCT",
            Architecture::ScuNet { .. } => "SCUNet",
            Architecture::RealCugan { .. } => "RealCUGAN",
            Architecture::Rcan { .. } => "RCAN",
            Architecture::OmniSr { .. } => "OmniSR",
            Architecture::Rgt { .. } => "RGT",
            Architecture::Fdat { .. } => "FDAT",
            Architecture::Ditn { .. } => "DITN",
            Architecture::SafmnBcie { .. } => "SAFMNBCIE",
            Architecture::MoEsr { .. } => "MoESR",
            Architecture::SwiftSrgan { .. } => "SwiftSRGAN",
            Architecture::DnCnn { .. } => "DnCNN",
            Architecture::DrUnet { .. } => "DRUNet",
            Architecture::Fbcnn { .. } => "FBCNN",
            Architecture::NafNet { .. } => "NAFNet",
            Architecture::SeemoRe { .. } => "SeemoRe",
        };
        assert_eq!(id, model["architecture"], "{model}");
        assert_eq!(upscaler.scale(), model["scale"].as_i64().expect("scale"));
        let expected: Vec<String> = serde_json::from_value(model["tags"].clone()).expect("tags");
        assert_eq!(architecture.tags(), expected);
        for case in model["cases"].as_array().expect("cases") {
            let file = |key: &str| root.join(case[key].as_str().expect(key));
            let image = input(&file("image"));
            let raw = Tensor::read_safetensors(file("raw")).expect("raw");
            let reference = &raw[0].1;
            let seed = seed_of(case);
            let output =
                seeded_pass(&upscaler, &to_tensor(&image), seed, &mut || Ok(())).expect("a pass");
            assert_eq!(output.size(), reference.size(), "{case}");
            let largest = f64::try_from((&output - reference).abs().max()).expect("max");
            let range = f64::try_from(reference.abs().max()).expect("max");
            assert!(largest <= 1e-3 * range, "{case}: {largest} of {range}");
            // The same 8-bit image (a rounding boundary may fall either way).
            let whole = Tiling {
                tile: 0,
                pad: 0,
                overlap: 0,
            };
            let upscaled = upscaler
                .upscale(&image, whole, UpscaleNoise::seeded(seed), &mut |_| Ok(()))
                .expect("upscale");
            let expected = image::open(file("whole")).expect("png").to_rgb8();
            let (largest, _) = difference(&upscaled, &expected);
            assert!(largest <= 1, "{case}: {largest} levels");
        }
    }
}

#[test]
fn tiles_follow_real_esrgan() {
    let (root, models) = cases();
    for model in &models {
        let upscaler = load(&root.join(model["model"].as_str().expect("model")));
        for case in model["cases"].as_array().expect("cases") {
            let file = |key: &str| root.join(case[key].as_str().expect(key));
            let image = input(&file("image"));
            let tile = case["tile"].as_i64().expect("tile");
            let pad = case["tile_pad"].as_i64().expect("tile_pad");
            let mut reported = Vec::new();
            let tiling = Tiling {
                tile,
                pad,
                overlap: 0,
            };
            let noise = UpscaleNoise::seeded(seed_of(case));
            let tiled = upscaler
                .upscale(&image, tiling, noise, &mut |checkpoint| {
                    if let Checkpoint::Tile { done, total } = checkpoint {
                        reported.push((done, total));
                    }
                    Ok(())
                })
                .expect("tiled");
            let expected = image::open(file("tiled")).expect("png").to_rgb8();
            let (largest, _) = difference(&tiled, &expected);
            assert!(largest <= 1, "{case}: {largest} levels");
            // Progress before each tile and after the last.
            let (w, h) = (i64::from(image.width()), i64::from(image.height()));
            let count = (((w + tile - 1) / tile) * ((h + tile - 1) / tile)) as usize;
            let steps: Vec<_> = (0..=count).map(|i| (i, count)).collect();
            assert_eq!(reported, steps, "{case}");
        }
    }
}

/// Where each tile has as much context as the network can see (SRVGGNetCompact with four
/// 3x3 convolutions: 4 pixels), tiles blended over any overlap give the whole image's
/// output: the blend weights sum to one and every tile lands in its place.
#[test]
fn with_enough_context_blended_tiles_equal_the_whole_image() {
    let (root, models) = cases();
    let model = models
        .iter()
        .find(|m| m["model"] == "models/compact_x2.safetensors")
        .expect("compact_x2");
    let upscaler = load(&root.join(model["model"].as_str().expect("model")));
    let mut network =
        |tile: &Tensor, between: &mut Between<'_>| seeded_pass(&upscaler, tile, 0, between);
    for case in model["cases"].as_array().expect("cases") {
        let file = |key: &str| root.join(case[key].as_str().expect(key));
        let image = to_tensor(&input(&file("image")));
        let raw = Tensor::read_safetensors(file("raw")).expect("raw");
        let whole = &raw[0].1;
        for (tile, overlap) in [(5, 2), (4, 1), (7, 3), (6, 0)] {
            let tiling = Tiling {
                tile,
                pad: 4,
                overlap,
            };
            let tiled =
                tiles::run(&image, 2, tiling, &mut network, &mut |_| Ok(())).expect("tiled");
            let largest = f64::try_from((&tiled - whole).abs().max()).expect("max");
            assert!(largest < 1e-4, "{case} {tiling:?}: {largest}");
        }
        // With too little context the tiles differ from the whole image.
        let short = Tiling {
            tile: 5,
            pad: 1,
            overlap: 2,
        };
        let tiled = tiles::run(&image, 2, short, &mut network, &mut |_| Ok(())).expect("tiled");
        let largest = f64::try_from((&tiled - whole).abs().max()).expect("max");
        assert!(largest > 1e-3, "{case}: {largest}");
    }
}

/// The first fixture's upscaler, an odd-sized image and a tiling of it in 8-pixel tiles.
fn first_model_in_tiles() -> (Upscaler, image::RgbImage, Tiling) {
    let (root, models) = cases();
    let upscaler = load(&root.join(models[0]["model"].as_str().expect("model")));
    let image = input(&root.join("images/odd_21x13.png"));
    let tiling = Tiling {
        tile: 8,
        pad: 2,
        overlap: 0,
    };
    (upscaler, image, tiling)
}

#[test]
fn a_run_stops_between_tiles_when_asked() {
    let (upscaler, image, tiling) = first_model_in_tiles();
    let mut ran = 0;
    let stopped = upscaler.upscale(&image, tiling, UpscaleNoise::seeded(0), &mut |checkpoint| {
        let Checkpoint::Tile { done, .. } = checkpoint else {
            return Ok(());
        };
        ran = done;
        if done == 2 {
            Err(EngineError::InvalidRequest("stop".into()))
        } else {
            Ok(())
        }
    });
    assert!(stopped.is_err());
    assert_eq!(ran, 2);
}

/// The network's checks between its blocks reach the run's caller inside each tile, and
/// a stop there ends the run: no checkpoint after it.
#[test]
fn a_run_stops_inside_a_tile_when_asked() {
    let (upscaler, image, tiling) = first_model_in_tiles();
    let mut seen = Vec::new();
    upscaler
        .upscale(&image, tiling, UpscaleNoise::seeded(0), &mut |checkpoint| {
            seen.push(checkpoint);
            Ok(())
        })
        .expect("a run");
    let blocks = |tile: usize| {
        let start = seen
            .iter()
            .position(|c| matches!(c, Checkpoint::Tile { done, .. } if *done == tile))
            .expect("the tile");
        seen[start + 1..]
            .iter()
            .take_while(|c| **c == Checkpoint::Block)
            .count()
    };
    assert!(blocks(0) >= 1 && blocks(0) == blocks(1), "{seen:?}");
    // Stopped at the second tile's first block.
    let at = seen
        .iter()
        .position(|c| matches!(c, Checkpoint::Tile { done: 1, .. }))
        .expect("a second tile")
        + 1;
    let mut made = 0;
    let stopped = upscaler.upscale(&image, tiling, UpscaleNoise::seeded(0), &mut |_| {
        made += 1;
        match made > at {
            true => Err(EngineError::InvalidRequest("stop".into())),
            false => Ok(()),
        }
    });
    assert!(stopped.is_err());
    assert_eq!(made, at + 1);
}

/// Every network asks between its blocks whether to go on, so that a cancel ends a pass
/// within a block rather than at the end of a tile; a stop asked there ends the pass with
/// that error, and no block runs after it. The checks leave the output alone.
#[test]
fn every_network_stops_between_its_blocks_when_asked() {
    let (root, models) = cases();
    for model in &models {
        let name = model["model"].as_str().expect("model");
        let upscaler = load(&root.join(name));
        let case = &model["cases"][0];
        let image = to_tensor(&input(&root.join(case["image"].as_str().expect("image"))));
        let output = common::assert_stops_between_passes(name, 1, |between| {
            seeded_pass(&upscaler, &image, 0, between)
        });
        assert!(output.equal(&pass(&upscaler, &image)), "{name}");
    }
}

/// Every network takes images narrower than its windows, padding and levels (a pixel, a
/// row, a column), as the descriptor's padding lets spandrel take them: the output is
/// the image's size times the scale, every value finite.
#[test]
fn every_network_takes_a_pixel_a_row_and_a_column() {
    let (root, models) = cases();
    for model in &models {
        let name = model["model"].as_str().expect("model");
        let upscaler = load(&root.join(name));
        let scale = upscaler.scale();
        for (height, width) in [(1, 1), (1, 7), (5, 1)] {
            let pixels = 3 * height * width;
            let image = (Tensor::arange(pixels, (Kind::Float, Device::Cpu)) / pixels as f64)
                .view([1, 3, height, width]);
            let output = seeded_pass(&upscaler, &image, 0, &mut || Ok(()))
                .unwrap_or_else(|e| panic!("{name} {height}x{width}: {e}"));
            assert_eq!(
                output.size(),
                [1, 3, height * scale, width * scale],
                "{name}"
            );
            let finite = bool::try_from(output.isfinite().all()).expect("bool");
            assert!(finite, "{name} {height}x{width}");
        }
    }
}

/// SwinIR pads to whole windows by reflection; a side too short to reflect is
/// replicated (spandrel fails there): a one-pixel image gives what the same colour over
/// a whole window gives.
#[test]
fn swinir_takes_images_narrower_than_its_padding() {
    let (root, _) = cases();
    let upscaler = load(&root.join("models/swinir_x4_nearest_3conv.safetensors"));
    let colour = Tensor::from_slice(&[0.8f32, 0.3, 0.1]).view([1, 3, 1, 1]);
    let pixel = pass(&upscaler, &colour);
    assert_eq!(pixel.size(), [1, 3, 4, 4]);
    let window = pass(&upscaler, &colour.expand([1, 3, 8, 8], false));
    let corner = window.narrow(2, 0, 4).narrow(3, 0, 4);
    let largest = f64::try_from((&pixel - &corner).abs().max()).expect("max");
    assert!(largest < 1e-5, "{largest}");
    let strip = common::random_unit(&[1, 3, 2, 9], 1);
    let output = pass(&upscaler, &strip);
    assert_eq!(output.size(), [1, 3, 8, 36]);
    assert!(bool::try_from(output.isfinite().all()).expect("finite"));
}

/// DAT pads its queries, keys and values with zeros to whole windows: a one-pixel image
/// and a strip narrower than a window come out at their size, finite.
#[test]
fn dat_takes_images_smaller_than_its_windows() {
    let (root, _) = cases();
    let upscaler = load(&root.join("models/dat_x3.safetensors"));
    for [height, width] in [[1, 1], [2, 9], [7, 1]] {
        let image = common::random_unit(&[1, 3, height, width], 2);
        let output = pass(&upscaler, &image);
        assert_eq!(output.size(), [1, 3, 3 * height, 3 * width]);
        assert!(bool::try_from(output.isfinite().all()).expect("finite"));
    }
}

/// SAFMN BCIE pools its unshuffled features to an eighth: spandrel pads to multiples of
/// 16 only, and fails where an unshuffle by 4 leaves sides under 8; sdxld pads such a
/// network to 32 at least, and a small or odd image comes out at its size, finite.
#[test]
fn safmn_bcie_pads_small_images_to_sides_its_coarsest_level_can_pool() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let source = root.join("models/safmnbcie_u2.safetensors");
    // The x2 unshuffle's layers widened for an unshuffle by 4.
    let widened = vec![
        (
            "params_ema.to_feat.1.weight",
            common::random_unit(&[16, 48, 3, 3], 3) - 0.5,
        ),
        (
            "params_ema.to_img.0.weight",
            common::random_unit(&[256, 16, 3, 3], 4) - 0.5,
        ),
        ("params_ema.to_img.0.bias", common::random_unit(&[256], 5)),
    ];
    let path =
        crate::upscale_refusals::rewrite(&source, &dir.path().join("u4.safetensors"), widened);
    let upscaler = load(&path);
    assert_eq!(upscaler.architecture().size_requirements().padded(5), 32);
    assert_eq!(upscaler.architecture().size_requirements().padded(33), 48);
    for [height, width] in [[1, 1], [5, 17], [16, 16], [33, 9]] {
        let image = common::random_unit(&[1, 3, height, width], 6);
        let output = pass(&upscaler, &image);
        assert_eq!(output.size(), [1, 3, height, width]);
        assert!(bool::try_from(output.isfinite().all()).expect("finite"));
    }
}

#[test]
fn params_ema_is_preferred_over_params() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = root.join("models/rrdb_x4_basicsr.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).expect("read");
    // A params copy of other shapes beside params_ema: ignored.
    let params: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.replace("params_ema.", "params."),
                t.narrow(0, 0, 1).copy(),
            )
        })
        .collect();
    tensors.extend(params);
    let both = dir.path().join("both.safetensors");
    Tensor::write_safetensors(&tensors, &both).expect("write");
    let image = to_tensor(&input(&root.join("images/grey_16x12.png")));
    let expected = pass(&load(&path), &image);
    let actual = pass(&load(&both), &image);
    assert!(actual.equal(&expected));
}

/// A file whose every name starts with `module.` (a data-parallel wrapper's), `netG.`
/// or both in that order computes what the file without them computes, as spandrel
/// removes those prefixes; a file where only some names have one is refused.
#[test]
fn wrapper_prefixes_are_removed_as_spandrel_removes_them() {
    let (root, _) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = root.join("models/drunet_strided.safetensors");
    let tensors = Tensor::read_safetensors(&path).expect("read");
    let image = to_tensor(&input(&root.join("images/odd_21x13.png")));
    let expected = pass(&load(&path), &image);
    for prefix in ["module.", "netG.", "module.netG."] {
        let wrapped: Vec<_> = tensors
            .iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t.shallow_clone()))
            .collect();
        let file = dir.path().join(format!("{prefix}safetensors"));
        Tensor::write_safetensors(&wrapped, &file).expect("write");
        assert!(pass(&load(&file), &image).equal(&expected), "{prefix}");
    }
    let partly: Vec<_> = tensors
        .iter()
        .enumerate()
        .map(|(i, (n, t))| match i {
            0 => (format!("module.{n}"), t.shallow_clone()),
            _ => (n.clone(), t.shallow_clone()),
        })
        .collect();
    let file = dir.path().join("partly.safetensors");
    Tensor::write_safetensors(&partly, &file).expect("write");
    assert!(Upscaler::load(&file, Device::Cpu, Kind::Float).is_err());
}

/// ListModels shows each upscaler's architecture, scale and tags; a file of no served
/// layout lists with the tensor that did not fit, named without the server's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_shows_each_upscalers_architecture_and_scale() {
    use sdxld::proto::v1 as pb;
    let (root, models) = cases();
    let dir = tempfile::tempdir().expect("tempdir");
    for model in &models {
        let file = model["model"].as_str().expect("model");
        let name = Path::new(file).file_name().expect("name");
        std::fs::copy(root.join(file), dir.path().join(name)).expect("copy");
    }
    let foreign = [(
        "encoder.weight",
        Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
    )];
    Tensor::write_safetensors(&foreign, dir.path().join("foreign.safetensors")).expect("write");
    let roots = dir.path().to_str().expect("utf-8");
    let server =
        common::server::TestServer::start(&[("SDXLD__MODELS__UPSCALER_ROOTS", roots)]).await;
    let listed = server.list_models(pb::ModelKind::Upscaler).await;
    assert_eq!(listed.len(), models.len() + 1);
    for model in &models {
        let file = Path::new(model["model"].as_str().expect("model"));
        let stem = file.file_stem().expect("stem").to_str().expect("utf-8");
        let info = listed
            .iter()
            .find(|m| m.name.starts_with(stem))
            .unwrap_or_else(|| panic!("{stem} not listed: {listed:?}"));
        let upscaler = info.upscaler.as_ref().expect("upscaler info");
        // spandrel's names, where they differ from its ids.
        let architecture = match model["architecture"].as_str() {
            Some("Compact") => "RealESRGAN Compact",
            Some("SwiftSRGAN") => "Swift-SRGAN",
            Some("SAFMNBCIE") => "SAFMN BCIE",
            other => other.expect("architecture"),
        };
        assert_eq!(upscaler.architecture, architecture);
        assert_eq!(
            i64::from(upscaler.scale),
            model["scale"].as_i64().expect("scale")
        );
        let tags: Vec<String> = serde_json::from_value(model["tags"].clone()).expect("tags");
        assert_eq!(upscaler.tags, tags);
    }
    let foreign = listed
        .iter()
        .find(|m| m.name.starts_with("foreign"))
        .and_then(|m| m.upscaler.clone())
        .expect("foreign listed");
    assert_eq!(foreign.architecture, "");
    assert!(foreign.error.contains("encoder.weight"), "{foreign:?}");
    assert!(!foreign.error.contains(roots), "{foreign:?}");
}
