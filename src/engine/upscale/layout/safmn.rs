//! SAFMN's hyperparameters read from its tensors as spandrel reads them
//! (`SAFMN/__init__.py`): the width from the first convolution, the blocks from their
//! numbered modules, the mixer's width from its first convolution, the scale from the
//! last; the four modulation levels are the constructor's.

use super::{dimension_of, exact_root, own_names, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects SAFMN by.
pub(super) const KEYS: [&str; 9] = [
    "to_feat.weight",
    "feats.0.norm1.weight",
    "feats.0.norm2.weight",
    "feats.0.safm.mfr.0.weight",
    "feats.0.safm.mfr.3.weight",
    "feats.0.safm.aggr.weight",
    "feats.0.ccm.ccm.0.weight",
    "feats.0.ccm.ccm.2.weight",
    "to_img.0.weight",
];

/// The feature modulation's levels (`n_levels`, fixed in the reference).
pub const LEVELS: i64 = 4;

/// A SAFMN file (its own names); `Err` names the tensor that does not fit: a width the
/// four modulation levels do not divide (the reference's chunks would not fit its
/// convolutions) names the first level's.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let dimension = |name: &'static str, d: usize| dimension_of(unwrapped, name, d);
    let (features, channels) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 1)?);
    let shuffled = dimension(KEYS[8], 0)?;
    let scale = exact_root(shuffled / 3).unwrap_or(0);
    if channels != 3 || features < 1 {
        return Err(KEYS[0]);
    }
    if scale < 1 || shuffled != 3 * scale * scale {
        return Err(KEYS[8]);
    }
    if features % LEVELS != 0 {
        return Err(KEYS[3]);
    }
    Ok(Layout {
        architecture: Architecture::Safmn {
            channels,
            features,
            blocks: numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "feats."),
            ffn_hidden: dimension(KEYS[6], 0)?,
            scale,
        },
        names: own_names(unwrapped),
    })
}
