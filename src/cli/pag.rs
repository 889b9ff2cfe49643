//! The perturbed-attention guidance flags of `generate`, their parsing, and the flag each
//! `PerturbedAttentionGuidance` field comes from.

use anyhow::{bail, Context};
use clap::Args;
use sdxld::proto::v1 as pb;

/// Perturbed-attention guidance on the base UNet.
#[derive(Args, Clone, Default)]
pub struct PagArgs {
    /// Perturbed-attention guidance: `default` (scale 3), SCALE in (0, 100], or
    /// SCALE,ADAPTIVE with the adaptive scale in [0, 1].
    #[arg(long, value_name = "default|SCALE[,ADAPTIVE]")]
    pub pag: Option<String>,
    /// The self-attention layers PAG perturbs, as diffusers' pag_applied_layers: a
    /// pattern searched in their module names (mid, down_blocks.2,
    /// up_blocks.0.attentions.1) (repeatable; default: mid).
    #[arg(long = "pag-layer", value_name = "LAYER")]
    pub pag_layers: Vec<String>,
}

/// The guidance the flags ask for (none without --pag).
pub fn parse(args: &PagArgs) -> anyhow::Result<Option<pb::PerturbedAttentionGuidance>> {
    let Some(arg) = args.pag.as_deref() else {
        if !args.pag_layers.is_empty() {
            bail!("--pag-layer needs --pag");
        }
        return Ok(None);
    };
    let (scale, adaptive_scale) = if arg == "default" {
        (None, None)
    } else {
        let values = arg
            .split(',')
            .map(|f| f.trim().parse::<f32>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--pag {arg:?}: expected default, SCALE or SCALE,ADAPTIVE"))?;
        match values[..] {
            [scale] => (Some(scale), None),
            [scale, adaptive] => (Some(scale), Some(adaptive)),
            _ => bail!("--pag {arg:?}: expected SCALE or SCALE,ADAPTIVE"),
        }
    };
    Ok(Some(pb::PerturbedAttentionGuidance {
        scale,
        adaptive_scale,
        layers: args.pag_layers.clone(),
    }))
}

/// The flag a `spec.pag` field comes from.
pub fn flag_of(field: &str) -> Option<&'static str> {
    let field = field.strip_prefix("spec.pag")?;
    Some(if field.starts_with(".layers") {
        "--pag-layer"
    } else {
        "--pag"
    })
}
