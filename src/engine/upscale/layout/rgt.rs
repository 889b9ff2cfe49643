//! RGT's hyperparameters read from its tensors as spandrel reads them
//! (`RGT/__init__.py`): the width from the first convolution, the groups and their
//! heads from their first blocks' position MLPs, the rectangle window from the first
//! window's index and offset shapes (a square, or powers of two with the first side the
//! shorter), the recursive attention's narrow width from the first group of two blocks
//! or more, the scale from the upsampler's convolutions.

use super::swinir::pixel_shuffle_scale;
use super::{exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects RGT by (besides one of the body's residual
/// convolutions).
pub(super) const KEYS: [&str; 16] = [
    "conv_first.weight",
    "before_RG.1.weight",
    "layers.0.blocks.0.gamma",
    "layers.0.blocks.0.norm1.weight",
    "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.proj.weight",
    OFFSETS_KEY,
    INDEX_KEY,
    "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight",
    "layers.0.blocks.0.mlp.fc1.weight",
    "layers.0.blocks.0.mlp.fc2.weight",
    "layers.0.blocks.0.norm2.weight",
    "norm.weight",
    UPSAMPLE_KEY,
    "conv_last.weight",
    "layers.0.blocks.0.attn.attns.0.pos.pos3.2.weight",
];

/// The body's residual convolution, one (`1conv`) or the first of three (`3conv`).
pub(super) const RESIDUAL_KEYS: [&str; 2] = ["conv_after_body.weight", "conv_after_body.0.weight"];

/// The first window's stored offsets (`(2·rows − 1)(2·columns − 1)` of them).
const OFFSETS_KEY: &str = "layers.0.blocks.0.attn.attns.0.rpe_biases";
/// Its stored index (`rows · columns` square).
const INDEX_KEY: &str = "layers.0.blocks.0.attn.attns.0.relative_position_index";
/// The convolution before the upsampler (64 wide in the constructor).
const UPSAMPLE_KEY: &str = "conv_before_upsample.0.weight";

/// The tail's upsampling width (`num_feat`, fixed in the reference).
pub const UPSAMPLE_FEATURES: i64 = 64;

/// A group's heads as spandrel reads them: twice its first block's window heads, one
/// more where twice does not divide the width.
pub fn heads_from_window_heads(window_heads: i64, features: i64) -> i64 {
    match features % (2 * window_heads).max(1) {
        0 => 2 * window_heads,
        _ => 2 * window_heads + 1,
    }
}

/// spandrel's `_get_split_size`: the window `[rows, columns]` whose pixels are `pixels`
/// and offsets `offsets`: a square, or else powers of two up to 512 with `rows` the
/// shorter.
fn split_size(pixels: i64, offsets: i64) -> Option<[i64; 2]> {
    let fits = |r: i64, c: i64| r * c == pixels && (2 * r - 1) * (2 * c - 1) == offsets;
    if let Some(side) = exact_root(pixels).filter(|s| fits(*s, *s)) {
        return Some([side, side]);
    }
    (1..10)
        .flat_map(|i| (i + 1..10).map(move |j| [1i64 << i, 1i64 << j]))
        .find(|[r, c]| fits(*r, *c))
}

/// An RGT file (its own names); `Err` names the tensor that does not fit: an odd width
/// (the window pair splits it in halves), a window of no size spandrel finds, heads that
/// do not divide their half or their narrow width, a narrow width the reference's ratio
/// does not give back, an upsampler other than the constructor's.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let dimension = |name: &str, d: usize| {
        shape(name)
            .and_then(|s| s.get(d).copied())
            .ok_or_else(|| name.to_string())
    };
    let (features, channels) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 1)?);
    if features < 2 || features % 2 != 0 || channels < 1 {
        return Err(KEYS[0].into());
    }
    let split = split_size(dimension(INDEX_KEY, 0)?, dimension(OFFSETS_KEY, 0)?)
        .ok_or(OFFSETS_KEY.to_string())?;
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let groups = numbered_children(names(), "layers.");
    let depths: Vec<i64> = (0..groups)
        .map(|g| numbered_children(names(), &format!("layers.{g}.blocks.")))
        .collect();
    let reduced = narrow_width(unwrapped, &depths, features)?;
    let mut heads = Vec::new();
    for (g, depth) in depths.iter().enumerate() {
        let table = format!("layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight");
        let window_heads = shape(&table).and_then(|s| s.first().copied()).unwrap_or(0);
        let group_heads = heads_from_window_heads(window_heads, features);
        let recursive = *depth >= 2;
        if window_heads < 1
            || (features / 2) % window_heads != 0
            || (recursive && features % group_heads != 0)
        {
            return Err(table);
        }
        if recursive && reduced % group_heads != 0 {
            return Err(format!("layers.{g}.blocks.1.attn.conv.weight"));
        }
        heads.push(group_heads);
    }
    if dimension(UPSAMPLE_KEY, 0)? != UPSAMPLE_FEATURES || dimension(KEYS[14], 0)? != channels {
        return Err(UPSAMPLE_KEY.into());
    }
    let scale =
        pixel_shuffle_scale(unwrapped, UPSAMPLE_FEATURES).ok_or(UPSAMPLE_KEY.to_string())?;
    Ok(Layout {
        architecture: Architecture::Rgt {
            channels,
            features,
            groups,
            split,
            heads: heads.into_iter().max().unwrap_or(2),
            mlp_hidden: dimension(KEYS[9], 0)?,
            reduced,
            scale,
            three_conv: shape(RESIDUAL_KEYS[0]).is_none(),
        },
        names: own_names(unwrapped),
    })
}

/// The recursive attentions' narrow width: the first group of two blocks or more tells
/// the ratio (`c_ratio`), which the constructor applies to every group as
/// `int(dim * c_ratio)`; spandrel's 0.5 where no group has a recursive block.
fn narrow_width(unwrapped: &Unwrapped, depths: &[i64], features: i64) -> Result<i64, String> {
    let Some(g) = depths.iter().position(|d| *d >= 2) else {
        return Ok(features / 2);
    };
    let name = format!("layers.{g}.blocks.1.attn.conv.weight");
    let narrow = shape_of(unwrapped, &name).and_then(|s| s.first().copied());
    let ratio = narrow.unwrap_or(0) as f64 / features as f64;
    match narrow {
        Some(n) if n >= 1 && (features as f64 * ratio) as i64 == n => Ok(n),
        _ => Err(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes_are_found_as_spandrel_finds_them() {
        assert_eq!(split_size(64, 225), Some([8, 8]));
        assert_eq!(split_size(8, 21), Some([2, 4]));
        assert_eq!(split_size(32, 105), Some([4, 8]));
        // A 3×6 window has no power-of-two reading.
        assert_eq!(split_size(18, 55), None);
    }
}
