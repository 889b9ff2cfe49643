//! What comes out: the encoding and previews, post-processing steps (checked in full; the
//! feature answers UNIMPLEMENTED until it lands) and the client's job id.

use crate::api::status::ApiError;
use crate::api::validate::fields::{at_most, enum_value, model_name, Violations};
use crate::api::validate::Deferred;
use crate::jobs::OutputSpec;
use crate::output::OutputFormat;
use crate::proto::v1 as pb;

/// Most post-processing steps in one request.
pub const MAX_POST_PROCESSING: usize = 8;

/// `spec.output`.
pub fn output(o: Option<&pb::OutputOptions>, v: &mut Violations) -> OutputSpec {
    let default = pb::OutputOptions::default();
    let o = o.unwrap_or(&default);
    if o.quality > 100 {
        v.add(
            "spec.output.quality",
            format!(
                "must be between 1 and 100 (0 for the default), got {}",
                o.quality
            ),
        );
    }
    at_most(
        v,
        "spec.output.preview_every_n_steps",
        o.preview_every_n_steps,
        1000,
    );
    let format = match enum_value(v, "spec.output.format", o.format) {
        Some(pb::ImageFormat::Jpeg) => OutputFormat::Jpeg,
        Some(pb::ImageFormat::Webp) => OutputFormat::Webp,
        Some(pb::ImageFormat::LatentsSafetensors) => OutputFormat::Latents,
        Some(pb::ImageFormat::Unspecified | pb::ImageFormat::Png) | None => OutputFormat::Png,
    };
    OutputSpec {
        format,
        quality: if o.quality == 0 {
            90
        } else {
            o.quality.min(100) as u8
        },
        embed_metadata: o.embed_metadata.unwrap_or(true),
        preview_every: o.preview_every_n_steps,
        return_control_maps: o.return_control_maps,
    }
}

/// `spec.post_processing`.
pub fn post_processing(steps: &[pb::PostProcessStep], v: &mut Violations, deferred: &mut Deferred) {
    if steps.len() > MAX_POST_PROCESSING {
        v.add(
            "spec.post_processing",
            format!("has {} steps; at most {MAX_POST_PROCESSING}", steps.len()),
        );
        return;
    }
    for (i, step) in steps.iter().enumerate() {
        let p = format!("spec.post_processing[{i}]");
        let Some(pb::post_process_step::Step::Upscale(u)) = &step.step else {
            v.add(p, "names no step");
            continue;
        };
        if u.model.is_empty() {
            v.add(format!("{p}.upscale.model"), "is required");
        } else {
            model_name(v, &format!("{p}.upscale.model"), &u.model);
        }
        if !matches!(u.factor, 2 | 4) {
            v.add(
                format!("{p}.upscale.factor"),
                format!("must be 2 or 4, got {}", u.factor),
            );
        }
        if u.tile_size != 0 && !(64..=2048).contains(&u.tile_size) {
            v.add(
                format!("{p}.upscale.tile_size"),
                format!("must be 0 or between 64 and 2048, got {}", u.tile_size),
            );
        }
    }
    if !steps.is_empty() {
        deferred.unimplemented(ApiError::Unimplemented(
            "spec.post_processing".into(),
            "upscaling is not implemented yet".into(),
        ));
    }
}

/// `spec.client_job_id`: at most 128 characters; empty for none.
pub fn client_job_id(id: &str, v: &mut Violations) -> Option<String> {
    let n = id.chars().count();
    if n > 128 {
        v.add(
            "spec.client_job_id",
            format!("must be at most 128 characters, got {n} characters"),
        );
    }
    (!id.is_empty()).then(|| id.to_string())
}
