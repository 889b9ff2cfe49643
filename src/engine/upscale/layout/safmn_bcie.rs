//! SAFMN-BCIE's hyperparameters read from its tensors as spandrel reads them
//! (`SAFMNBCIE/__init__.py`): the width and the pixel unshuffle from the first
//! convolution, the groups and their blocks from their sequences' lengths, the mixer's
//! width from the first block's.

use super::safmn::LEVELS;
use super::{
    dimension_of, exact_root, own_names, ratio_gives_back, Architecture, Layout, Unwrapped,
};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects SAFMN-BCIE by.
pub(super) const KEYS: [&str; 14] = [
    FIRST_KEY,
    "to_feat.1.bias",
    "feats.0.layers.0.norm1.weight",
    "feats.0.layers.0.norm2.weight",
    LEVEL_KEY,
    "feats.0.layers.0.safm.mfr.3.weight",
    MIXER_KEY,
    "feats.0.layers.0.ccm.ccm.2.weight",
    "feats.0.conv.weight",
    "feats.0.conv.bias",
    "to_img.0.weight",
    "to_img.0.bias",
    "to_img.2.weight",
    "to_img.2.bias",
];

const FIRST_KEY: &str = "to_feat.1.weight";
const LEVEL_KEY: &str = "feats.0.layers.0.safm.mfr.0.weight";
const MIXER_KEY: &str = "feats.0.layers.0.ccm.ccm.0.weight";

/// The network's image channels (fixed in the reference).
const CHANNELS: i64 = 3;

/// A SAFMN-BCIE file (its own names); `Err` names the tensor that does not fit: a first
/// convolution of no square unshuffle of three colours, a width the four modulation
/// levels do not divide, a mixer width spandrel's ratio does not give back.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let (features, unshuffled) = (
        dimension_of(unwrapped, FIRST_KEY, 0)?,
        dimension_of(unwrapped, FIRST_KEY, 1)?,
    );
    let unshuffle = exact_root(unshuffled / CHANNELS).unwrap_or(0);
    if unshuffle < 1 || unshuffled != CHANNELS * unshuffle * unshuffle || features < 1 {
        return Err(FIRST_KEY);
    }
    if features % LEVELS != 0 {
        return Err(LEVEL_KEY);
    }
    let ffn_hidden = dimension_of(unwrapped, MIXER_KEY, 0)?;
    if !ratio_gives_back(features, ffn_hidden) {
        return Err(MIXER_KEY);
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    Ok(Layout {
        architecture: Architecture::SafmnBcie {
            channels: CHANNELS,
            features,
            groups: numbered_children(names(), "feats."),
            blocks: numbered_children(names(), "feats.0.layers."),
            ffn_hidden,
            unshuffle,
        },
        names: own_names(unwrapped),
    })
}
