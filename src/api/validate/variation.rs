//! `spec.variation`: A1111's variation seed, its strength and "Resize seed from".

use crate::api::validate::fields::{float, Range, Violations, MAX_SEED};
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
    let seed = seed(asked.seed, num_images, drawn, v);
    let variation = SeedVariation {
        seed,
        strength: strength?,
        resize_from,
    };
    (variation.strength > 0.0 || variation.resize_from.is_some()).then_some(variation)
}

/// `spec.variation.seed`: every image's variation seed below 2^53, as `spec.seed`.
fn seed(asked: Option<u64>, num_images: u32, drawn: u64, v: &mut Violations) -> u64 {
    let last = u64::from(num_images.max(1)) - 1;
    match asked {
        Some(seed) if seed > MAX_SEED.saturating_sub(last) => {
            v.add(
                "spec.variation.seed",
                format!("must be at most 2^53 - {} with {num_images} images (the last image's variation seed is seed + {last}), got {seed}", last + 1),
            );
            0
        }
        Some(seed) => seed,
        // Another number than the request's own drawn seed, from the same draw.
        None => drawn.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) % (MAX_SEED - last + 1),
    }
}

/// `spec.variation.resize_from`: a size as `spec.width` and `spec.height` are bounded.
fn resize_from(size: &pb::Size, limits: &Limits, v: &mut Violations) -> Option<(i64, i64)> {
    let mut fits = true;
    for (field, value, max) in [
        ("width", size.width, limits.max_width),
        ("height", size.height, limits.max_height),
    ] {
        if value % 8 != 0 || value < 64 || value > max {
            v.add(
                format!("spec.variation.resize_from.{field}"),
                format!("must be a multiple of 8 between 64 and {max}, got {value}"),
            );
            fits = false;
        }
    }
    fits.then_some((i64::from(size.width), i64::from(size.height)))
}
