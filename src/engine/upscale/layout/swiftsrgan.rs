//! Swift-SRGAN's hyperparameters read from its tensors as spandrel reads them
//! (`SwiftSRGAN/__init__.py`): the channels from the first depthwise convolution, the
//! width from its pointwise one, the residual blocks and the ×2 upsampling rounds from
//! their sequences' lengths.

use super::{dimension_of, own_names, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects Swift-SRGAN by.
pub(super) const KEYS: [&str; 2] = [
    "initial.cnn.depthwise.weight",
    "final_conv.pointwise.weight",
];

/// The pointwise convolution that starts the features.
const WIDTH_KEY: &str = "initial.cnn.pointwise.weight";

/// The stored tensors inference does not read: the batch norms' step counts, and the
/// PReLU slopes of the layers that run without activation (the reference builds them,
/// and never calls them).
pub fn is_unread(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
        || name == "convblock.act.weight"
        || name
            .strip_prefix("residual.")
            .is_some_and(|rest| rest.ends_with(".block2.act.weight"))
}

/// A Swift-SRGAN file (its own names); `Err` names the tensor that does not fit: a first
/// convolution of no channels, a width of no channels.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let channels = dimension_of(unwrapped, KEYS[0], 0)?;
    let features = dimension_of(unwrapped, WIDTH_KEY, 0)?;
    if channels < 1 {
        return Err(KEYS[0]);
    }
    if features < 1 {
        return Err(WIDTH_KEY);
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let upsamplings = numbered_children(names(), "upsampler.");
    Ok(Layout {
        architecture: Architecture::SwiftSrgan {
            channels,
            features,
            blocks: numbered_children(names(), "residual."),
            upsamplings,
        },
        names: own_names(unwrapped),
    })
}
