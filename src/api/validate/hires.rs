//! `spec.hires`: the final size (a scale or an explicit size), how the first pass is
//! enlarged (latent interpolation or an upscaler model and its tiling), and the second
//! pass's steps, strength, scheduler and guidance.

use crate::api::validate::fields::{enum_value, model_name, optional_float, Range, Violations};
use crate::api::validate::model::named;
use crate::api::validate::postprocess::tiling;
use crate::api::validate::sampling::{scheduler, GUIDANCE};
use crate::api::validate::Deferred;
use crate::config::Limits;
use crate::engine::hires::{Enlarge, HiresParams, LatentInterpolation, PassPrompts};
use crate::engine::registry::{ModelEntry, ModelKind, Registry};
use crate::engine::schedulers::options::a1111_name;
use crate::engine::schedulers::{SchedulerKind, SchedulerOptions, SchedulerOverrides};
use crate::jobs::{HiresJob, LoraJob};
use crate::proto::v1 as pb;

const P: &str = "spec.hires";
/// The enlargement a request may ask for.
const SCALE: Range = Range::closed(1.0, 4.0);
/// A1111's default denoising strength of the second pass.
const DEFAULT_STRENGTH: f64 = 0.7;

/// What the first pass contributes to the hires pass's defaults and bounds.
pub struct FirstPass<'a> {
    /// Its size in pixels.
    pub size: (u32, u32),
    /// Its steps.
    pub steps: u32,
    /// Its guidance scale.
    pub guidance_scale: f64,
    /// Its scheduler as asked (`None`: the model's) and options.
    pub scheduler: &'a (Option<SchedulerKind>, SchedulerOptions),
    /// The model's own scheduler.
    pub model_scheduler: Option<SchedulerKind>,
    /// Its texts as the syntax reads them.
    pub prompts: PassPrompts,
    /// The hires pass's own prompt as the syntax reads it (extra network tags taken
    /// out), where the syntax takes tags out.
    pub hires_prompt: Option<&'a str>,
    /// The hires pass's LoRAs where they are not the first pass's.
    pub hires_loras: Option<&'a [LoraJob]>,
    /// Its model (`None` where it did not resolve).
    pub model: Option<&'a ModelEntry>,
    /// What the request asks of the UNet of each pass.
    pub unet_asks: UnetAsks,
}

/// What a request asks of the UNet of each pass it runs on the base model: the layers
/// perturbed-attention guidance and image prompts act in, and a negative prediction for
/// a guider.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnetAsks {
    pub pag: bool,
    pub image_prompts: bool,
    pub guider: bool,
}

/// The hires pass, when every field is valid.
pub fn hires(
    h: &pb::HiresPass,
    first: &FirstPass,
    registry: &Registry,
    limits: &Limits,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<HiresJob> {
    let upscaler = upscaler(h, registry, v, deferred);
    let model = own_model(h, first, registry, v, deferred);
    let (width, height, scale) = final_size(h, first.size, limits, v)?;
    let steps = match h.steps {
        0 => first.steps,
        s if s > limits.max_steps => {
            let max = limits.max_steps;
            v.add(
                format!("{P}.steps"),
                format!("must be at most {max}, got {s}"),
            );
            return None;
        }
        s => s,
    };
    let strength = optional_float(
        v,
        &format!("{P}.strength"),
        h.strength,
        Range::open_closed(0.0, 1.0),
        DEFAULT_STRENGTH,
    );
    if !v.names(&format!("{P}.strength")) && f64::from(steps) * strength < 1.0 {
        v.add(
            format!("{P}.strength"),
            format!("{strength} x {steps} steps leaves no step to run"),
        );
    }
    let guidance_scale = optional_float(
        v,
        &format!("{P}.guidance_scale"),
        h.guidance_scale,
        GUIDANCE,
        first.guidance_scale,
    );
    let (scheduler_overrides, sampler_name) = second_scheduler(h, first, v)?;
    let enlarge = enlarge(h, v)?;
    let params = HiresParams {
        width: i64::from(width),
        height: i64::from(height),
        steps: steps as usize,
        strength,
        guidance_scale,
        scheduler_overrides,
        enlarge,
        prompts: pass_prompts(h, first),
    };
    let unresolved = |name: &str, resolved: bool| !name.is_empty() && !resolved;
    if unresolved(&h.upscaler, upscaler.is_some()) || unresolved(&h.model, model.is_some()) {
        return None;
    }
    Some(HiresJob {
        params,
        upscaler,
        scale,
        sampler_name,
        written_prompt: h.prompt.clone(),
        loras: first.hires_loras.map(<[LoraJob]>::to_vec),
        model: model.flatten(),
    })
}

/// The first pass's texts, its prompt read as `prompt` (extra network tags taken out).
pub fn first_pass_prompts(spec: &pb::GenerationSpec, prompt: &str) -> PassPrompts {
    PassPrompts {
        prompt: prompt.to_string(),
        prompt_2: spec.prompt_2.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        negative_prompt_2: spec.negative_prompt_2.clone(),
    }
}

/// The pass's own texts, each falling back to the first pass's, when it has any.
fn pass_prompts(h: &pb::HiresPass, first: &FirstPass) -> Option<PassPrompts> {
    let texts = [
        &h.prompt,
        &h.prompt_2,
        &h.negative_prompt,
        &h.negative_prompt_2,
    ];
    if texts.iter().all(|t| t.is_none()) {
        return None;
    }
    let own = |text: &Option<String>, first: &Option<String>| text.clone().or(first.clone());
    let prompt = match (&h.prompt, first.hires_prompt) {
        (Some(_), Some(untagged)) => untagged.to_string(),
        (Some(written), None) => written.clone(),
        (None, _) => first.prompts.prompt.clone(),
    };
    Some(PassPrompts {
        prompt,
        prompt_2: own(&h.prompt_2, &first.prompts.prompt_2),
        negative_prompt: own(&h.negative_prompt, &first.prompts.negative_prompt),
        negative_prompt_2: own(&h.negative_prompt_2, &first.prompts.negative_prompt_2),
    })
}

/// The upscaler model the pass names, resolved (NOT_FOUND deferred).
fn upscaler(
    h: &pb::HiresPass,
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<ModelEntry> {
    let field = format!("{P}.upscaler");
    if h.upscaler.is_empty() || !model_name(v, &field, &h.upscaler) {
        return None;
    }
    named(
        registry,
        ModelKind::Upscaler,
        &h.upscaler,
        &field,
        v,
        deferred,
    )
}

/// The pass's own base model (A1111's "Hires checkpoint"): `Some(None)` for the first
/// pass's (unnamed, or named as `spec.model` is), `Some(Some(model))` for another that
/// resolves and fits what the request asks of its UNet, `None` otherwise.
fn own_model(
    h: &pb::HiresPass,
    first: &FirstPass,
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<Option<ModelEntry>> {
    let field = format!("{P}.model");
    if h.model.is_empty() {
        return Some(None);
    }
    if !model_name(v, &field, &h.model) {
        return None;
    }
    let model = named(registry, ModelKind::Base, &h.model, &field, v, deferred)?;
    let base = first.model?;
    if model.path == base.path {
        return Some(None);
    }
    let misfits = misfits(&model, base, first.unet_asks);
    for why in &misfits {
        v.add(field.clone(), why.clone());
    }
    misfits.is_empty().then_some(Some(model))
}

/// Why `model` cannot run the hires pass of a request on `base` that asks `asks` of its
/// UNet.
fn misfits(model: &ModelEntry, base: &ModelEntry, asks: UnetAsks) -> Vec<String> {
    let (Some(own), Some(first)) = (&model.pipeline, &base.pipeline) else {
        return Vec::new();
    };
    let name = &model.name;
    let mut why = Vec::new();
    if own.inpainting {
        why.push(format!(
            "`{name}` is an inpainting model (its UNet takes a mask and the masked image), which the hires pass does not have"
        ));
    }
    if asks.pag && own.self_attentions != first.self_attentions {
        why.push(format!(
            "`{name}`'s UNet has other self-attention layers than `{}`'s, which spec.pag perturbs in both passes",
            base.name
        ));
    }
    if asks.image_prompts && own.attentions != first.attentions {
        why.push(format!(
            "`{name}`'s UNet has other attention layers than `{}`'s, in which spec.ip_adapters act in both passes",
            base.name
        ));
    }
    if asks.guider && own.guidance_distilled {
        why.push(format!(
            "`{name}`'s UNet is guidance-distilled (time_cond_proj_dim) and makes no negative prediction for spec.guider to combine"
        ));
    }
    why
}

/// The final size and the scale it came from (`None` for an explicit size).
fn final_size(
    h: &pb::HiresPass,
    first: (u32, u32),
    limits: &Limits,
    v: &mut Violations,
) -> Option<(u32, u32, Option<f64>)> {
    let (width, height, scale) = match (h.width, h.height) {
        (0, 0) => {
            let scale = optional_float(v, &format!("{P}.scale"), h.scale, SCALE, 2.0);
            // A1111: int(side x scale), then whole latents (multiples of 8).
            let side = |s: u32| ((f64::from(s) * scale) as u32) / 8 * 8;
            (side(first.0), side(first.1), Some(scale))
        }
        (0, _) | (_, 0) => {
            v.add(
                format!("{P}.width"),
                "must be set together with height (or neither, for scale)",
            );
            return None;
        }
        (w, h) => (w, h, None),
    };
    let sides = [
        ("width", width, first.0, limits.max_width),
        ("height", height, first.1, limits.max_height),
    ];
    let bad: Vec<_> = sides
        .into_iter()
        .filter(|&(_, value, least, max)| value % 8 != 0 || value < least || value > max)
        .collect();
    let rule = |least, max| format!("a multiple of 8 between the first pass's {least} and {max}");
    match scale {
        // One violation, on the one field the client sent.
        Some(scale) => {
            if let Some((field, value, least, max)) = bad.first() {
                let why = format!(
                    "{scale} makes a {field} of {value}; it must be {}",
                    rule(least, max)
                );
                v.add(format!("{P}.scale"), why);
            }
        }
        None => {
            for (field, value, least, max) in &bad {
                let why = format!("must be {}, got {value}", rule(least, max));
                v.add(format!("{P}.{field}"), why);
            }
        }
    }
    bad.is_empty().then_some((width, height, scale))
}

/// The second pass's scheduler (the first pass's unless one is named) and its A1111 name.
fn second_scheduler(
    h: &pb::HiresPass,
    first: &FirstPass,
    v: &mut Violations,
) -> Option<(SchedulerOverrides, String)> {
    let named = h.scheduler != pb::Scheduler::Unspecified as i32;
    let (kind, options) = if named {
        let options = h.scheduler_options.as_ref();
        scheduler(P, h.scheduler, options, first.model_scheduler, v)
    } else {
        if h.scheduler_options.is_some() {
            v.add(
                format!("{P}.scheduler_options"),
                "applies only with scheduler set (unset, the first pass's scheduler and options run)",
            );
            return None;
        }
        first.scheduler.clone()
    };
    let runs = kind
        .or(first.model_scheduler)
        .unwrap_or(SchedulerKind::Euler);
    Some((options.overrides(kind), a1111_name(runs, &options)))
}

/// How the first pass is enlarged.
fn enlarge(h: &pb::HiresPass, v: &mut Violations) -> Option<Enlarge> {
    let field = format!("{P}.latent_upscale");
    let mode = enum_value::<pb::LatentUpscale>(v, &field, h.latent_upscale)?;
    if h.upscaler.is_empty() {
        return Some(Enlarge::Latent(match mode {
            pb::LatentUpscale::Nearest => LatentInterpolation::Nearest,
            pb::LatentUpscale::NearestExact => LatentInterpolation::NearestExact,
            pb::LatentUpscale::Bicubic => LatentInterpolation::Bicubic,
            pb::LatentUpscale::Bilinear | pb::LatentUpscale::Unspecified => {
                LatentInterpolation::Bilinear
            }
        }));
    }
    if mode != pb::LatentUpscale::Unspecified {
        v.add(
            format!("{P}.upscaler"),
            "names an upscaler model; latent_upscale must then be unset",
        );
        return None;
    }
    Some(Enlarge::Model(tiling(P, h.tile_size, h.tile_overlap, v)?))
}
