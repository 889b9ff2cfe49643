//! The hires pass flags of `generate` (A1111's "Hires. fix"), their parsing, and the flag
//! each `HiresPass` field comes from.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use sdxld::proto::v1 as pb;

/// A hires pass after the first: the result enlarged and denoised again at the final size.
#[derive(Args, Clone, Default)]
pub struct HiresArgs {
    /// Run a hires pass enlarging each side by this factor, in [1, 4] (2 when only other
    /// --hires-* flags are given).
    #[arg(long)]
    pub hires_scale: Option<f32>,
    /// Or to this final size, WIDTHxHEIGHT (multiples of 8).
    #[arg(long, value_name = "WxH")]
    pub hires_size: Option<String>,
    /// Enlarge in latent space: nearest, nearest-exact, bilinear (the default) or bicubic.
    #[arg(long)]
    pub hires_latent: Option<String>,
    /// Or with this upscaler model (a `.safetensors` file: ESRGAN, Real-ESRGAN, SwinIR,
    /// ...), tiled, then Lanczos to the final size.
    #[arg(long)]
    pub hires_upscaler: Option<PathBuf>,
    /// The upscaler's tile side in pixels (0: fitted to the free device memory).
    #[arg(long, default_value_t = 0)]
    pub hires_tile: u32,
    /// The hires pass's schedule (default: --steps), of which strength x steps run.
    #[arg(long)]
    pub hires_steps: Option<u32>,
    /// Its denoising strength, in (0, 1] (default 0.7).
    #[arg(long)]
    pub hires_strength: Option<f32>,
    /// Its scheduler (same names as --scheduler; default: the first pass's).
    #[arg(long)]
    pub hires_scheduler: Option<String>,
    /// Its guidance scale (default: --guidance).
    #[arg(long)]
    pub hires_guidance: Option<f32>,
    /// Another SDXL base pipeline folder to run the pass (A1111's "Hires checkpoint"):
    /// its text encoders, UNet and VAE (default: the model's).
    #[arg(long)]
    pub hires_model: Option<PathBuf>,
    /// Its own prompt (default: --prompt), in --prompt-syntax.
    #[arg(long)]
    pub hires_prompt: Option<String>,
    /// Its prompt for the second text encoder (default: --prompt-2, which defaults to
    /// the pass's prompt).
    #[arg(long)]
    pub hires_prompt_2: Option<String>,
    /// Its negative prompt (default: --negative-prompt).
    #[arg(long)]
    pub hires_negative_prompt: Option<String>,
    /// Its negative prompt for the second text encoder (default: --negative-prompt-2,
    /// which defaults to the pass's negative prompt).
    #[arg(long)]
    pub hires_negative_prompt_2: Option<String>,
}

impl HiresArgs {
    /// Whether any flag asks for a hires pass.
    pub fn wanted(&self) -> bool {
        self.hires_scale.is_some()
            || self.hires_size.is_some()
            || self.hires_latent.is_some()
            || self.hires_upscaler.is_some()
            || self.hires_steps.is_some()
            || self.hires_strength.is_some()
            || self.hires_scheduler.is_some()
            || self.hires_guidance.is_some()
            || self.hires_model.is_some()
            || self.hires_prompt.is_some()
            || self.hires_prompt_2.is_some()
            || self.hires_negative_prompt.is_some()
            || self.hires_negative_prompt_2.is_some()
    }

    /// `--hires-size` as (width, height); (0, 0), the scale's, when absent.
    pub fn size(&self) -> anyhow::Result<(u32, u32)> {
        self.hires_size
            .as_deref()
            .map_or(Ok((0, 0)), |size| parse_size("--hires-size", size))
    }

    /// `--hires-latent` as the wire interpolation (0, unspecified, when absent).
    pub fn latent_upscale(&self) -> anyhow::Result<i32> {
        self.hires_latent.as_deref().map_or(Ok(0), latent_upscale)
    }
}

/// `WIDTHxHEIGHT`, the value of `flag`.
pub fn parse_size(flag: &str, size: &str) -> anyhow::Result<(u32, u32)> {
    let parsed = size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some(size) => Ok(size),
        None => bail!("{flag} must be WIDTHxHEIGHT, got `{size}`"),
    }
}

/// `--hires-latent`'s interpolation.
fn latent_upscale(mode: &str) -> anyhow::Result<i32> {
    Ok(match mode {
        "nearest" => pb::LatentUpscale::Nearest,
        "nearest-exact" => pb::LatentUpscale::NearestExact,
        "bilinear" => pb::LatentUpscale::Bilinear,
        "bicubic" => pb::LatentUpscale::Bicubic,
        other => bail!(
            "--hires-latent must be nearest, nearest-exact, bilinear or bicubic, got `{other}`"
        ),
    } as i32)
}

/// The flag a `spec.hires` field comes from.
pub fn flag_of(field: &str) -> Option<&'static str> {
    let field = field.strip_prefix("spec.hires")?;
    Some(match field.trim_start_matches('.') {
        "scale" => "--hires-scale",
        "width" | "height" => "--hires-size",
        "latent_upscale" => "--hires-latent",
        "upscaler" => "--hires-upscaler",
        "tile_size" => "--hires-tile",
        "steps" => "--hires-steps",
        "strength" => "--hires-strength",
        "guidance_scale" => "--hires-guidance",
        "model" => "--hires-model",
        "prompt" => "--hires-prompt",
        "prompt_2" => "--hires-prompt-2",
        "negative_prompt" => "--hires-negative-prompt",
        "negative_prompt_2" => "--hires-negative-prompt-2",
        f if f.starts_with("scheduler") => "--hires-scheduler",
        _ => "--hires-*",
    })
}
