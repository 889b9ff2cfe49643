//! The flags of `generate` and `bench`, the `GenerationSpec` they mean (as a client
//! would send it: only what a flag sets), and the flag each spec field comes from (for
//! error messages).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use sdxld::proto::v1 as pb;

use crate::cli::hires::HiresArgs;
use crate::cli::pag::PagArgs;
use crate::cli::scheduler_flags::{config_pair, named_scheduler};
use crate::cli::variation::VariationArgs;

/// What to generate, and where the models are.
#[derive(Args, Clone)]
pub struct GenerateArgs {
    /// A diffusers SDXL pipeline folder or a single-file SDXL checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// The prompt for the second text encoder (default: the prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// The negative prompt. Without it SDXL uses zero negative embeddings.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// The negative prompt for the second text encoder (default: the negative prompt).
    #[arg(long)]
    pub negative_prompt_2: Option<String>,
    /// How the prompts are read: plain (diffusers, truncated to 75 tokens; the default),
    /// compel (weights such as `(word)1.3` and `word++`, blends, long prompts in chunks)
    /// or a1111 (AUTOMATIC1111's `(word:1.3)`, `[word]`, `BREAK`, `[from:to:when]`, `[a|b]`,
    /// long prompts in chunks).
    #[arg(long, value_enum)]
    pub prompt_syntax: Option<PromptSyntaxArg>,
    /// How --prompt-syntax a1111 applies its weights (A1111's Emphasis setting):
    /// original (the default), no-norm, ignore or none.
    #[arg(long, value_enum)]
    pub emphasis: Option<EmphasisArg>,
    /// Seed of the first image; image i uses seed + i. Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Denoising steps (default 30).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale, off at 1 or below (default 5).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Guidance rescale in [0, 1] (default 0).
    #[arg(long)]
    pub guidance_rescale: Option<f32>,
    /// Image width in pixels, a multiple of 8 (default: the model's, or the init image's).
    #[arg(long)]
    pub width: Option<u32>,
    /// Image height in pixels, a multiple of 8 (default: the model's, or the init image's).
    #[arg(long)]
    pub height: Option<u32>,
    /// Number of images (default 1).
    #[arg(long)]
    pub num_images: Option<u32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// float32, float16 or bfloat16 (half precision needs CUDA).
    #[arg(long, default_value = "float32")]
    pub dtype: String,
    /// Output PNG; further images get -1, -2, ... before the extension.
    #[arg(long, default_value = "out.png")]
    pub output: PathBuf,
    /// Also write the final latents (before decoding) as safetensors.
    #[arg(long)]
    pub latents_out: Option<PathBuf>,
    /// Scheduler: euler, euler-ancestral, heun, kdpm2, kdpm2-ancestral, lms, ddim,
    /// dpm-solver-multistep, dpm-solver-singlestep, unipc, lcm, tcd (the model's own when
    /// absent), or an A1111 sampler name such as "Euler a" or "DPM2 Karras".
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Custom timesteps, decreasing, comma-separated (diffusers' `timesteps`; e.g. Align
    /// Your Steps' 999,845,730,587,443,310,193,116,53,13): they set the steps.
    #[arg(long, value_delimiter = ',', value_name = "T,T,...")]
    pub timesteps: Vec<u32>,
    /// Custom sigmas for Euler, decreasing, the final one included, comma-separated
    /// (diffusers' `sigmas`; e.g. 14.615,6.475,3.861,2.697,1.886,1.396,0.963,0.652,0.399,
    /// 0.152,0.029,0): they set the steps (one fewer than the sigmas).
    #[arg(long, value_delimiter = ',', value_name = "S,S,...")]
    pub sigmas: Vec<f32>,
    /// A scheduler option as its diffusers config key, e.g. use_karras_sigmas=true or
    /// timestep_spacing=trailing (repeatable; the keys the contract's SchedulerOptions
    /// has).
    #[arg(long = "scheduler-config", value_name = "KEY=VALUE")]
    pub scheduler_config: Vec<String>,
    /// Image to image: an init image (PNG, JPEG or WebP; its size is the output size).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Inpainting: a mask of the init image's size (white repaints).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the mask first with a Gaussian of this radius in pixels, as
    /// diffusers' `mask_processor.blur` does (0 to 64; default 0).
    #[arg(long, default_value_t = 0)]
    pub mask_blur: u32,
    /// Inpainting: generate only the masked area, this many pixels around it, at --width
    /// x --height, and put it back into the image (diffusers' `padding_mask_crop`).
    #[arg(long, value_name = "PIXELS")]
    pub padding_mask_crop: Option<u32>,
    /// Image to image: the fraction of the schedule that runs, in (0, 1] (default 0.8).
    #[arg(long)]
    pub strength: Option<f32>,
    /// Image to image: start at this fraction of the schedule without adding noise
    /// (diffusers' denoising_start), in (0, 1); overrides --strength.
    #[arg(long)]
    pub denoising_start: Option<f32>,
    /// Aesthetic-score conditioning for refiner-style models (requires_aesthetics_score;
    /// default 6).
    #[arg(long)]
    pub aesthetic_score: Option<f32>,
    /// Negative aesthetic-score conditioning (default 2.5).
    #[arg(long)]
    pub negative_aesthetic_score: Option<f32>,
    /// A refiner pipeline folder to run after the model (the SDXL refiner or any SDXL
    /// pipeline); it decodes the images.
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// How the refiner takes over: ensemble (the base runs the first
    /// --high-noise-fraction of the schedule) or img2img (the refiner re-noises the base's
    /// result by --refiner-strength).
    #[arg(long, default_value = "ensemble")]
    pub refiner_mode: String,
    /// Ensemble of experts: the fraction of the schedule the base runs, in (0, 1)
    /// (default 0.8).
    #[arg(long)]
    pub high_noise_fraction: Option<f32>,
    /// Refiner img2img: strength in (0, 1] (default 0.3).
    #[arg(long)]
    pub refiner_strength: Option<f32>,
    /// Refiner steps (default: --steps).
    #[arg(long)]
    pub refiner_steps: Option<u32>,
    /// Refiner guidance scale (default: --guidance).
    #[arg(long)]
    pub refiner_guidance: Option<f32>,
    /// Refiner scheduler (same names as --scheduler; default: the refiner's own).
    #[arg(long)]
    pub refiner_scheduler: Option<String>,
    /// FreeU on the base UNet: `default` for the published SDXL factors, or
    /// B1,B2,S1,S2 (each in (0, 10]), e.g. 1.3,1.4,0.9,0.2.
    #[arg(long, value_name = "default|B1,B2,S1,S2")]
    pub freeu: Option<String>,
    /// Seamless tiling: the image's opposite edges continue each other along both axes,
    /// x (left and right) or y (top and bottom).
    #[arg(long, value_enum)]
    pub tiling: Option<TilingArg>,
    /// How the prompt's and the negative prompt's predictions combine: cfg or apg, then
    /// options, e.g. apg,momentum=-0.5,norm_threshold=15,eta=1,start=0,stop=0.8.
    #[arg(long, value_name = "cfg|apg[,KEY=VALUE...]")]
    pub guider: Option<String>,
    /// A VAE folder (diffusers AutoencoderKL, e.g. sdxl-vae-fp16-fix) replacing the
    /// models' own for encoding and decoding.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// A LoRA adapter from --lora-dir by name (its path there without .safetensors) and
    /// weight in [-2, 2], e.g. style:0.8 (repeatable; applied together).
    #[arg(long = "lora", value_name = "NAME:WEIGHT")]
    pub loras: Vec<String>,
    /// A textual inversion embedding (an SDXL `.safetensors` file with `clip_l` and
    /// `clip_g` vectors) and the token that stands for it in the prompts (default: the
    /// file's name without extension), e.g. ./embeddings/NegXL.safetensors or
    /// ./neg.safetensors:negxl (repeatable).
    #[arg(long = "embedding", value_name = "FILE[:TOKEN]")]
    pub embeddings: Vec<String>,
    /// An IP-Adapter image prompt: the adapter file, its CLIP image encoder folder, 1 to 4
    /// images, optionally one mask per image (where it acts: white) and a scale in [0, 2],
    /// e.g. ./ip-adapter_sdxl.safetensors,./image_encoder,style.png,scale=0.7 or
    /// ...,face_a.png,face_b.png,mask=left.png,mask=right.png (repeatable).
    #[arg(
        long = "ip-adapter",
        value_name = "FILE,ENCODER,IMAGE[,IMAGE...][,mask=MASK...][,scale=S]"
    )]
    pub ip_adapters: Vec<String>,
    /// A ControlNet unit: a diffusers ControlNet folder, a conditioning image and optional
    /// settings, e.g. ./canny-sdxl,edges.png,scale=0.5,end=0.8 (keys: scale, start, end,
    /// mode=balanced|guess, resize=just|crop|fill, preprocessor=none|canny|depth|openpose|
    /// openpose_face|openpose_faceonly|openpose_hand|openpose_full|scribble|normal|
    /// segmentation|lineart|lineart_anime|softedge|mlsd|lineart_standard|anyline|
    /// tile_resample|blur|invert|recolor_luminance|recolor_intensity|scribble_xdog|sketch,
    /// detector (the
    /// preprocessor network's file; the face and hand networks are facenet.safetensors
    /// and hand_pose_model.safetensors beside it), low, high (Canny), score, distance
    /// (M-LSD), safe (soft edges), rate (tile_resample), sigma (blur), gamma (recolor),
    /// xdog (scribble_xdog), near, background (LeReS depth), resolution, pixel_perfect,
    /// and for union models
    /// type=openpose|depth|hed|canny|normal|segment|tile|repaint;
    /// repeatable, the units' residuals are summed).
    #[arg(long = "controlnet", value_name = "FOLDER,IMAGE[,KEY=VALUE...]")]
    pub controlnets: Vec<String>,
    /// How a batch is denoised: per-image (each image as if it were image 0 of a request
    /// with its seed, as the server does, so that its PNG metadata replays it exactly) or
    /// together (as one call of diffusers' pipeline: images that draw no noise of their own
    /// share each UNet call; inpainting images take the init image's latent samples from
    /// the first image's generator).
    #[arg(long, value_enum, default_value_t = Batch::PerImage)]
    pub batch: Batch,
    /// The folder --lora names resolve in.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// How LoRA adapters are applied: merge (into the weights, for this run) or forward
    /// (extra low-rank products in each layer's forward pass).
    #[arg(long, default_value = "merge")]
    pub lora_mode: String,
    /// Store the UNet's, ControlNets' and VAE's convolution weights channels-last (NHWC in
    /// memory; `engine.channels_last`).
    #[arg(long)]
    pub channels_last: bool,
    /// Fuse the attention projections at load (`engine.fused_projections`).
    #[arg(long)]
    pub fused_projections: bool,
    /// Let cuDNN time its convolution algorithms per shape (`engine.cudnn_benchmark`).
    #[arg(long)]
    pub cudnn_benchmark: bool,
    /// Replay the UNet's calls as CUDA graphs (`engine.cuda_graphs`).
    #[arg(long)]
    pub cuda_graphs: bool,
    /// The fused attention kernel tried first on CUDA: flash, cudnn or efficient
    /// (`engine.attention_backend`).
    #[arg(long, default_value = "flash")]
    pub attention_backend: String,
    /// Run the VAE decoder's layers on more rows than this that many rows at a time
    /// (`engine.vae_band_rows`; 0: whole).
    #[arg(long, default_value_t = 0)]
    pub vae_band_rows: u32,
    /// Bytes of weights plus estimated activations allowed on the device
    /// (`engine.memory_budget_bytes`; 0 for no limit). A job that fits only without its
    /// text encoders moves them to the host once its prompts are encoded.
    #[arg(long, default_value_t = 0)]
    pub memory_budget: u64,
    /// The hires pass.
    #[command(flatten)]
    pub hires: HiresArgs,
    /// Perturbed-attention guidance.
    #[command(flatten)]
    pub pag: PagArgs,
    /// A seed variation.
    #[command(flatten)]
    pub variation: VariationArgs,
}

/// `--prompt-syntax`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptSyntaxArg {
    /// As diffusers reads prompts.
    Plain,
    /// compel's syntax.
    Compel,
    /// AUTOMATIC1111's syntax.
    A1111,
}

/// `--emphasis`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmphasisArg {
    /// The weights applied and the mean restored.
    Original,
    /// The weights applied, the mean not restored.
    NoNorm,
    /// The weights read, not applied.
    Ignore,
    /// The text read literally.
    None,
}

/// `--tiling`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TilingArg {
    /// Both axes.
    Both,
    /// The left and right edges meet.
    X,
    /// The top and bottom edges meet.
    Y,
}

/// `--batch`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Batch {
    /// One denoising run per image.
    PerImage,
    /// As diffusers batches.
    Together,
}

impl Batch {
    /// The runner's option.
    pub fn mode(self) -> sdxld::engine::request::BatchMode {
        match self {
            Batch::PerImage => sdxld::engine::request::BatchMode::PerImage,
            Batch::Together => sdxld::engine::request::BatchMode::Together,
        }
    }
}

/// The flag a spec field comes from, where there is one.
pub fn flag_of(field: &str) -> Option<&'static str> {
    if let Some(flag) = crate::cli::hires::flag_of(field)
        .or(crate::cli::pag::flag_of(field))
        .or(crate::cli::guider::flag_of(field))
        .or(crate::cli::variation::flag_of(field))
    {
        return Some(flag);
    }
    let flags = [
        ("spec.width", "--width"),
        ("spec.height", "--height"),
        ("spec.steps", "--steps"),
        ("spec.timesteps", "--timesteps"),
        ("spec.sigmas", "--sigmas"),
        ("spec.num_images", "--num-images"),
        ("spec.seed", "--seed"),
        ("spec.guidance_scale", "--guidance"),
        ("spec.guidance_rescale", "--guidance-rescale"),
        ("spec.init_image.image", "--init-image"),
        ("spec.init_image.mask", "--mask"),
        ("spec.init_image.mask_blur", "--mask-blur"),
        ("spec.init_image.padding_mask_crop", "--padding-mask-crop"),
        ("spec.init_image.strength", "--strength"),
        ("spec.init_image.denoising_start", "--denoising-start"),
        (
            "spec.micro_conditioning.aesthetic_score",
            "--aesthetic-score",
        ),
        (
            "spec.micro_conditioning.negative_aesthetic_score",
            "--negative-aesthetic-score",
        ),
        ("spec.refiner.high_noise_fraction", "--high-noise-fraction"),
        ("spec.refiner.strength", "--refiner-strength"),
        ("spec.refiner.steps", "--refiner-steps"),
        ("spec.refiner.guidance_scale", "--refiner-guidance"),
        ("spec.vae", "--vae"),
        ("spec.prompt", "--prompt"),
        ("spec.emphasis", "--emphasis"),
        ("spec.prompt_2", "--prompt-2"),
        ("spec.negative_prompt", "--negative-prompt"),
        ("spec.negative_prompt_2", "--negative-prompt-2"),
    ];
    if let Some((_, flag)) = flags.iter().find(|(f, _)| *f == field) {
        return Some(flag);
    }
    if field.starts_with("spec.loras") {
        return Some("--lora");
    }
    if field.starts_with("spec.controlnets") {
        return Some("--controlnet");
    }
    if field.starts_with("spec.embeddings") {
        return Some("--embedding");
    }
    if field.starts_with("spec.ip_adapters") {
        return Some("--ip-adapter");
    }
    if field.starts_with("spec.freeu") {
        return Some("--freeu");
    }
    if field == "spec.tiling" {
        return Some("--tiling");
    }
    if field.starts_with("spec.refiner.scheduler") {
        return Some("--refiner-scheduler");
    }
    if field.starts_with("spec.scheduler") {
        return Some("--scheduler/--scheduler-config");
    }
    None
}

/// A message only when something in it is set, as a client leaves it out otherwise.
fn present<M: Default + PartialEq>(message: M) -> Option<M> {
    (message != M::default()).then_some(message)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `--lora NAME:WEIGHT`.
fn lora(arg: &str) -> anyhow::Result<pb::LoraAdapter> {
    let (name, weight) = match arg.rsplit_once(':') {
        Some((name, weight)) => {
            let weight: f32 = weight
                .parse()
                .with_context(|| format!("--lora {arg:?}: the weight is not a number"))?;
            (name, Some(weight))
        }
        None => (arg, None),
    };
    Ok(pb::LoraAdapter {
        name: name.to_string(),
        weight,
        text_encoder_weight: None,
    })
}

/// `--freeu default|B1,B2,S1,S2`.
fn freeu(arg: &str) -> anyhow::Result<pb::FreeU> {
    if arg == "default" {
        return Ok(pb::FreeU::default());
    }
    let factors = arg
        .split(',')
        .map(|f| f.trim().parse::<f32>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--freeu {arg:?}: expected default or B1,B2,S1,S2"))?;
    let [b1, b2, s1, s2] = factors[..] else {
        bail!("--freeu {arg:?}: expected four factors B1,B2,S1,S2");
    };
    Ok(pb::FreeU {
        b1: Some(b1),
        b2: Some(b2),
        s1: Some(s1),
        s2: Some(s2),
    })
}

/// `--embedding FILE[:TOKEN]`: the file and the token, if one is given.
pub fn embedding_file(arg: &str) -> (PathBuf, Option<String>) {
    match arg.rsplit_once(':') {
        Some((file, token)) if !Path::new(arg).is_file() => {
            (PathBuf::from(file), Some(token.to_string()))
        }
        _ => (PathBuf::from(arg), None),
    }
}

/// The request's embedding of `--embedding FILE[:TOKEN]`, named by the file's stem in its
/// folder (an embedding root).
fn embedding(arg: &str) -> anyhow::Result<pb::TextualInversion> {
    let (file, token) = embedding_file(arg);
    let name = file
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("--embedding {arg:?} names no file"))?;
    Ok(pb::TextualInversion {
        name,
        token: token.unwrap_or_default(),
    })
}

/// The refiner stage the flags ask for.
fn refiner(args: &GenerateArgs, path: &Path) -> anyhow::Result<pb::RefinerStage> {
    let mut options = pb::SchedulerOptions::default();
    let scheduler = match &args.refiner_scheduler {
        Some(name) => named_scheduler(name, &mut options)?,
        None => 0,
    };
    let mode = match args.refiner_mode.as_str() {
        "ensemble" => pb::RefinerMode::EnsembleOfExperts,
        "img2img" => pb::RefinerMode::Img2img,
        other => bail!("--refiner-mode must be ensemble or img2img, got `{other}`"),
    };
    Ok(pb::RefinerStage {
        model: file_name(path)?,
        mode: mode as i32,
        high_noise_fraction: args.high_noise_fraction,
        strength: args.refiner_strength,
        steps: args.refiner_steps.unwrap_or(0),
        scheduler,
        scheduler_options: present(options),
        guidance_scale: args.refiner_guidance,
        aesthetic_score: args.aesthetic_score,
        negative_aesthetic_score: args.negative_aesthetic_score,
    })
}

/// The hires pass the --hires-* flags ask for (none without one).
fn hires(h: &HiresArgs) -> anyhow::Result<Option<pb::HiresPass>> {
    if !h.wanted() {
        return Ok(None);
    }
    let (width, height) = h.size()?;
    let mut options = pb::SchedulerOptions::default();
    let scheduler = match &h.hires_scheduler {
        Some(name) => named_scheduler(name, &mut options)?,
        None => 0,
    };
    Ok(Some(pb::HiresPass {
        scale: h.hires_scale,
        width,
        height,
        latent_upscale: h.latent_upscale()?,
        upscaler: h
            .hires_upscaler
            .as_deref()
            .map(file_name)
            .transpose()?
            .unwrap_or_default(),
        tile_size: h.hires_tile,
        steps: h.hires_steps.unwrap_or(0),
        strength: h.hires_strength,
        scheduler,
        scheduler_options: present(options),
        guidance_scale: h.hires_guidance,
        prompt: h.hires_prompt.clone(),
        prompt_2: h.hires_prompt_2.clone(),
        negative_prompt: h.hires_negative_prompt.clone(),
        negative_prompt_2: h.hires_negative_prompt_2.clone(),
        model: h
            .hires_model
            .as_deref()
            .map(file_name)
            .transpose()?
            .unwrap_or_default(),
        ..Default::default()
    }))
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} names no folder", path.display()))
}

/// The request the flags mean (the model itself is the registry's default model).
pub fn spec_of(args: &GenerateArgs) -> anyhow::Result<pb::GenerationSpec> {
    let mut options = pb::SchedulerOptions::default();
    let scheduler = match &args.scheduler {
        Some(name) => named_scheduler(name, &mut options)?,
        None => 0,
    };
    for pair in &args.scheduler_config {
        config_pair(pair, &mut options)?;
    }
    let init_image = match &args.init_image {
        Some(path) => Some(pb::InitImage {
            image: read(path)?,
            strength: args.strength,
            mask: args
                .mask
                .as_deref()
                .map(read)
                .transpose()?
                .unwrap_or_default(),
            mask_blur: args.mask_blur,
            denoising_start: args.denoising_start,
            padding_mask_crop: args.padding_mask_crop,
        }),
        None if args.mask.is_some() => bail!("--mask needs --init-image"),
        None => None,
    };
    Ok(pb::GenerationSpec {
        prompt: args.prompt.clone(),
        prompt_2: args.prompt_2.clone(),
        negative_prompt: args.negative_prompt.clone(),
        negative_prompt_2: args.negative_prompt_2.clone(),
        guidance_scale: args.guidance,
        guidance_rescale: args.guidance_rescale.unwrap_or(0.0),
        micro_conditioning: present(pb::MicroConditioning {
            aesthetic_score: args.aesthetic_score,
            negative_aesthetic_score: args.negative_aesthetic_score,
            ..Default::default()
        }),
        width: args.width.unwrap_or(0),
        height: args.height.unwrap_or(0),
        steps: args.steps.unwrap_or(0),
        scheduler,
        scheduler_options: present(options),
        timesteps: args.timesteps.clone(),
        sigmas: args.sigmas.clone(),
        seed: args.seed,
        num_images: args.num_images.unwrap_or(0),
        vae: args
            .vae
            .as_deref()
            .map(file_name)
            .transpose()?
            .unwrap_or_default(),
        refiner: args
            .refiner
            .as_deref()
            .map(|r| refiner(args, r))
            .transpose()?,
        loras: args
            .loras
            .iter()
            .map(|l| lora(l))
            .collect::<anyhow::Result<_>>()?,
        controlnets: args
            .controlnets
            .iter()
            .map(|c| Ok(crate::cli::controlnet::parse(c)?.unit))
            .collect::<anyhow::Result<_>>()?,
        embeddings: args
            .embeddings
            .iter()
            .map(|e| embedding(e))
            .collect::<anyhow::Result<_>>()?,
        ip_adapters: args
            .ip_adapters
            .iter()
            .map(|a| Ok(crate::cli::ip_adapter::parse(a)?.prompt))
            .collect::<anyhow::Result<_>>()?,
        init_image,
        hires: hires(&args.hires)?,
        freeu: args.freeu.as_deref().map(freeu).transpose()?,
        pag: crate::cli::pag::parse(&args.pag)?,
        variation: crate::cli::variation::parse(&args.variation)?,
        guider: crate::cli::guider::parse(args.guider.as_deref())?,
        tiling: match args.tiling {
            None => pb::Tiling::Unspecified,
            Some(TilingArg::Both) => pb::Tiling::Both,
            Some(TilingArg::X) => pb::Tiling::X,
            Some(TilingArg::Y) => pb::Tiling::Y,
        } as i32,
        prompt_syntax: match args.prompt_syntax {
            None => pb::PromptSyntax::Unspecified,
            Some(PromptSyntaxArg::Plain) => pb::PromptSyntax::Plain,
            Some(PromptSyntaxArg::Compel) => pb::PromptSyntax::Compel,
            Some(PromptSyntaxArg::A1111) => pb::PromptSyntax::A1111,
        } as i32,
        emphasis: match args.emphasis {
            None => pb::Emphasis::Unspecified,
            Some(EmphasisArg::Original) => pb::Emphasis::Original,
            Some(EmphasisArg::NoNorm) => pb::Emphasis::NoNorm,
            Some(EmphasisArg::Ignore) => pb::Emphasis::Ignore,
            Some(EmphasisArg::None) => pb::Emphasis::None,
        } as i32,
        ..Default::default()
    })
}
