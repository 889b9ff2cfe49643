//! The seed variation flags of `generate` (A1111's "Variation seed", "Variation
//! strength" and "Resize seed from"), their parsing, and the flag each
//! `SeedVariation` field comes from.

use anyhow::bail;
use clap::Args;
use sdxld::proto::v1 as pb;

/// A seed variation of every image's starting noise.
#[derive(Args, Clone, Default)]
pub struct VariationArgs {
    /// The variation seed of the first image; image i uses it + i (random when absent).
    #[arg(long)]
    pub variation_seed: Option<u64>,
    /// How far each image's noise moves toward its variation seed's, in [0, 1].
    #[arg(long)]
    pub variation_strength: Option<f32>,
    /// Draw the seeds' noise as for an image of this size, centred on the image.
    #[arg(long, value_name = "WxH")]
    pub resize_seed_from: Option<String>,
}

/// The variation the flags ask for (none without --variation-strength or
/// --resize-seed-from).
pub fn parse(args: &VariationArgs) -> anyhow::Result<Option<pb::SeedVariation>> {
    let resize_from = args.resize_seed_from.as_deref().map(size).transpose()?;
    if args.variation_strength.is_none() && resize_from.is_none() {
        if args.variation_seed.is_some() {
            bail!("--variation-seed needs --variation-strength");
        }
        return Ok(None);
    }
    Ok(Some(pb::SeedVariation {
        seed: args.variation_seed,
        strength: args.variation_strength.unwrap_or(0.0),
        resize_from,
    }))
}

fn size(arg: &str) -> anyhow::Result<pb::Size> {
    let (width, height) = crate::cli::hires::parse_size("--resize-seed-from", arg)?;
    Ok(pb::Size { width, height })
}

/// The flag a `spec.variation` field comes from.
pub fn flag_of(field: &str) -> Option<&'static str> {
    match field.strip_prefix("spec.variation")? {
        ".seed" => Some("--variation-seed"),
        ".strength" => Some("--variation-strength"),
        _ => Some("--resize-seed-from"),
    }
}
