//! What comes out: the encoding and previews, and the client's job id.

use crate::api::validate::fields::{at_most, enum_value, Violations};
use crate::jobs::OutputSpec;
use crate::output::OutputFormat;
use crate::proto::v1 as pb;

/// `output` under `prefix` (`spec.` in a generation, empty in an upscale request).
pub fn output(o: Option<&pb::OutputOptions>, prefix: &str, v: &mut Violations) -> OutputSpec {
    let default = pb::OutputOptions::default();
    let o = o.unwrap_or(&default);
    if o.quality > 100 {
        v.add(
            format!("{prefix}output.quality"),
            format!(
                "must be between 1 and 100 (0 for the default), got {}",
                o.quality
            ),
        );
    }
    at_most(
        v,
        &format!("{prefix}output.preview_every_n_steps"),
        o.preview_every_n_steps,
        1000,
    );
    let format = match enum_value(v, &format!("{prefix}output.format"), o.format) {
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

/// `client_job_id` under `prefix`: at most 128 characters; empty for none.
pub fn client_job_id(id: &str, prefix: &str, v: &mut Violations) -> Option<String> {
    let n = id.chars().count();
    if n > 128 {
        v.add(
            format!("{prefix}client_job_id"),
            format!("must be at most 128 characters, got {n} characters"),
        );
    }
    (!id.is_empty()).then(|| id.to_string())
}
