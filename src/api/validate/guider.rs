//! `spec.guider`: the guider's rule, interval and APG options, each refused naming its
//! field where it does not apply.

use crate::api::validate::fields::{enum_value, optional_float, Range, Violations};
use crate::engine::registry::ModelEntry;
use crate::engine::request::{Guider, GuiderKind};
use crate::proto::v1 as pb;

/// The request's guider (`None` when it names none), checked against its guidance scale
/// and its base model (when it resolves).
pub fn guider(
    spec: &pb::GenerationSpec,
    guidance_scale: f64,
    model: Option<&ModelEntry>,
    v: &mut Violations,
) -> Option<Guider> {
    let wire = spec.guider.as_ref()?;
    let field = |name: &str| format!("spec.guider.{name}");
    let kind = enum_value::<pb::GuiderKind>(v, &field("kind"), wire.kind);
    let start = optional_float(
        v,
        &field("start"),
        wire.start,
        Range::closed_open(0.0, 1.0),
        0.0,
    );
    let stop = optional_float(
        v,
        &field("stop"),
        wire.stop,
        Range::open_closed(0.0, 1.0),
        1.0,
    );
    if start >= stop {
        v.add(
            field("stop"),
            format!("must be above start ({start}), got {stop}"),
        );
    }
    if guidance_scale <= 1.0 {
        v.add(
            "spec.guider",
            format!("needs guidance_scale above 1 (guidance is off at {guidance_scale})"),
        );
    }
    if spec.pag.is_some() {
        v.add("spec.guider", "does not combine with spec.pag");
    }
    if let Some(model) = model.filter(|m| m.pipeline.as_ref().is_some_and(|f| f.guidance_distilled))
    {
        v.add(
            "spec.guider",
            format!(
                "does not apply to `{}`: its UNet is guidance-distilled (time_cond_proj_dim) and makes no negative prediction to combine",
                model.name
            ),
        );
    }
    let kind = match kind? {
        pb::GuiderKind::Unspecified | pb::GuiderKind::Cfg => {
            refuse_apg_options(wire, v);
            GuiderKind::Cfg
        }
        pb::GuiderKind::Tcfg => {
            refuse_apg_options(wire, v);
            GuiderKind::Tcfg
        }
        pb::GuiderKind::Apg => GuiderKind::Apg {
            momentum: wire.momentum.map(|m| {
                optional_float(
                    v,
                    &field("momentum"),
                    Some(m),
                    Range::closed_open(-1.0, 1.0),
                    0.0,
                )
            }),
            norm_threshold: optional_float(
                v,
                &field("norm_threshold"),
                wire.norm_threshold,
                Range::closed(0.0, 100.0),
                15.0,
            ),
            eta: optional_float(v, &field("eta"), wire.eta, Range::closed(0.0, 1.0), 1.0),
        },
    };
    Some(Guider { kind, start, stop })
}

/// Each APG option `wire` sets on another rule, refused naming it.
fn refuse_apg_options(wire: &pb::Guider, v: &mut Violations) {
    let apg_options = [
        ("momentum", wire.momentum.is_some()),
        ("norm_threshold", wire.norm_threshold.is_some()),
        ("eta", wire.eta.is_some()),
    ];
    for (name, _) in apg_options.iter().filter(|(_, set)| *set) {
        v.add(
            format!("spec.guider.{name}"),
            "applies to GUIDER_KIND_APG only",
        );
    }
}
