//! What a PNG says about how it was made: A1111's `parameters` text (which image tools
//! read) and the resolved request that replays it exactly.

use crate::engine::control::{ControlMode, ResizeMode};
use crate::engine::hires::Enlarge;
use crate::engine::preprocess::depth_anything::DepthAnythingVersion;
use crate::engine::preprocess::detector::{DetectorNetwork, TEED_SAFE_STEPS};
use crate::engine::preprocess::pose::PoseParts;
use crate::engine::preprocess::recolor::Lightness;
use crate::engine::preprocess::Preprocessor;
use crate::engine::registry::{ModelEntry, ModelKind};
use crate::engine::request::{
    Emphasis, GenerateParams, Guider, GuiderKind, PromptSyntax, RefinerMode,
};
use crate::jobs::events::ModelUsed;
use crate::jobs::{ControlNetJob, JobSpec, PostStep};
use crate::output::PngMetadata;

/// The first `n` characters of a hash (A1111 shows short hashes).
fn short(hash: &str, n: usize) -> &str {
    &hash[..hash.len().min(n)]
}

/// The hash of the model of `kind` named `name` among those the job used.
fn hash_of<'a>(models: &'a [ModelUsed], kind: ModelKind, name: &str) -> &'a str {
    models
        .iter()
        .find(|m| m.kind == kind && m.name == name)
        .map_or("", |m| m.sha256.as_str())
}

/// A1111's `, <label>: "name: hash, ..."` entry (12 hex digits each), or nothing for no
/// models.
fn hashes_entry<'a>(
    label: &str,
    kind: ModelKind,
    named: impl Iterator<Item = (&'a str, &'a ModelEntry)>,
    models: &[ModelUsed],
) -> String {
    // A1111 drops `:` and `,` from the names, which would break the list apart.
    let hashes: Vec<String> = named
        .map(|(name, model)| {
            let name = name.replace([':', ','], "");
            format!("{name}: {}", short(hash_of(models, kind, &model.name), 12))
        })
        .collect();
    if hashes.is_empty() {
        return String::new();
    }
    format!(", {label}: \"{}\"", hashes.join(", "))
}

/// A1111's `Emphasis` entry: written where the emphasis is not the default and a text
/// has brackets (A1111 checks each text it encodes for `(` or `[`).
fn emphasis_entry(p: &GenerateParams) -> String {
    let texts = [
        Some(&p.prompt),
        p.prompt_2.as_ref(),
        p.negative_prompt.as_ref(),
        p.negative_prompt_2.as_ref(),
    ];
    let bracketed = texts.into_iter().flatten().any(|t| t.contains(['(', '[']));
    if p.prompt_syntax != PromptSyntax::A1111 || p.emphasis == Emphasis::Original || !bracketed {
        return String::new();
    }
    format!(", Emphasis: {}", p.emphasis.name())
}

/// The metadata of image `index` (seed `seed`) of `spec`, which used `models`.
pub fn png_metadata(spec: &JobSpec, models: &[ModelUsed], index: usize, seed: u64) -> PngMetadata {
    PngMetadata {
        parameters: a1111_parameters(spec, models, (index, seed)),
        request_json: spec.replay.get(index).cloned().unwrap_or_default(),
    }
}

/// The LoRAs of the request's list as tags: A1111 writes the LoRAs a prompt used into
/// the prompt itself (`te` before `unet`).
fn listed_lora_tags(spec: &JobSpec) -> String {
    let mut text = String::new();
    for lora in spec.loras.iter().filter(|l| l.tag_name.is_none()) {
        text.push_str(&format!(
            " <lora:{}:{}",
            lora.model.name, lora.text_encoder_weight
        ));
        if lora.weight != lora.text_encoder_weight {
            text.push_str(&format!(":{}", lora.weight));
        }
        text.push('>');
    }
    text
}

/// A value as A1111's infotext writes it (`quote`): as it is, or JSON-quoted where it
/// holds a comma, a colon or a line break.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_default()
    } else {
        value.to_string()
    }
}

/// A1111's variation entries for image `index` (each image records its own seed).
fn variation_entries(p: &GenerateParams, index: usize) -> String {
    let Some(variation) = p.variation.map(|v| v.nth(index as u64)) else {
        return String::new();
    };
    let mut text = String::new();
    if variation.strength > 0.0 {
        text.push_str(&format!(
            ", Variation seed: {}, Variation seed strength: {}",
            variation.seed, variation.strength
        ));
    }
    if let Some((width, height)) = variation.resize_from {
        text.push_str(&format!(", Seed resize from: {width}x{height}"));
    }
    text
}

/// A1111's `parameters` text for one image.
fn a1111_parameters(spec: &JobSpec, models: &[ModelUsed], (index, seed): (usize, u64)) -> String {
    let p = &spec.params;
    let mut text = spec.written_prompt.clone();
    text.push_str(&listed_lora_tags(spec));
    if let Some(negative) = &p.negative_prompt {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    let hash = hash_of(models, ModelKind::Base, &spec.model.name);
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}, Version: sdxld {}",
        p.steps,
        spec.sampler_name,
        p.guidance_scale,
        seed,
        p.width,
        p.height,
        short(hash, 10),
        spec.model.name,
        env!("CARGO_PKG_VERSION"),
    ));
    if p.guidance_rescale > 0.0 {
        text.push_str(&format!(", CFG rescale: {}", p.guidance_rescale));
    }
    text.push_str(&emphasis_entry(p));
    text.push_str(&init_image_entries(spec));
    if let Some(vae) = &spec.vae {
        let hash = hash_of(models, ModelKind::Vae, &vae.name);
        text.push_str(&format!(
            ", VAE hash: {}, VAE: {}",
            short(hash, 10),
            vae.name
        ));
    }
    text.push_str(&variation_entries(p, index));
    // A1111 names a LoRA as its tag mentions it; the hires pass's own follow.
    let loras = spec.loras.iter().chain(spec.hires_only_loras()).map(|l| {
        let name = l.tag_name.as_deref().unwrap_or(&l.model.name);
        (name, &l.model)
    });
    text.push_str(&hashes_entry("Lora hashes", ModelKind::Lora, loras, models));
    let embeddings = spec.embeddings.iter().map(|e| (e.token.as_str(), &e.model));
    text.push_str(&hashes_entry(
        "TI hashes",
        ModelKind::Embedding,
        embeddings,
        models,
    ));
    for (i, unit) in spec.controlnets.iter().enumerate() {
        let hash = hash_of(models, ModelKind::ControlNet, &unit.model.name);
        text.push_str(&format!(
            ", ControlNet {i}: \"{}\"",
            controlnet_entry(unit, hash)
        ));
    }
    // A1111's ControlNet extension runs IP-Adapters as ControlNet units.
    for (i, prompt) in spec.ip_adapters.iter().enumerate() {
        let hash = hash_of(models, ModelKind::IpAdapter, &prompt.adapter.name);
        let layers = match prompt.layers.attentions() {
            Some(only) => format!(", Layers: {}", only.join(" + ")),
            None => String::new(),
        };
        let masks = match prompt.masks.len() {
            0 => String::new(),
            n => format!(", Masks: {n}"),
        };
        let encoder_hash = hash_of(models, ModelKind::ImageEncoder, &prompt.encoder.name);
        text.push_str(&format!(
            ", ControlNet {}: \"Module: ip-adapter_clip, Model: {} [{}], Weight: {}, Image Encoder: {} [{}]{layers}{masks}\"",
            spec.controlnets.len() + i,
            prompt.adapter.name,
            short(hash, 8),
            prompt.scale,
            prompt.encoder.name,
            short(encoder_hash, 8),
        ));
    }
    if let Some(refiner) = &spec.refiner {
        let hash = hash_of(models, ModelKind::Refiner, &refiner.model.name);
        text.push_str(&format!(
            ", Refiner: {} [{}]",
            refiner.model.name,
            short(hash, 10)
        ));
        match refiner.params.mode {
            RefinerMode::EnsembleOfExperts {
                high_noise_fraction,
            } => text.push_str(&format!(", Refiner switch at: {high_noise_fraction}")),
            RefinerMode::Img2Img { strength } => {
                text.push_str(&format!(", Refiner strength: {strength}"))
            }
        }
    }
    if let Some(f) = spec.params.freeu {
        text.push_str(&format!(
            ", FreeU: \"b1 {}, b2 {}, s1 {}, s2 {}\"",
            f.b1, f.b2, f.s1, f.s2
        ));
    }
    if let Some(axes) = spec.params.seamless {
        // A1111 writes `Tiling: True` for its both-axes tiling.
        let tiling = match (axes.x, axes.y) {
            (true, false) => "X",
            (false, true) => "Y",
            _ => "True",
        };
        text.push_str(&format!(", Tiling: {tiling}"));
    }
    if let Some(guider) = &spec.params.guider {
        text.push_str(&format!(", Guider: \"{}\"", guider_entry(guider)));
    }
    if let Some(pag) = &spec.params.pag {
        let layers: Vec<String> = pag.layers.iter().map(ToString::to_string).collect();
        text.push_str(&format!(
            ", PAG: \"scale {}, adaptive scale {}, layers {}\"",
            pag.scale,
            pag.adaptive_scale,
            layers.join(" ")
        ));
    }
    text.push_str(&hires_entries(spec, models));
    text.push_str(&postprocess_entries(spec));
    text
}

/// A guider's rule, options and interval.
fn guider_entry(guider: &Guider) -> String {
    let rule = match guider.kind {
        GuiderKind::Cfg => "CFG".to_string(),
        GuiderKind::Tcfg => "TCFG".to_string(),
        GuiderKind::Apg {
            momentum,
            norm_threshold,
            eta,
        } => {
            let momentum = momentum.map_or("none".to_string(), |m| m.to_string());
            format!("APG, momentum {momentum}, norm threshold {norm_threshold}, eta {eta}")
        }
    };
    format!("{rule}, interval {} to {}", guider.start, guider.stop)
}

/// Image to image and inpainting as A1111 writes them: `Denoising strength` (its hires
/// pass writes its own) and, with a mask, `Mask blur`.
fn init_image_entries(spec: &JobSpec) -> String {
    let Some(init) = &spec.params.init_image else {
        return String::new();
    };
    let mut text = String::new();
    if init.denoising_start.is_none() && spec.hires.is_none() {
        text.push_str(&format!(", Denoising strength: {}", init.strength));
    }
    if init.mask.is_some() {
        text.push_str(&format!(", Mask blur: {}", spec.mask_blur));
    }
    if let Some(back) = &spec.paste_back {
        text.push_str(&format!(
            ", Inpaint area: Only masked, Masked area padding: {}",
            back.padding
        ));
    }
    text
}

/// The hires pass as A1111 writes it (`Hires upscale` or `Hires resize`, `Hires steps`,
/// `Hires upscaler`, `Denoising strength`, its own model, guidance and sampler, and its
/// own prompts).
fn hires_entries(spec: &JobSpec, models: &[ModelUsed]) -> String {
    let Some(hires) = &spec.hires else {
        return String::new();
    };
    let h = &hires.params;
    let size = match hires.scale {
        Some(scale) => format!("Hires upscale: {scale}"),
        None => format!("Hires resize: {}x{}", h.width, h.height),
    };
    let upscaler = match (&hires.upscaler, h.enlarge) {
        (Some(model), _) => model.name.clone(),
        (None, Enlarge::Latent(mode)) => mode.a1111_name().to_string(),
        (None, Enlarge::Model(_)) => String::new(),
    };
    let checkpoint = match &hires.model {
        // A1111's short title: the name and the short hash.
        Some(model) => {
            let hash = short(hash_of(models, ModelKind::Base, &model.name), 10);
            format!(", Hires checkpoint: {} [{hash}]", model.name)
        }
        None => String::new(),
    };
    let mut text = format!(
        ", Denoising strength: {}, {size}, Hires steps: {}, Hires upscaler: {upscaler}{checkpoint}, Hires CFG Scale: {}, Hires sampler: {}",
        h.strength, h.steps, h.guidance_scale, hires.sampler_name
    );
    // Written where they differ from the first pass's, as A1111 writes them (the
    // listed LoRAs in both: A1111 runs the hires prompt's).
    let own_prompt = hires.written_prompt.as_ref();
    if let Some(prompt) = own_prompt.filter(|p| **p != spec.written_prompt) {
        let prompt = format!("{prompt}{}", listed_lora_tags(spec));
        text.push_str(&format!(", Hires prompt: {}", quote(&prompt)));
    }
    let negative = h.prompts.as_ref().map(|t| &t.negative_prompt);
    if let Some(negative) = negative.filter(|n| **n != spec.params.negative_prompt) {
        let negative = negative.as_deref().unwrap_or("");
        text.push_str(&format!(", Hires negative prompt: {}", quote(negative)));
    }
    text
}

/// The post-processing steps as A1111's extras tab writes them (`Postprocess upscale by`,
/// `Postprocess upscaler`), numbered from the second step on.
fn postprocess_entries(spec: &JobSpec) -> String {
    spec.post_processing
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let PostStep::Upscale(job) = step;
            let n = if i == 0 {
                String::new()
            } else {
                format!(" {}", i + 1)
            };
            format!(
                ", Postprocess upscale by{n}: {}, Postprocess upscaler{n}: {}",
                job.factor, job.model.name
            )
        })
        .collect()
}

/// A ControlNet unit as sd-webui-controlnet writes it into `parameters`.
fn controlnet_entry(unit: &ControlNetJob, hash: &str) -> String {
    let settings = &unit.unit;
    let first = unit.inputs.first().map(|i| i.preprocessing);
    // Depth, soft edges and scribbles name the network that drew them.
    let detector = unit.inputs.first().and_then(|i| i.detector.as_ref());
    let network = detector.map(|d| d.network);
    let depth_anything = detector.and_then(|d| d.depth_anything);
    let (edges, safe_edges) = match network {
        Some(DetectorNetwork::PiDiNet) => ("pidinet", "pidisafe"),
        _ => ("hed", "hedsafe"),
    };
    let mut module = match first.map(|p| p.preprocessor) {
        Some(Preprocessor::Canny { low, high }) => {
            format!("canny, Threshold A: {low}, Threshold B: {high}")
        }
        Some(Preprocessor::Lineart) => "lineart_realistic".to_string(),
        Some(Preprocessor::LineartAnime) => "lineart_anime".to_string(),
        Some(Preprocessor::LineartStandard) => "lineart_standard".to_string(),
        // A1111's MiDaS module runs the DPT models transformers calls DPT.
        Some(Preprocessor::Depth(_)) if network == Some(DetectorNetwork::Dpt) => {
            "depth_midas".to_string()
        }
        Some(Preprocessor::Depth(_)) if network == Some(DetectorNetwork::ZoeDepth) => {
            "depth_zoe".to_string()
        }
        // A1111's LeReS module takes its near and background cuts as its thresholds.
        Some(Preprocessor::Depth(cuts)) if network == Some(DetectorNetwork::Leres) => {
            let (near, background) = (cuts.near.0, cuts.background.0);
            format!("depth_leres, Threshold A: {near}, Threshold B: {background}")
        }
        Some(Preprocessor::Depth(_)) if depth_anything == Some(DepthAnythingVersion::First) => {
            "depth_anything".to_string()
        }
        Some(Preprocessor::Depth(_)) => "depth_anything_v2".to_string(),
        // A1111's TEED module takes its safe steps as Threshold A.
        Some(Preprocessor::SoftEdge { safe_steps }) if network == Some(DetectorNetwork::Teed) => {
            let steps = safe_steps.unwrap_or(TEED_SAFE_STEPS);
            format!("softedge_teed, Threshold A: {steps}")
        }
        Some(Preprocessor::SoftEdge { safe_steps }) if safe_steps.unwrap_or(0) > 0 => {
            format!("softedge_{safe_edges}")
        }
        Some(Preprocessor::SoftEdge { .. }) => format!("softedge_{edges}"),
        Some(Preprocessor::Scribble) => format!("scribble_{edges}"),
        Some(Preprocessor::Sketch) => "t2ia_sketch_pidi".to_string(),
        Some(Preprocessor::ScribbleXdog { threshold }) => {
            format!("scribble_xdog, Threshold A: {threshold}")
        }
        Some(Preprocessor::Anyline) => "softedge_anyline".to_string(),
        // A1111 writes a module's slider values as its thresholds.
        Some(Preprocessor::TileResample { rate }) => {
            format!("tile_resample, Threshold A: {}", rate.0)
        }
        Some(Preprocessor::Blur { sigma }) => format!("blur_gaussian, Threshold A: {}", sigma.0),
        Some(Preprocessor::Invert) => "invert".to_string(),
        Some(Preprocessor::Recolor { lightness, gamma }) => {
            let module = match lightness {
                Lightness::Luminance => "recolor_luminance",
                Lightness::Intensity => "recolor_intensity",
            };
            format!("{module}, Threshold A: {}", gamma.0)
        }
        Some(Preprocessor::Segmentation) => "seg_upernet_ade20k".to_string(),
        Some(Preprocessor::OpenPose(parts)) => pose_module(parts).to_string(),
        Some(Preprocessor::Normal) => "normal_bae".to_string(),
        Some(Preprocessor::Mlsd(t)) => {
            format!(
                "mlsd, Threshold A: {}, Threshold B: {}",
                t.score, t.distance
            )
        }
        Some(Preprocessor::None) | None => "none".to_string(),
    };
    let detector = first.filter(|p| p.preprocessor != Preprocessor::None);
    if let Some(resolution) = detector.and_then(|p| p.detect_resolution) {
        module.push_str(&format!(", Processor Res: {resolution}"));
    }
    let resize = match unit.resize {
        ResizeMode::JustResize => "Just Resize",
        ResizeMode::CropAndResize => "Crop and Resize",
        ResizeMode::ResizeAndFill => "Resize and Fill",
    };
    let mode = match settings.mode {
        ControlMode::Balanced => "Balanced",
        ControlMode::Guess => "Guess Mode",
    };
    let pixel_perfect = if unit.pixel_perfect {
        ", Pixel Perfect: True"
    } else {
        ""
    };
    let mut entry = format!(
        "Module: {module}, Model: {} [{}], Weight: {}, Resize Mode: {resize}, Guidance Start: {}, Guidance End: {}{pixel_perfect}, Control Mode: {mode}",
        unit.model.name,
        short(hash, 8),
        settings.scale,
        settings.guidance_start,
        settings.guidance_end,
    );
    if !settings.conditions.is_empty() {
        let types: Vec<String> = settings
            .conditions
            .iter()
            .map(|c| format!("{:?} {}", c.control_type, c.scale))
            .collect();
        entry.push_str(&format!(", Union: {}", types.join(" + ")));
    }
    entry
}

/// sd-webui-controlnet's name of the OpenPose module that draws `parts`.
fn pose_module(parts: PoseParts) -> &'static str {
    match (parts.body, parts.hands, parts.face) {
        (true, true, true) => "openpose_full",
        (true, true, false) => "openpose_hand",
        (true, false, true) => "openpose_face",
        (false, _, _) => "openpose_faceonly",
        (true, false, false) => "openpose",
    }
}
