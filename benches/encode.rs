//! PNG encoding of finished images as the server encodes them (`output::encode_rgb`), on
//! 1024×1024 photographs (scikit-image's samples in the environment, enlarged with
//! Lanczos as a decoded SDXL image is smooth) and on noise, against two baselines in the
//! same run: the png crate's default compression (zlib-like, what `image` writes) and
//! Pillow's default `save` (what the Python workers wrote), each on the same pixels:
//! median milliseconds, bytes, and the ratios.
//!
//! Run with `cargo bench --bench encode` (after `source scripts/setup`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use image::imageops::FilterType;
use sdxld::output::{encode_rgb, OutputFormat};

const SIDE: u32 = 1024;
const RUNS: usize = 7;

fn median_ms(mut run: impl FnMut() -> usize) -> (f64, usize) {
    let mut bytes = run();
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            bytes = run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], bytes)
}

fn png_default(pixels: &[u8]) -> usize {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, SIDE, SIDE);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("header");
    writer.write_image_data(pixels).expect("data");
    writer.finish().expect("finish");
    out.len()
}

/// Pillow's default PNG save of the same pixels, timed in Python: (ms, bytes).
fn pillow(pixels: &[u8], scratch: &Path) -> Option<(f64, usize)> {
    let raw = scratch.join("pixels.rgb");
    std::fs::write(&raw, pixels).ok()?;
    let script = format!(
        "import io, statistics, time\nfrom PIL import Image\n\
         im = Image.frombytes('RGB', ({SIDE}, {SIDE}), open({raw:?}, 'rb').read())\n\
         def once():\n    b = io.BytesIO(); im.save(b, format='PNG'); return len(b.getvalue())\n\
         once()\nt = []\nfor _ in range({RUNS}):\n    s = time.perf_counter(); n = once(); t.append((time.perf_counter() - s) * 1e3)\n\
         print(statistics.median(t), n)\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// scikit-image's sample photographs where the environment has them.
fn samples() -> Vec<PathBuf> {
    let lib = Path::new(".venv/lib");
    let Ok(pythons) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    let data: Vec<PathBuf> = pythons
        .flatten()
        .map(|p| p.path().join("site-packages/skimage/data"))
        .filter(|p| p.is_dir())
        .collect();
    ["astronaut.png", "chelsea.png", "coffee.png"]
        .iter()
        .filter_map(|name| data.iter().map(|d| d.join(name)).find(|p| p.exists()))
        .collect()
}

fn noise() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..SIDE * SIDE * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect()
}

fn main() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut images: Vec<(String, Vec<u8>)> = samples()
        .into_iter()
        .filter_map(|path| {
            let photo = image::open(&path).ok()?.to_rgb8();
            let enlarged = image::imageops::resize(&photo, SIDE, SIDE, FilterType::Lanczos3);
            let name = path.file_stem()?.to_string_lossy().into_owned();
            Some((name, enlarged.into_raw()))
        })
        .collect();
    if images.is_empty() {
        println!("(no scikit-image samples in .venv: noise only)");
    }
    images.push(("noise".into(), noise()));
    println!(
        "{:<12}{:>10}{:>12}{:>14}{:>12}{:>12}{:>12}{:>10}{:>10}",
        "image",
        "sdxld ms",
        "bytes",
        "png-default",
        "bytes",
        "pillow ms",
        "bytes",
        "× png",
        "× pillow"
    );
    for (name, pixels) in &images {
        let (ours, our_bytes) = median_ms(|| {
            encode_rgb(pixels, SIDE, SIDE, OutputFormat::Png, 100, None)
                .expect("encode")
                .len()
        });
        let (default, default_bytes) = median_ms(|| png_default(pixels));
        let (pil, pil_bytes) = pillow(pixels, scratch.path()).unwrap_or((f64::NAN, 0));
        println!(
            "{name:<12}{ours:>10.1}{our_bytes:>12}{default:>14.1}{default_bytes:>12}{pil:>12.1}{pil_bytes:>12}{:>10.1}{:>10.1}",
            default / ours,
            pil / ours
        );
    }
}
