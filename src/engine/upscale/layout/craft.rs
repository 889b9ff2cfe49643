//! CRAFT's hyperparameters read from its tensors as spandrel reads them
//! (`CRAFT/__init__.py`): the channels and width from the first convolution, the groups
//! and their heads from their fusion blocks' temperatures, the rectangle window from the
//! stored index's and offsets' lengths (the shorter side first), the MLP's width from the
//! first block, the scale from the upsampler's bias, the body's closing convolution from
//! its presence.

use super::{dimension_of, own_names, ratio_gives_back, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects CRAFT by.
pub(super) const KEYS: [&str; 2] = [
    FIRST_KEY,
    "layers.0.residual_group.hf_blocks.0.attn.temperature",
];

const FIRST_KEY: &str = "conv_first.weight";
/// The horizontal windows' pair index (`rows · columns` square).
const INDEX_KEY: &str = "relative_position_index_h";
/// The vertical windows' offsets (`(2·rows − 1)(2·columns − 1)` of them).
const OFFSETS_KEY: &str = "biases_v";
const MLP_KEY: &str = "layers.0.residual_group.srwa_blocks.0.mlp.fc1.bias";
const QKV_BIAS_KEY: &str = "layers.0.residual_group.srwa_blocks.0.qkv.bias";
const UPSAMPLE_KEY: &str = "upsample.0.bias";
const BODY_KEY: &str = "conv_after_body.weight";

/// The side the reference pads every image to a whole multiple of, mirrored (its
/// `window_size`, fixed in the constructor): the windows must tile it.
pub const PAD_MULTIPLE: i64 = 16;

/// The stored index and offset buffers, which inference computes from the window.
pub fn is_unread(name: &str) -> bool {
    matches!(
        name,
        "relative_position_index_h" | "relative_position_index_v" | "biases_h" | "biases_v"
    )
}

/// A CRAFT file (its own names); `Err` names the tensor that does not fit: an odd width
/// or one its heads do not divide, heads that do not halve into the window branches, a
/// window of no size spandrel's formula finds or one that does not tile the mirrored
/// padding, an MLP width spandrel's float ratio does not give back, an upsampler of no
/// square scale.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let named = |name: &str| name.to_string();
    let features = dimension_of(unwrapped, FIRST_KEY, 0).map_err(named)?;
    let channels = dimension_of(unwrapped, FIRST_KEY, 1).map_err(named)?;
    if features < 2 || features % 2 != 0 || channels < 1 {
        return Err(named(FIRST_KEY));
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let groups = numbered_children(names(), "layers.");
    let mut heads = 0;
    for group in 0..groups {
        let key = format!("layers.{group}.residual_group.hf_blocks.0.attn.temperature");
        let group_heads = shape_of(unwrapped, &key)
            .and_then(|s| s.first().copied())
            .ok_or_else(|| key.clone())?;
        let halves = group_heads / 2;
        if halves < 1 || features % group_heads != 0 || (features / 2) % halves != 0 {
            return Err(key);
        }
        heads = heads.max(group_heads);
    }
    let split = split_size(unwrapped).ok_or_else(|| named(INDEX_KEY))?;
    let mlp_hidden = dimension_of(unwrapped, MLP_KEY, 0).map_err(named)?;
    if !ratio_gives_back(features, mlp_hidden) {
        return Err(named(MLP_KEY));
    }
    let shuffled = dimension_of(unwrapped, UPSAMPLE_KEY, 0).map_err(named)?;
    let scale = ((shuffled as f64 / channels as f64).sqrt()) as i64;
    if scale < 1 || scale * scale * channels != shuffled {
        return Err(named(UPSAMPLE_KEY));
    }
    Ok(Layout {
        architecture: Architecture::Craft {
            channels,
            features,
            groups,
            heads,
            split,
            mlp_hidden,
            qkv_bias: shape_of(unwrapped, QKV_BIAS_KEY).is_some(),
            scale,
            body_conv: shape_of(unwrapped, BODY_KEY).is_some(),
        },
        names: own_names(unwrapped),
    })
}

/// The window `[rows, columns]` as spandrel solves it from the index's length `a = r·c`
/// and the offsets' `b = (2r − 1)(2c − 1)`, the shorter side first; `None` where the
/// formula gives no whole window of those lengths, or one whose sides do not divide the
/// reference's mirrored padding (its windows would not tile the image).
fn split_size(unwrapped: &Unwrapped) -> Option<[i64; 2]> {
    let a = *shape_of(unwrapped, INDEX_KEY)?.first()?;
    let b = *shape_of(unwrapped, OFFSETS_KEY)?.first()?;
    let (af, bf) = (a as f64, b as f64);
    let root = (16.0 * af * af - 8.0 * af * (bf + 1.0) + (bf - 1.0).powi(2)).sqrt();
    let s1 = (0.25 * (-root + 4.0 * af - bf + 1.0)) as i64;
    if !root.is_finite() || s1 < 1 || a % s1 != 0 {
        return None;
    }
    let s0 = a / s1;
    let (rows, columns) = (s0.min(s1), s0.max(s1));
    let fits = (2 * rows - 1) * (2 * columns - 1) == b
        && PAD_MULTIPLE % rows == 0
        && PAD_MULTIPLE % columns == 0;
    fits.then_some([rows, columns])
}

impl Architecture {
    /// spandrel's CRAFT tags: the window, the width, the body's residual connection.
    pub(super) fn craft_tags(&self) -> Vec<String> {
        let Architecture::Craft {
            features,
            split,
            body_conv,
            ..
        } = *self
        else {
            return Vec::new();
        };
        vec![
            format!("{}x{}", split[0], split[1]),
            format!("{features}dim"),
            if body_conv { "1conv" } else { "identity" }.to_string(),
        ]
    }
}
