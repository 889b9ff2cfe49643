//! SCUNet's hyperparameters read from its tensors as spandrel reads them
//! (`SCUNet/__init__.py`): the width and channels from the head, each stage's block count
//! from its numbered modules; the heads (32 channels each) and the 8-pixel window are
//! the constructor's.

use super::{own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects SCUNet by.
pub(super) const KEYS: [&str; 2] = ["m_head.0.weight", "m_tail.0.weight"];

/// The stages in the order of SCUNet's `config`: three down, the body, three up.
pub const STAGES: [&str; 7] = [
    "m_down1", "m_down2", "m_down3", "m_body", "m_up3", "m_up2", "m_up1",
];

/// The attention window's side and each head's width (the constructor's).
pub const WINDOW: i64 = 8;
pub const HEAD_WIDTH: i64 = 32;

/// A SCUNet file (its own names), or `None` when its tensors do not make one network
/// spandrel would build.
pub(super) fn detect(unwrapped: &Unwrapped) -> Option<Layout> {
    let head = shape_of(unwrapped, KEYS[0])?;
    let (features, channels) = (*head.first()?, *head.get(1)?);
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let mut blocks = [0i64; 7];
    for (count, stage) in blocks.iter_mut().zip(STAGES) {
        let modules = numbered_children(names(), &format!("{stage}."));
        // The down stages end, and the up stages start, with their resampling.
        *count = if stage == "m_body" {
            modules
        } else {
            modules - 1
        };
    }
    // Each stage's attention takes half its channels, in heads of 32 (a file of another
    // window fails its load naming the position table).
    let fits = channels >= 1
        && features >= 2 * HEAD_WIDTH
        && features % (2 * HEAD_WIDTH) == 0
        && blocks.iter().all(|b| *b >= 0);
    fits.then_some(Layout {
        architecture: Architecture::ScuNet {
            channels,
            features,
            blocks,
        },
        names: own_names(unwrapped),
    })
}
