//! The `--guider` flag of `generate`: its parsing, and the flag each `spec.guider` field
//! comes from.

use anyhow::{bail, Context};
use sdxld::proto::v1 as pb;

/// The guider `--guider KIND[,KEY=VALUE...]` asks for: `cfg` or `apg`, with `start`,
/// `stop` and (APG) `momentum`, `norm_threshold` and `eta`.
pub fn parse(arg: Option<&str>) -> anyhow::Result<Option<pb::Guider>> {
    let Some(arg) = arg else {
        return Ok(None);
    };
    let mut parts = arg.split(',').map(str::trim);
    let kind = match parts.next() {
        Some("cfg") => pb::GuiderKind::Cfg,
        Some("apg") => pb::GuiderKind::Apg,
        _ => bail!("--guider {arg:?}: expected cfg or apg, then KEY=VALUE options"),
    };
    let mut guider = pb::Guider {
        kind: kind as i32,
        ..Default::default()
    };
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .with_context(|| format!("--guider {arg:?}: {part:?} is not KEY=VALUE"))?;
        let value: f32 = value
            .parse()
            .with_context(|| format!("--guider {arg:?}: {key} takes a number"))?;
        let slot = match key {
            "start" => &mut guider.start,
            "stop" => &mut guider.stop,
            "momentum" => &mut guider.momentum,
            "norm_threshold" => &mut guider.norm_threshold,
            "eta" => &mut guider.eta,
            _ => bail!(
                "--guider {arg:?}: unknown option {key:?} (start, stop, momentum, norm_threshold, eta)"
            ),
        };
        *slot = Some(value);
    }
    Ok(Some(guider))
}

/// The flag a `spec.guider` field comes from.
pub fn flag_of(field: &str) -> Option<&'static str> {
    field.starts_with("spec.guider").then_some("--guider")
}
