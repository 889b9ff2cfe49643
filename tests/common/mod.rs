//! Shared helpers of the integration tests: the diffusers fixtures and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod certs;
pub mod cli;
pub mod edges;
mod fixture_dirs;
pub mod prompts;
pub mod raw;
pub mod server;

pub use fixture_dirs::*;
use tch::{Kind, Tensor};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A base-model root holding `broken`: the demo model with a UNet weight file of
/// garbage, which validates but fails when a job loads it.
pub fn broken_model_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let broken = root.path().join("broken");
    cli::sdxld("demo-model")
        .flag("--output", &broken)
        .succeeds();
    let weights = broken.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::write(weights, b"garbage").expect("write");
    root
}

/// Asserts that an 8-bit map is the reference PNG at `reference` pixel for pixel.
#[allow(dead_code)]
pub fn assert_same_map(what: &str, map: &image::RgbImage, reference: &Path) {
    let want = image::open(reference).expect("reference").to_rgb8();
    assert_eq!(map.dimensions(), want.dimensions(), "{what}: size");
    let differing = map
        .pixels()
        .zip(want.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "{what}: pixels unlike controlnet_aux's");
}

/// A ControlNet root holding copies of ControlNet fixture folders: (folder under the
/// fixtures, name in the root).
#[allow(dead_code)]
pub fn controlnet_root(folders: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    for (from, name) in folders {
        let to = root.path().join(name);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(controlnet_fixtures().join(from))
            .expect("dir")
            .flatten()
        {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    root
}

/// Random bodies of a pose fixture (`keypoints` [N, 18, 2], NaN where not found;
/// `sizes` [N, 2]): each body's keypoints and its image's (width, height), and the
/// fixture's `boxes` [N, ...] as whole numbers, one row per body.
#[allow(dead_code, clippy::type_complexity)]
pub fn random_bodies(path: &Path) -> Vec<(Vec<Option<(f64, f64)>>, (usize, usize), Vec<i64>)> {
    let io = read_tensors(path);
    let keypoints = Vec::<f64>::try_from(io["keypoints"].contiguous().view(-1)).expect("f64");
    let sizes = Vec::<i64>::try_from(io["sizes"].contiguous().view(-1)).expect("i64");
    let boxes = Vec::<i64>::try_from(io["boxes"].contiguous().view(-1)).expect("i64");
    let bodies = sizes.len() / 2;
    keypoints
        .chunks(36)
        .zip(sizes.chunks(2))
        .zip(boxes.chunks(boxes.len() / bodies.max(1)))
        .map(|((points, size), boxes)| {
            let points = points
                .chunks(2)
                .map(|p| (!p[0].is_nan()).then_some((p[0], p[1])))
                .collect();
            (points, (size[0] as usize, size[1] as usize), boxes.to_vec())
        })
        .collect()
}

/// The pipeline fixtures' init.png of `config` as an init image at `strength`.
#[allow(dead_code)]
pub fn fixture_init_image(config: &str, strength: Option<f32>) -> sdxld::proto::v1::InitImage {
    sdxld::proto::v1::InitImage {
        image: std::fs::read(fixtures().join(config).join("init.png")).expect("init.png"),
        strength,
        ..Default::default()
    }
}

/// A unit of the ControlNet fixtures' `from_unet` net of `config` on its control_a.png.
#[allow(dead_code)]
pub fn fixture_control_unit(config: &str) -> sdxld::proto::v1::ControlNetUnit {
    let nets = controlnet_fixtures().join(config);
    sdxld::proto::v1::ControlNetUnit {
        model: format!("{config}/from_unet"),
        image: std::fs::read(nets.join("control_a.png")).expect("control_a.png"),
        ..Default::default()
    }
}

/// One reference case the fixture script recorded in `<config>/<file>.json`: the
/// request diffusers ran, under its parameter names.
#[derive(Clone)]
pub struct Case(serde_json::Value);

impl std::ops::Deref for Case {
    type Target = serde_json::Value;

    fn deref(&self) -> &serde_json::Value {
        &self.0
    }
}

/// The wire scheduler of a diffusers scheduler class name, as the API converts it.
#[allow(dead_code)]
pub fn wire_scheduler(class: &str) -> i32 {
    let kind = sdxld::engine::schedulers::SchedulerKind::from_class_name(class)
        .unwrap_or_else(|| panic!("no scheduler class {class}"));
    sdxld::api::convert::scheduler(kind) as i32
}

/// The cases of `<config>/<file>.json`.
pub fn cases(config: &str, file: &str) -> Vec<Case> {
    cases_at(&fixtures().join(config).join(format!("{file}.json")))
}

/// The ControlNet pipeline cases of `<config>/cases.json` in the ControlNet fixtures.
pub fn controlnet_cases(config: &str) -> Vec<Case> {
    cases_at(&controlnet_fixtures().join(config).join("cases.json"))
}

/// The cases of a JSON list file.
pub fn cases_at(path: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON list");
    all.into_iter().map(Case).collect()
}

impl Case {
    /// Its name (the prefix of its tensors in the reference file).
    pub fn name(&self) -> &str {
        self.text("name")
    }

    /// A string the case must have.
    pub fn text(&self, key: &str) -> &str {
        self[key]
            .as_str()
            .unwrap_or_else(|| panic!("case without `{key}`"))
    }

    /// A number the case must have.
    pub fn float(&self, key: &str) -> f64 {
        self[key]
            .as_f64()
            .unwrap_or_else(|| panic!("case without `{key}`"))
    }

    /// A whole number the case must have.
    pub fn int(&self, key: &str) -> u64 {
        self[key]
            .as_u64()
            .unwrap_or_else(|| panic!("case without `{key}`"))
    }

    /// The scheduler class named by `key` (none: the model's own) with the case's
    /// `options` as diffusers config keys.
    pub fn scheduler(&self, key: &str) -> sdxld::engine::request::SchedulerOverrides {
        let mut overrides = sdxld::engine::request::SchedulerOverrides {
            class: self[key]
                .as_str()
                .and_then(sdxld::engine::schedulers::SchedulerKind::from_class_name),
            ..Default::default()
        };
        if let Some(options) = self["options"].as_object() {
            for (k, v) in options {
                overrides.set(k, v.clone());
            }
        }
        overrides
    }

    /// The request every case describes: prompts, seed, steps, images (`num_images` or
    /// `n`), guidance (`guidance`, else 5) and its rescale, size (else 64×64), scheduler
    /// and options, aesthetic scores.
    pub fn params(&self) -> sdxld::engine::request::GenerateParams {
        let number = |key: &str, default: f64| self[key].as_f64().unwrap_or(default);
        let size = |key: &str| self[key].as_i64().unwrap_or(64);
        let optional = |key: &str| self[key].as_str().map(str::to_string);
        sdxld::engine::request::GenerateParams {
            prompt: self.text("prompt").into(),
            prompt_2: optional("prompt_2"),
            negative_prompt: optional("negative_prompt"),
            seed: self.int("seed"),
            steps: self.int("steps") as usize,
            num_images: self["num_images"]
                .as_u64()
                .or(self["n"].as_u64())
                .unwrap_or(1) as usize,
            guidance_scale: number("guidance", 5.0),
            guidance_rescale: number("guidance_rescale", 0.0),
            width: size("width"),
            height: size("height"),
            scheduler_overrides: self.scheduler("scheduler"),
            aesthetic_score: number("aesthetic_score", 6.0),
            negative_aesthetic_score: number("negative_aesthetic_score", 2.5),
            ..Default::default()
        }
    }
}

/// Copies the folder `from` to `to`, recursively.
#[allow(dead_code)]
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

/// The tiny configurations the fixtures hold.
pub const CONFIGS: [&str; 2] = ["tiny2", "tiny3"];

/// All tensors of a safetensors file.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Standard normal samples of `shape` from `seed`, as `torch.randn(shape,
/// generator=torch.Generator().manual_seed(seed))`. libtorch's CPU generator is global to
/// the process: a test that reseeds or draws from it without the stream's lock moves the
/// noise of a generation running beside it, so tests draw apart from the stream.
pub fn random_normal(shape: &[i64], seed: u64) -> Tensor {
    sdxld::engine::noise::NoiseStream::lock().randn_apart(seed, shape)
}

/// Samples of `shape` spread over (0, 1): [`random_normal`]'s through the normal CDF.
pub fn random_unit(shape: &[i64], seed: u64) -> Tensor {
    (random_normal(shape, seed) / std::f64::consts::SQRT_2).erf() * 0.5 + 0.5
}

/// Relative error as architecture.md defines it: max |a - b| / max |b|.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let a = actual.to_kind(Kind::Double);
    let b = expected.to_kind(Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    diff / scale.max(1e-12)
}

/// Asserts latents-level parity (relative error below 1e-3).
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let err = relative_error(actual, expected);
    assert!(err < 1e-3, "{what}: relative error {err:e} exceeds 1e-3");
}

/// Asserts that the ControlNet residuals `run(scale, guess_mode)` gives equal those
/// `recorded` at scale 1 (`scale1.down.{i}`, `scale1.mid`) and in guess mode at 0.5
/// (`guess05.…`), as make_controlnet_fixtures.py's `record` writes them.
#[allow(dead_code)]
pub fn assert_recorded_residuals(
    what: &str,
    recorded: &HashMap<String, Tensor>,
    run: impl Fn(f64, bool) -> sdxld::engine::models::unet::ControlResiduals,
) {
    for (tag, scale, guess_mode) in [("scale1", 1.0, false), ("guess05", 0.5, true)] {
        let residuals = run(scale, guess_mode);
        let prefix = format!("{tag}.down.");
        let count = recorded.keys().filter(|k| k.starts_with(&prefix)).count();
        assert_eq!(residuals.down.len(), count, "{what}");
        for (i, down) in residuals.down.iter().enumerate() {
            let expected = &recorded[&format!("{prefix}{i}")];
            assert_close(&format!("{what} {tag} down {i}"), down, expected);
        }
        let mid = &recorded[&format!("{tag}.mid")];
        assert_close(&format!("{what} {tag} mid"), &residuals.mid, mid);
    }
}

/// Asserts that `forward` turns each of the first `cases` inputs of `io` (`input.{k}`)
/// into its `output.{k}` within [`assert_close`]'s tolerance.
pub fn assert_io_cases(
    what: &str,
    io: &HashMap<String, Tensor>,
    cases: usize,
    forward: impl Fn(&Tensor) -> Tensor,
) {
    for k in 0..cases {
        let got = forward(&io[&format!("input.{k}")]);
        assert_close(
            &format!("{what} input {k}"),
            &got,
            &io[&format!("output.{k}")],
        );
    }
}

/// The largest channel difference between two 8-bit images of one shape.
pub fn image_difference(a: &Tensor, b: &Tensor) -> i64 {
    (a.to_kind(Kind::Int) - b.to_kind(Kind::Int))
        .abs()
        .max()
        .int64_value(&[])
}

/// Asserts 8-bit image parity (no channel off by more than 2).
pub fn assert_images_match(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(
        actual.size(),
        expected.size(),
        "{what}: image shapes differ"
    );
    let diff = image_difference(actual, expected);
    assert!(diff <= 2, "{what}: a channel differs by {diff} (> 2)");
}

/// `spec` with its output in `format`.
pub fn with_format(
    mut spec: sdxld::proto::v1::GenerationSpec,
    format: sdxld::proto::v1::ImageFormat,
) -> sdxld::proto::v1::GenerationSpec {
    spec.output = Some(sdxld::proto::v1::OutputOptions {
        format: format as i32,
        ..Default::default()
    });
    spec
}

/// The `latents` tensor of an image delivered as `IMAGE_FORMAT_LATENTS_SAFETENSORS`.
pub fn latents_of(image: &sdxld::proto::v1::GeneratedImage) -> Tensor {
    let tensors = safetensors::SafeTensors::deserialize(&image.data).expect("safetensors");
    let view = tensors.tensor("latents").expect("latents");
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_slice(&values).view(shape.as_slice())
}

/// An encoded image (PNG, JPEG, WebP) as a [H, W, 3] uint8 tensor.
pub fn decoded_image(bytes: &[u8]) -> Tensor {
    let rgb = image::load_from_memory(bytes).expect("an image").to_rgb8();
    let (w, h) = rgb.dimensions();
    Tensor::from_slice(rgb.as_raw()).reshape([i64::from(h), i64::from(w), 3])
}

/// An engine init image from encoded bytes (PNG, JPEG, WebP) at `strength`.
pub fn init_image(
    bytes: &[u8],
    strength: f64,
) -> Result<sdxld::engine::request::InitImage, image::ImageError> {
    let rgb = image::load_from_memory(bytes)?.to_rgb8();
    let (w, h) = rgb.dimensions();
    Ok(sdxld::engine::request::InitImage::new(
        w,
        h,
        rgb.into_raw(),
        strength,
    ))
}

/// `init` with the inpainting mask in encoded `mask` bytes.
pub fn with_mask(
    init: sdxld::engine::request::InitImage,
    mask: &[u8],
) -> Result<sdxld::engine::request::InitImage, image::ImageError> {
    Ok(init.with_mask_rgb(&image::load_from_memory(mask)?.to_rgb8().into_raw()))
}

/// An image file as a [H, W, 3] uint8 tensor.
pub fn image_file(path: &Path) -> Tensor {
    decoded_image(&std::fs::read(path).expect("the image file"))
}

/// Bytes of the float32 tensors of every safetensors file under `dir` (or of the file).
#[allow(dead_code)]
pub fn weights_bytes(dir: &Path) -> u64 {
    if dir.is_file() {
        return sdxld::engine::weights::loaded_bytes(dir, None, tch::Kind::Float).expect("header");
    }
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") {
            total += weights_bytes(&path);
        }
    }
    total
}

/// Asserts that `output` equals the reference case `name`: its latents (`<name>.latents`)
/// within the latent tolerance and its images (`<name>.images`) within 2 per channel.
#[allow(dead_code)]
pub fn assert_matches_case(
    what: &str,
    output: &sdxld::engine::pipeline::GenerateOutput,
    reference: &HashMap<String, Tensor>,
    name: &str,
) {
    assert_close(
        &format!("{what} latents"),
        &output.latents,
        &reference[&format!("{name}.latents")],
    );
    assert_images_match(
        &format!("{what} images"),
        &output.images,
        &reference[&format!("{name}.images")],
    );
}

/// Sets `key` of the JSON config at `path` to `value`.
pub fn set_config(path: &Path, key: &str, value: serde_json::Value) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    config[key] = value;
    std::fs::write(path, config.to_string()).expect("write");
}

/// The A1111 `parameters` text of a PNG.
pub fn png_parameters(bytes: &[u8]) -> String {
    png_text(bytes, "parameters")
}

/// The text of a PNG's `keyword` chunk.
pub fn png_text(bytes: &[u8], keyword: &str) -> String {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("png");
    reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == keyword)
        .and_then(|c| c.get_text().ok())
        .unwrap_or_else(|| panic!("a {keyword} chunk"))
}

/// The request a PNG's `sdxld` chunk holds, which replays it.
pub fn png_spec(bytes: &[u8]) -> sdxld::proto::v1::GenerationSpec {
    sdxld::proto::spec_from_json(&png_text(bytes, "sdxld")).expect("a GenerationSpec")
}

/// The adapters a fixture case of `config` lists under `loras` ([name, weight] pairs;
/// none when it lists none), read from the fixture's `lora/` folder.
pub fn case_loras(config: &str, case: &Case) -> Vec<sdxld::engine::lora::JobLora> {
    let Some(list) = case["loras"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|l| {
            let name = l[0].as_str().expect("name");
            let path = fixtures()
                .join(config)
                .join("lora")
                .join(format!("{name}.safetensors"));
            let weights = sdxld::engine::loading::lora::LoraWeights::load(
                &path,
                name,
                tch::Device::Cpu,
                Kind::Float,
            )
            .expect("lora");
            sdxld::engine::lora::JobLora {
                name: name.into(),
                weights: std::rc::Rc::new(weights),
                strength: l[1].as_f64().expect("weight"),
                text_encoder_strength: l[1].as_f64().expect("weight"),
            }
        })
        .collect()
}

/// The UNet's output on the components fixture's `unet.<tag>.*` inputs (`r`), and the
/// output diffusers gave.
pub fn unet_on_fixture<'a>(
    unet: &sdxld::engine::models::unet::UNet2DConditionModel,
    r: &'a HashMap<String, Tensor>,
    tag: &str,
) -> (Tensor, &'a Tensor) {
    let get = |k: &str| &r[&format!("unet.{tag}.{k}")];
    let added = sdxld::engine::models::unet::AddedCond {
        text_embeds: get("text_embeds"),
        time_ids: get("time_ids"),
        timestep_cond: None,
    };
    let out = unet.forward(
        get("sample"),
        &get("timestep").reshape([]),
        get("encoder_hidden_states"),
        Some(&added),
    );
    (out, get("out"))
}

/// Runs `config`'s LoRA fixture cases through `pipe` in both modes: the plain request and
/// each adapter case equal diffusers', each adapter changes the latents, and once the
/// adapters come off the plain request is what it was before, bit for bit.
pub fn assert_lora_cases_match_and_leave_no_trace(
    pipe: &sdxld::engine::pipeline::SdxlPipeline,
    config: &str,
) {
    use sdxld::engine::lora::{apply, LoraMode};
    let reference = read_tensors(&fixtures().join(config).join("lora.safetensors"));
    let cases = cases(config, "lora");
    let plain = cases.iter().find(|c| c["name"] == "plain").expect("plain");
    let before = pipe.generate(&plain.params()).expect("plain");
    assert_matches_case(&format!("{config} plain"), &before, &reference, "plain");
    let same_bits = |a: &Tensor, b: &Tensor| a.size() == b.size() && a.equal(b);
    for mode in [LoraMode::Merge, LoraMode::Forward] {
        for case in cases.iter().filter(|c| c["name"] != "plain") {
            let name = case["name"].as_str().expect("name");
            let what = format!("{config} {name} ({mode:?})");
            let loras = case_loras(config, case);
            let applied = apply(pipe, &loras, mode).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(applied.layers() > 0, "{what}: nothing adapted");
            let out = pipe
                .generate(&case.params())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            drop(applied);
            assert_matches_case(&what, &out, &reference, name);
            // The adapter matters: its image is not the plain one.
            assert!(
                !same_bits(&out.latents, &before.latents),
                "{what}: no effect"
            );
        }
        // Taken off bit for bit: the plain request is what it was before any adapter.
        let after = pipe.generate(&plain.params()).expect("plain again");
        assert!(
            same_bits(&after.latents, &before.latents) && same_bits(&after.images, &before.images),
            "{config} ({mode:?}): an adapter left a trace"
        );
    }
}

/// The check engine work runs between its passes.
pub type Checkpoint<'a> = &'a mut dyn FnMut() -> sdxld::engine::error::Result<()>;

/// Runs `work` once with a counting check (at least `least` checks, one per pass) and
/// returns its result; then stopped at the first and the last check, `work` fails and
/// makes no further check, so no pass runs after a stop.
pub fn assert_stops_between_passes<T>(
    what: &str,
    least: usize,
    mut work: impl FnMut(Checkpoint) -> sdxld::engine::error::Result<T>,
) -> T {
    let mut checks = 0;
    let uninterrupted = work(&mut || {
        checks += 1;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(checks >= least, "{what}: {checks} checks, one per pass");
    for stop_at in [0, checks - 1] {
        let mut made = 0;
        let result = work(&mut || {
            made += 1;
            if made > stop_at {
                Err(sdxld::engine::error::EngineError::Internal("stop".into()))
            } else {
                Ok(())
            }
        });
        assert!(result.is_err(), "{what}: stopped at check {stop_at}");
        assert_eq!(
            made,
            stop_at + 1,
            "{what}: checks when stopped at {stop_at}"
        );
    }
    uninterrupted
}
