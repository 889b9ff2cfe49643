//! Mutation fuzzing of the parsers that read untrusted bytes: safetensors headers and
//! tensors (model and LoRA files), the zip archives and the pickle reader of `sdxld
//! convert`, image sniffing and decoding, request validation, compel's and A1111's prompt
//! syntax and perturbed-attention guidance's layer patterns.
//! Each target starts from its seed corpus (`tests/fuzz/corpus/<target>/`, and request
//! specs and prompts built here) and runs mutated inputs;
//! errors are fine, a panic fails the test and leaves the input under
//! `target/fuzz-failures/`. An abort (stack or allocation) ends the process: the input
//! being run is always in `target/fuzz-failures/<target>.current`.
//!
//! `SDXLD_FUZZ_ITERATIONS` sets the inputs per target (2000 by default, as the test
//! command runs it); `SDXLD_FUZZ_SEED` the first random seed. A long run:
//! `SDXLD_FUZZ_ITERATIONS=1000000 cargo test --release --test integration fuzz::`.

use crate::common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use prost::Message;
use sdxld::api::validate::{to_job_spec, Context};
use sdxld::config::Settings;
use sdxld::engine::registry::{ModelEntry, ModelRoots, Registry};
use sdxld::proto::v1 as pb;

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that sit on the edges of integer and length fields.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    1 << 40,
    4096,
];

/// One to four random edits of `input`, some splicing in a part of `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 => {
                let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let end = (at + 8).min(data.len());
                let width = end - at;
                data[at..end].copy_from_slice(&value[..width]);
            }
            3 => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            4 => {
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            5 => data.truncate(at),
            6 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                data.splice(at..at, other[from..end].iter().copied());
            }
            _ => {
                // A digit in text (JSON headers, offsets written as numbers) made larger.
                if let Some(i) = (at..data.len()).find(|&i| data[i].is_ascii_digit()) {
                    data.insert(i, b'9');
                }
            }
        }
    }
    data
}

fn iterations() -> usize {
    std::env::var("SDXLD_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn failures() -> PathBuf {
    let dir = common::repo().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = common::repo().join("tests/fuzz/corpus").join(target);
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("the seed corpus")
        .flatten()
        .map(|e| (e.path(), std::fs::read(e.path()).expect("read")))
        .collect();
    seeds.sort();
    seeds.into_iter().map(|(_, bytes)| bytes).collect()
}

/// Runs `run` on every seed and on mutations of them; any panic fails with the input
/// saved.
fn fuzz(target: &str, seeds: &[Vec<u8>], mut run: impl FnMut(&[u8])) {
    assert!(!seeds.is_empty(), "{target}: no seeds");
    let first: u64 = std::env::var("SDXLD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Rng(first | 1);
    let current = failures().join(format!("{target}.current"));
    let inputs = seeds
        .iter()
        .cloned()
        .map(Some)
        .chain((0..iterations()).map(|_| None));
    for (n, seed) in inputs.enumerate() {
        let input = seed.unwrap_or_else(|| {
            let base = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, base, other)
        });
        std::fs::write(&current, &input).expect("write");
        if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
            let kept = failures().join(format!("{target}-{n}.bin"));
            std::fs::write(&kept, &input).expect("write");
            panic!("{target}: input {n} panicked; kept as {}", kept.display());
        }
    }
}

#[test]
fn safetensors_headers_and_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input.safetensors");
    fuzz("safetensors", &corpus("safetensors"), |bytes| {
        std::fs::write(&path, bytes).expect("write");
        let _ = sdxld::engine::loading::lora::LoraLayout::read(&path, "input");
        let Ok((shapes, _)) = sdxld::engine::weights::read_shapes(&path) else {
            return;
        };
        let Ok(weights) = sdxld::engine::weights::Weights::open(
            std::slice::from_ref(&path),
            tch::Device::Cpu,
            tch::Kind::Float,
        ) else {
            return;
        };
        for (name, shape) in shapes {
            let _ = weights.root().get(&name, &shape);
        }
    });
}

#[test]
fn pickle_checkpoints_for_convert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, output) = (
        dir.path().join("in.ckpt"),
        dir.path().join("out.safetensors"),
    );
    fuzz("pickle", &corpus("pickle"), |pickle| {
        write_checkpoint(&input, pickle);
        let _ = sdxld::convert::convert(&input, &output);
    });
}

#[test]
fn whole_checkpoint_archives_for_convert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, output) = (
        dir.path().join("in.ckpt"),
        dir.path().join("out.safetensors"),
    );
    fuzz("checkpoint", &corpus("checkpoint"), |archive| {
        std::fs::write(&input, archive).expect("write");
        let _ = sdxld::convert::convert(&input, &output);
    });
}

/// A torch.save zip archive around `pickle`, with a few storages of 64 bytes.
fn write_checkpoint(path: &Path, pickle: &[u8]) {
    use std::io::Write;
    let file = std::fs::File::create(path).expect("create");
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::FileOptions::default();
    zip.start_file("archive/data.pkl", options).expect("zip");
    zip.write_all(pickle).expect("zip");
    for key in 0..4 {
        zip.start_file(format!("archive/data/{key}"), options)
            .expect("zip");
        zip.write_all(&[key as u8; 64]).expect("zip");
    }
    zip.finish().expect("zip");
}

/// Validation's context: the default limits and the fixture pipeline as the default model.
fn with_context(run: impl FnOnce(&Context<'_>)) {
    let settings = Settings::load(None).expect("defaults");
    let default = ModelEntry::from_folder("default", &common::fixtures().join("tiny2/pipeline"))
        .expect("fixture pipeline");
    let registry = Registry::new(ModelRoots::default(), default);
    run(&Context {
        limits: &settings.limits,
        registry: &registry,
        preprocessing: &settings.preprocessing,
        drawn_seed: 7,
    });
}

#[test]
fn images_in_requests() {
    with_context(|ctx| {
        fuzz("image", &corpus("image"), |bytes| {
            let spec = pb::GenerationSpec {
                prompt: "x".into(),
                init_image: Some(pb::InitImage {
                    image: bytes.to_vec(),
                    strength: Some(0.5),
                    mask: bytes.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let _ = to_job_spec(Some(spec), ctx);
        });
    });
}

/// Request specs that touch every part of validation, encoded.
fn spec_seeds() -> Vec<Vec<u8>> {
    let image = corpus("image").swap_remove(0);
    let full = pb::GenerationSpec {
        prompt: "a red apple".into(),
        negative_prompt: Some("blurry".into()),
        width: 64,
        height: 64,
        steps: 3,
        guidance_scale: Some(5.0),
        seed: Some(1),
        num_images: 2,
        loras: vec![pb::LoraAdapter {
            name: "style".into(),
            weight: Some(0.5),
            text_encoder_weight: None,
        }],
        init_image: Some(pb::InitImage {
            image,
            strength: Some(0.3),
            ..Default::default()
        }),
        output: Some(pb::OutputOptions {
            preview_every_n_steps: 1,
            ..Default::default()
        }),
        client_job_id: "mine".into(),
        controlnets: vec![pb::ControlNetUnit {
            model: "pose".into(),
            preprocessor: pb::Preprocessor::OpenposeFull as i32,
            poses: Some(pb::Poses {
                canvas_width: 48,
                canvas_height: 40,
                people: vec![pb::PersonPose {
                    body: (0..18)
                        .map(|i| pb::PoseKeypoint {
                            x: f64::from(i) / 18.0,
                            y: 0.5,
                            missing: i == 3,
                        })
                        .collect(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let plain = pb::GenerationSpec {
        prompt: "x".into(),
        ..Default::default()
    };
    [full, plain].iter().map(Message::encode_to_vec).collect()
}

#[test]
fn request_validation() {
    with_context(|ctx| {
        fuzz("spec", &spec_seeds(), |bytes| {
            if let Ok(spec) = pb::GenerationSpec::decode(bytes) {
                let _ = to_job_spec(Some(spec), ctx);
            }
        });
    });
}

/// Prompts in compel's syntax: every operator, escapes, quotes and nesting.
#[test]
fn compel_prompt_syntax() {
    let seeds: Vec<Vec<u8>> = [
        r#"a (red cat)1.2 on a (chair)0.5, "quoted words"1.1 dog++ mist--"#,
        r#"("a (red)1.3 cat", "a dog").blend(0.7, 0.3, no_normalize)"#,
        r#"("a cat on a chair", "snow").and(1, 0.5) tail"#,
        r#"(a (b (c)1.1)0.9).attend(1.2) x.swap(y, s_start=0.1) withLora(s, 0.5)"#,
        "\\(esc\\) \"a\\\"b\\tc\" a,b.c 1.5 (x)-0.5 ((( \"",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("prompt_syntax", &seeds, |bytes| {
        let _ = sdxld::engine::prompt_syntax::parse(&String::from_utf8_lossy(bytes));
    });
}

/// Prompts in A1111's syntax: brackets, weights, escapes, BREAK, edits, alternations
/// and what is refused.
#[test]
fn a1111_prompt_syntax() {
    let seeds: Vec<Vec<u8>> = [
        "masterpiece, (best quality:1.2), [blurry], ((red)) cat BREAK a dog",
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "\\(esc\\) \\[x\\] (a : -0.5 ) (b:1.2.3) ]]) ((( [[ :1.1) BREAKfast",
        "[a:b:0.5] [c|d] <lora:x:1> a AND b",
        "<<lora:a:1>lora:b:te=0.5:unet=1_0> <lyco:c:1e-1:-.5> <hypernet:h>",
        "[[a:b:2]:c:3]:: ([x|[y:2]]:1.2) [a:b:1e400] [p:q:.5]]( [fe|||]male",
        "a cat:1.2 AND [dog|fox]:-0.5 AND AND x_AND_y \u{2460}AND:\u{663} : 9.",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let clock = sdxld::engine::prompt_syntax::a1111_schedule::StepClock {
        steps: 20,
        first_pass_steps: None,
    };
    use sdxld::engine::prompt_syntax::Emphasis;
    fuzz("a1111_prompts", &seeds, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let _ = sdxld::engine::prompt_syntax::a1111::parse(&text);
        // Each emphasis reads the text its own way (the literal one whole).
        for emphasis in [Emphasis::Original, Emphasis::Literal] {
            let _ = sdxld::engine::prompt_syntax::a1111::check(&text, &[clock], emphasis);
        }
        let _ = sdxld::engine::prompt_syntax::a1111::without_comments(&text);
        if let Ok(networks) = sdxld::engine::prompt_syntax::a1111_networks::extra_networks(&text) {
            assert!(networks.text.len() + networks.loras.len() * 7 <= text.len());
        }
        // Split in two, as a prompt and its prompt_2, with sub-prompts.
        let (prompt, prompt_2) = text.split_at(text.floor_char_boundary(text.len() / 2));
        if let Ok(parts) = sdxld::engine::prompt_syntax::a1111::check_prompts(
            prompt,
            Some(prompt_2),
            &[clock],
            Emphasis::Original,
        ) {
            let schedules =
                sdxld::engine::prompt_syntax::a1111::run_schedules(&parts, (prompt_2, None), clock);
            if let Ok(schedules) = schedules {
                let _ = sdxld::engine::prompt_syntax::a1111::conditionings(&schedules, clock);
            }
        }
    });
}

/// Perturbed-attention guidance's layer patterns, parsed and searched in SDXL's
/// self-attention layer names.
#[test]
fn pag_layer_patterns() {
    use sdxld::engine::models::unet::UNet2DConditionModel;
    use sdxld::engine::models::unet_config::UNetConfig;
    use sdxld::engine::request::PagLayer;

    let names = UNet2DConditionModel::self_attention_names(&UNetConfig::sdxl_base());
    let seeds: Vec<Vec<u8>> = [
        "mid",
        "up_blocks.0.attentions.(0|2).transformer_blocks.1",
        "(?:down|up)_blocks.1$",
        "^a*(b+)?c|d.e((f))",
        "((((((((((a*)*)*)*)*)*)*)*)*)*)",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("pag_layers", &seeds, |bytes| {
        if let Ok(layer) = PagLayer::parse(&String::from_utf8_lossy(bytes)) {
            let _ = names.iter().filter(|n| layer.matches(n)).count();
        }
    });
}
