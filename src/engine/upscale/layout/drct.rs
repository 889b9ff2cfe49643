//! DRCT's hyperparameters read from its tensors as spandrel reads them
//! (`DRCT/__init__.py`): the width and channels from the first convolution, the groups
//! from their numbered modules, each group's heads from its first block's bias table,
//! the window from the table's side, the training image size from the first shifted
//! block's stored mask, the dense growth from the first adjusting convolution, the
//! residual connection and the upsampler from which modules exist.

use std::path::Path;

use super::swinir::pixel_shuffle_scale;
use super::{
    dimension_or_refused, exact_root, own_names, refusal, shape_of, Architecture, Layout, Unwrapped,
};
use crate::engine::error::{EngineError, Result};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects DRCT by (a subset of its list that no other layout has).
pub(super) const KEYS: [&str; 5] = [
    "conv_first.weight",
    "layers.0.swin1.attn.relative_position_bias_table",
    "layers.0.adjust1.weight",
    "layers.0.swin5.norm1.weight",
    "norm.weight",
];

/// An absolute position embedding: fixed to the training size, so the network runs on
/// no other (refused, as for SwinIR and HAT).
pub(super) const ABSOLUTE_KEY: &str = "absolute_pos_embed";

/// The Swin blocks of a dense group (`swin1` to `swin5`), each taking the group's input
/// and the growths of the blocks before it.
pub const DENSE_BLOCKS: i64 = 5;

/// The multiple spandrel pads DRCT's inputs to: a window must divide it, or the padded
/// image would not split into windows (spandrel fails there).
const PADDED_MULTIPLE: i64 = 16;

/// The heads of dense block `k` (0-based) of a group whose first block has `heads`, over
/// `width` channels: the first block's own, then the constructor's
/// `num_heads - (width % num_heads)`.
fn dense_block_heads(k: i64, heads: i64, width: i64) -> i64 {
    match k {
        0 => heads,
        _ => heads - width % heads.max(1),
    }
}

/// A DRCT file (its own names). A layout spandrel would build but cannot run is refused
/// naming the tensor: a window that does not divide the 16-pixel padding, a block whose
/// heads are not the constructor's or do not divide its width, an absolute position
/// embedding, no reconstruction layers (spandrel's network then returns its input).
pub(super) fn detect(path: &Path, unwrapped: &Unwrapped) -> Result<Layout> {
    let refused = |name: &str| refusal(path, name);
    let shape = |name: &str| shape_of(unwrapped, name);
    let dimension = |name: &str, d: usize| dimension_or_refused(path, unwrapped, name, d);
    if shape(ABSOLUTE_KEY).is_some() {
        return Err(refused(ABSOLUTE_KEY));
    }
    let (features, channels) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 1)?);
    let side = exact_root(dimension(KEYS[1], 0)?).filter(|s| s % 2 == 1);
    let window = side.map_or(0, |s| (s + 1) / 2);
    if window < 1 || PADDED_MULTIPLE % window != 0 {
        return Err(refused(KEYS[1]));
    }
    let growth = dimension(KEYS[2], 0)?;
    let groups = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "layers.");
    let mut most_heads = 1;
    for group in 0..groups {
        let first = format!("layers.{group}.swin1.attn.relative_position_bias_table");
        let heads = dimension(&first, 1)?;
        for k in 0..DENSE_BLOCKS {
            let table = format!(
                "layers.{group}.swin{}.attn.relative_position_bias_table",
                k + 1
            );
            let width = features + k * growth;
            let stored = dimension(&table, 1)?;
            if heads < 1 || stored != dense_block_heads(k, heads, width) || width % stored != 0 {
                return Err(refused(&table));
            }
        }
        most_heads = most_heads.max(heads);
    }
    let Some(before) = shape("conv_before_upsample.0.weight") else {
        return Err(EngineError::WeightFile {
            path: path.to_path_buf(),
            message: "a DRCT without reconstruction layers (`conv_last`): spandrel's \
                      network returns its input unchanged"
                .into(),
        });
    };
    let upsample_features = before.first().copied().unwrap_or(0);
    let scale = match shape("upsample.0.weight") {
        Some(_) => pixel_shuffle_scale(unwrapped, upsample_features),
        None => Some(1),
    };
    let last = dimension("conv_last.weight", 0)?;
    let Some(scale) = scale else {
        return Err(refused("upsample.0.weight"));
    };
    if channels < 1 || features < 1 || groups < 1 || last != channels {
        return Err(refused("conv_last.weight"));
    }
    let image_size = match shape("layers.0.swin2.attn_mask") {
        Some(mask) => (mask.first().copied().unwrap_or(0) as f64).sqrt() as i64 * window,
        None => window,
    };
    Ok(Layout {
        architecture: Architecture::Drct {
            channels,
            features,
            groups,
            window,
            heads: most_heads,
            growth,
            mlp_hidden: widest_mlp(unwrapped, features),
            image_size,
            upsample_features,
            scale,
            identity_residual: shape("conv_after_body.weight").is_none(),
            patch_norm: shape("patch_embed.norm.weight").is_some(),
        },
        names: own_names(unwrapped),
    })
}

/// The widest MLP of the first group's blocks (for sizing tiles).
fn widest_mlp(unwrapped: &Unwrapped, features: i64) -> i64 {
    (1..=DENSE_BLOCKS)
        .filter_map(|k| shape_of(unwrapped, &format!("layers.0.swin{k}.mlp.fc1.weight")))
        .filter_map(|s| s.first().copied())
        .max()
        .unwrap_or(features)
}

impl Architecture {
    /// spandrel's DRCT tags: `large` from ten groups, the training size and window, the
    /// width, the residual connection.
    pub(super) fn drct_tags(&self) -> Vec<String> {
        let Architecture::Drct {
            features,
            groups,
            window,
            image_size,
            identity_residual,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let large = (groups >= 10).then(|| "large".to_string());
        large
            .into_iter()
            .chain([
                format!("s{image_size}w{window}"),
                format!("{features}dim"),
                if identity_residual {
                    "identity"
                } else {
                    "1conv"
                }
                .to_string(),
            ])
            .collect()
    }
}
