//! HAT's hyperparameters read from its tensors as spandrel reads them
//! (`HAT/__init__.py`): the window from the stored self-attention index, the overlapping
//! window from the cross-attention one, the heads of every group from its overlapping
//! attention's bias table, the scale from the pixel-shuffle convolutions.

use super::swinir::pixel_shuffle_scale;
use super::{exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects HAT by.
pub(super) const KEYS: [&str; 7] = [
    "relative_position_index_SA",
    "conv_first.weight",
    "layers.0.residual_group.blocks.0.norm1.weight",
    "layers.0.residual_group.blocks.0.conv_block.cab.0.weight",
    "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1.weight",
    "layers.0.residual_group.overlap_attn.relative_position_bias_table",
    "conv_last.weight",
];

/// An absolute position embedding: only for images of the training size (not served).
pub(super) const ABSOLUTE_KEY: &str = "absolute_pos_embed";

/// A HAT file (its own names, unwrapped), or `None` when its tensors do not make one
/// network spandrel would build.
pub(super) fn detect(unwrapped: &Unwrapped) -> Option<Layout> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let first = shape("conv_first.weight")?;
    let (features, channels) = (*first.first()?, *first.get(1)?);
    let last = shape("conv_last.weight")?;
    let (out_channels, upsample_features) = (*last.first()?, *last.get(1)?);
    let window = exact_root(*shape("relative_position_index_SA")?.first()?)?;
    let overlap_window = exact_root(*shape("relative_position_index_OCA")?.get(1)?)?;
    let groups = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "layers.");
    let heads = (0..groups)
        .map(|g| {
            let table =
                format!("layers.{g}.residual_group.overlap_attn.relative_position_bias_table");
            shape(&table).and_then(|s| s.get(1).copied())
        })
        .collect::<Option<Vec<i64>>>()?;
    let block = |name: &str| shape(&format!("layers.0.residual_group.blocks.0.{name}"));
    let scale = pixel_shuffle_scale(unwrapped, upsample_features)?;
    // The overlapping windows are unfolded around each window: an odd margin would
    // give other window counts than the queries'.
    let fits = channels == 3
        && out_channels == channels
        && window >= 1
        && overlap_window >= window
        && (overlap_window - window) % 2 == 0
        && groups >= 1
        && heads.iter().all(|h| *h >= 1 && features % h == 0);
    fits.then_some(Layout {
        architecture: Architecture::Hat {
            channels,
            features,
            groups,
            window,
            overlap_window,
            heads: heads.into_iter().max()?,
            mlp_hidden: *block("mlp.fc1.weight")?.first()?,
            cab_width: *block("conv_block.cab.0.weight")?.first()?,
            squeeze_width: *block("conv_block.cab.3.attention.1.weight")?.first()?,
            upsample_features,
            scale,
            identity_residual: shape("conv_after_body.weight").is_none(),
        },
        names: own_names(unwrapped),
    })
}

impl Architecture {
    /// spandrel's HAT tags: a size (large from nine groups, else small where the
    /// convolution branch is squeezed more than 4 times, else medium), the training
    /// size (spandrel's 64) and window, `num_feat`, the width, the residual connection.
    pub(super) fn hat_tags(&self) -> Vec<String> {
        let Architecture::Hat {
            features,
            groups,
            window,
            cab_width,
            upsample_features,
            identity_residual,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let size = match groups {
            9.. => "large",
            _ if features as f64 / cab_width.max(1) as f64 > 4.0 => "small",
            _ => "medium",
        };
        vec![
            size.to_string(),
            format!("s64w{window}"),
            format!("{upsample_features}nf"),
            format!("{features}dim"),
            if identity_residual {
                "identity"
            } else {
                "1conv"
            }
            .to_string(),
        ]
    }
}
