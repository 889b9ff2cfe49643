//! `spec.variation`: A1111's variation seed, its strength and "Resize seed from".

use crate::api::validate::fields::{first_seed, float, image_side, Range, Violations};
use crate::config::Limits;
use crate::engine::request::SeedVariation;
use crate::proto::v1 as pb;

/// The variation of a request of `num_images` images (`None` where it varies nothing);
/// `drawn` is the server's draw for a request that names no variation seed.
pub fn variation(
    spec: &pb::GenerationSpec,
    num_images: u32,
    limits: &Limits,
    drawn: u64,
    v: &mut Violations,
) -> Option<SeedVariation> {
    let asked = spec.variation.as_ref()?;
    let strength = float(
        v,
        "spec.variation.strength",
        asked.strength,
        Range::closed(0.0, 1.0),
    );
    let resize_from = asked
        .resize_from
        .as_ref()
        .and_then(|size| resize_from(size, limits, v));
    let last = u64::from(num_images.max(1)) - 1;
    // Absent, another number than the request's own drawn seed, from the same draw.
    let drawn = drawn.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    let field = "spec.variation.seed";
    let seed = first_seed(v, field, asked.seed, (num_images, last), drawn);
    let variation = SeedVariation {
        seed,
        strength: strength?,
        resize_from,
    };
    (variation.strength > 0.0 || variation.resize_from.is_some()).then_some(variation)
}

/// `spec.variation.resize_from`: a size as `spec.width` and `spec.height` are bounded.
fn resize_from(size: &pb::Size, limits: &Limits, v: &mut Violations) -> Option<(i64, i64)> {
    let field = "spec.variation.resize_from";
    let width = image_side(v, &format!("{field}.width"), size.width, limits.max_width);
    let height = image_side(
        v,
        &format!("{field}.height"),
        size.height,
        limits.max_height,
    );
    (width && height).then_some((i64::from(size.width), i64::from(size.height)))
}
