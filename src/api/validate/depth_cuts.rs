//! LeReS's near and background cuts (A1111's "Remove Near %" and "Remove Background %"):
//! shares of the 8-bit range in [0, 100], read by PREPROCESSOR_DEPTH only, and only
//! when its detector is a LeReS network (the other depth detectors have no such cut).

use crate::api::validate::fields::{float, read_by, Range, Violations};
use crate::engine::preprocess::detector::DetectorNetwork;
use crate::engine::preprocess::image_filters::Param;
use crate::engine::preprocess::leres::DepthCuts;
use crate::jobs::spec::DetectorFile;
use crate::proto::v1 as pb;

/// The shares A1111's sliders offer.
const SHARES: Range = Range::closed(0.0, 100.0);

/// `remove_near` and `remove_background` (under `p`) for a preprocessor of `kind`.
pub fn cuts(
    p: &str,
    kind: Option<pb::Preprocessor>,
    params: &pb::PreprocessorParams,
    v: &mut Violations,
) -> DepthCuts {
    let mut checked = |name: &str, value: Option<f32>| {
        let field = format!("{p}.{name}");
        match value {
            Some(x) if read_by(v, &field, kind, pb::Preprocessor::Depth) => {
                Param(float(v, &field, x, SHARES).map_or(0.0, |_| x))
            }
            _ => Param(0.0),
        }
    };
    DepthCuts {
        near: checked("remove_near", params.remove_near),
        background: checked("remove_background", params.remove_background),
    }
}

/// Cuts other than none need a LeReS detector; each one set is named otherwise.
pub fn network_cuts(p: &str, detector: &DetectorFile, cuts: DepthCuts, v: &mut Violations) {
    if detector.network == DetectorNetwork::Leres {
        return;
    }
    for (name, cut) in [
        ("remove_near", cuts.near),
        ("remove_background", cuts.background),
    ] {
        if cut.0 != 0.0 {
            v.add(
                format!("{p}.{name}"),
                format!(
                    "applies to LeReS depth detectors only; `{}` holds a {} network",
                    detector.model.name,
                    detector.network.name()
                ),
            );
        }
    }
}
