//! `spec.post_processing` and the Upscale RPC's request: each step's model, factor and
//! tiling, checked against the upscaler's native scale and the size each step makes.

use std::sync::Arc;

use crate::api::status::ApiError;
use crate::api::validate::fields::{first_seed, model_name, Violations};
use crate::api::validate::images::{max_image_pixels, required_image};
use crate::api::validate::model::named;
use crate::api::validate::output::{client_job_id, output};
use crate::api::validate::{Context, Deferred};
use crate::engine::registry::{ModelKind, Registry};
use crate::engine::upscale::tiles::{TilePlan, MAX_TILE};
use crate::jobs::{ConditioningImage, PostStep, UpscaleJob, UpscaleSpec};
use crate::output::OutputFormat;
use crate::proto::v1 as pb;

/// Most post-processing steps in one request.
pub const MAX_POST_PROCESSING: usize = 8;
/// Context pixels around each tile (RealESRGANer's default `tile_pad`).
pub const TILE_PAD: u32 = 10;

/// What the steps are checked against.
pub struct Frame<'a> {
    pub registry: &'a Registry,
    /// The generated images' size.
    pub size: (u32, u32),
    /// Most pixels a step may make.
    pub max_pixels: u64,
    pub format: OutputFormat,
}

/// `spec.post_processing`: the job's steps when every field is valid.
pub fn post_processing(
    steps: &[pb::PostProcessStep],
    frame: &Frame,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<PostStep> {
    if steps.len() > MAX_POST_PROCESSING {
        v.add(
            "spec.post_processing",
            format!("has {} steps; at most {MAX_POST_PROCESSING}", steps.len()),
        );
        return Vec::new();
    }
    if !steps.is_empty() && frame.format == OutputFormat::Latents {
        v.add(
            "spec.post_processing",
            "applies to images; latents output has none",
        );
        return Vec::new();
    }
    let mut size = (u64::from(frame.size.0), u64::from(frame.size.1));
    let mut checked = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let p = format!("spec.post_processing[{i}]");
        let Some(pb::post_process_step::Step::Upscale(u)) = &step.step else {
            v.add(p, "names no step");
            continue;
        };
        if let Some(job) = upscale(&format!("{p}.upscale"), u, frame, &mut size, v, deferred) {
            checked.push(PostStep::Upscale(job));
        }
    }
    checked
}

/// One upscale step (fields under `p`); `size` becomes the size it makes.
fn upscale(
    p: &str,
    u: &pb::UpscaleStep,
    frame: &Frame,
    size: &mut (u64, u64),
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<UpscaleJob> {
    let field = format!("{p}.model");
    let model = if u.model.is_empty() {
        v.add(&field, "is required");
        None
    } else if model_name(v, &field, &u.model) {
        named(
            frame.registry,
            ModelKind::Upscaler,
            &u.model,
            &field,
            v,
            deferred,
        )
    } else {
        None
    };
    // A file of no served layout has no native scale: its load says why.
    let native = model.as_ref().and_then(|m| m.upscaler).map(|f| f.scale);
    let factor = match (u.factor, native) {
        (0, native) => native.unwrap_or(1),
        (f, Some(n)) if f > n => {
            v.add(
                format!("{p}.factor"),
                format!("must be at most the model's native scale {n}, got {f}"),
            );
            return None;
        }
        (f, _) if f > 8 => {
            v.add(format!("{p}.factor"), format!("must be at most 8, got {f}"));
            return None;
        }
        (f, _) => f,
    };
    *size = (size.0 * u64::from(factor), size.1 * u64::from(factor));
    if size.0 * size.1 > frame.max_pixels {
        v.add(
            format!("{p}.factor"),
            format!(
                "would make {}x{} images, more than {} pixels",
                size.0, size.1, frame.max_pixels
            ),
        );
        return None;
    }
    let tiling = tiling(p, u.tile_size, u.tile_overlap, v)?;
    Some(UpscaleJob {
        model: model?,
        factor,
        tiling,
    })
}

/// `tile_size` and `tile_overlap` of the message at `p`.
pub fn tiling(
    p: &str,
    tile_size: u32,
    tile_overlap: Option<u32>,
    v: &mut Violations,
) -> Option<TilePlan> {
    let side = match tile_size {
        0 => None,
        t if (64..=MAX_TILE as u32).contains(&t) => Some(t),
        t => {
            v.add(
                format!("{p}.tile_size"),
                format!("must be 0 or between 64 and {MAX_TILE}, got {t}"),
            );
            return None;
        }
    };
    // A fitted tile is not known yet: the overlap is kept below half of it when it runs.
    let bound = side.unwrap_or(MAX_TILE as u32);
    if let Some(overlap) = tile_overlap.filter(|o| o * 2 >= bound) {
        v.add(
            format!("{p}.tile_overlap"),
            format!("must be below half the tile size ({bound}), got {overlap}"),
        );
        return None;
    }
    Some(TilePlan {
        side: side.map(i64::from),
        pad: i64::from(TILE_PAD),
        overlap: tile_overlap.map(i64::from),
    })
}

/// An Upscale request, checked: the image decoded and the step resolved.
pub fn to_upscale_spec(
    request: pb::UpscaleRequest,
    ctx: &Context,
) -> Result<UpscaleSpec, ApiError> {
    let mut v = Violations::default();
    let mut deferred = Deferred::default();
    let limits = ctx.limits;
    let max_pixels = max_image_pixels(limits);
    let image = required_image(&request.image, "image", max_pixels, &mut v);
    let output = output(request.output.as_ref(), "", &mut v);
    if output.format == OutputFormat::Latents {
        v.add("output.format", "must be an image format for an upscale");
    }
    let client_job_id = client_job_id(&request.client_job_id, "", &mut v);
    let seed = first_seed(&mut v, "seed", request.seed, (1, 0), ctx.drawn_seed);
    let frame = Frame {
        registry: ctx.registry,
        size: image.as_ref().map_or((0, 0), |i| (i.width(), i.height())),
        max_pixels,
        format: output.format,
    };
    let mut size = (u64::from(frame.size.0), u64::from(frame.size.1));
    let step = match &request.upscale {
        Some(u) => upscale("upscale", u, &frame, &mut size, &mut v, &mut deferred),
        None => {
            v.add("upscale", "is required");
            None
        }
    };
    v.into_result()?;
    deferred.into_result()?;
    match (image, step) {
        (Some(image), Some(step)) => Ok(UpscaleSpec {
            image: ConditioningImage(Arc::new(image)),
            step,
            seed,
            output,
            client_job_id,
        }),
        _ => Err(ApiError::Internal(
            "a valid request without its parts".into(),
        )),
    }
}
