//! The `--guider` flag of `generate`: its parsing, and the flag each `spec.guider` field
//! comes from.

use anyhow::{bail, Context};
use sdxld::proto::v1 as pb;

/// The guider `--guider KIND[,KEY=VALUE...]` asks for: `cfg`, `apg` or `tcfg`, with `start`,
/// `stop` and (APG) `momentum`, `norm_threshold` and `eta`.
pub fn parse(arg: Option<&str>) -> anyhow::Result<Option<pb::Guider>> {
    let Some(arg) = arg else {
        return Ok(None);
    };
    let mut parts = arg.split(',').map(str::trim);
    let kind = match parts.next() {
        Some("cfg") => pb::GuiderKind::Cfg,
        Some("apg") => pb::GuiderKind::Apg,
        Some("tcfg") => pb::GuiderKind::Tcfg,
        _ => bail!("--guider {arg:?}: expected cfg, apg or tcfg, then KEY=VALUE options"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_parses_with_its_options() {
        let tcfg = parse(Some("tcfg, start=0.2"))
            .expect("tcfg")
            .expect("a guider");
        assert_eq!(tcfg.kind, pb::GuiderKind::Tcfg as i32);
        assert_eq!(tcfg.start, Some(0.2));
        let apg = parse(Some("apg,momentum=-0.5,eta=0.8"))
            .expect("apg")
            .expect("a guider");
        assert_eq!(apg.kind, pb::GuiderKind::Apg as i32);
        assert_eq!((apg.momentum, apg.eta), (Some(-0.5), Some(0.8)));
        assert_eq!(parse(None).expect("none"), None);
        for bad in ["pag", "cfg,scale=3", "cfg,stop", "tcfg,stop=x"] {
            let message = parse(Some(bad)).expect_err(bad).to_string();
            assert!(message.contains("--guider"), "{bad}: {message}");
        }
    }
}
