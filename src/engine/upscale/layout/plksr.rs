//! RealPLKSR's hyperparameters read from its tensors as spandrel reads them
//! (`PLKSR/__init__.py`).

use super::{own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects RealPLKSR by (PLKSR's original layout misspells
/// `channe_mixer` and is not served).
pub(super) const KEYS: [&str; 4] = [
    "feats.0.weight",
    "feats.1.lk.conv.weight",
    "feats.1.refine.weight",
    "feats.1.channel_mixer.0.weight",
];

/// RealPLKSR's DySample output layer.
pub(super) const DYSAMPLE_KEY: &str = "to_img.init_pos";

/// A RealPLKSR file, its hyperparameters read as spandrel reads them.
pub(super) fn detect(unwrapped: &Unwrapped) -> Option<Layout> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let has = |name: &str| shape(name).is_some();
    let first = shape("feats.0.weight")?;
    let (features, channels) = (*first.first()?, *first.get(1)?);
    let layers = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "feats.");
    let blocks = layers - 3;
    let shuffled = *shape(&format!("feats.{}.weight", layers - 1))?.first()?;
    let scale = ((shuffled / 3) as f64).sqrt().round() as i64;
    let large_kernel = shape("feats.1.lk.conv.weight")?;
    let fits = channels == 3 && blocks >= 1 && scale >= 1 && shuffled == 3 * scale * scale;
    fits.then_some(Layout {
        architecture: Architecture::RealPlksr {
            channels,
            features,
            blocks,
            kernel: *large_kernel.get(2)?,
            split: *large_kernel.first()?,
            scale,
            attention: has("feats.1.attn.f.0.weight"),
            layer_norm: has("feats.1.layer_norm.bias"),
        },
        names: own_names(unwrapped),
    })
}
