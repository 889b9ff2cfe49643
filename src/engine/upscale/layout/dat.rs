//! DAT's hyperparameters read from its tensors as spandrel reads them
//! (`DAT/__init__.py`): the upsampler from which modules exist, the scale from their
//! shapes, the rectangle window from the first block's stored position offsets, the
//! training size from the first shifted block's stored mask, the heads of every group
//! from its blocks.

use std::path::Path;

use super::swinir::{pixel_shuffle_scale, SwinUpsampler};
use super::{exact_root, own_names, refusal, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::error::{EngineError, Result};
use crate::engine::weights::{numbered_children, read_tensor};

/// The tensors spandrel detects DAT by.
pub(super) const KEYS: [&str; 14] = [
    "conv_first.weight",
    "before_RG.1.weight",
    "layers.0.blocks.0.norm1.weight",
    "layers.0.blocks.0.ffn.fc1.weight",
    "layers.0.blocks.0.ffn.sg.norm.weight",
    "layers.0.blocks.0.ffn.sg.conv.weight",
    "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.dwconv.0.weight",
    "layers.0.blocks.0.attn.channel_interaction.1.weight",
    "layers.0.blocks.0.attn.spatial_interaction.0.weight",
    OFFSETS_KEY,
    "layers.0.blocks.0.attn.attns.0.relative_position_index",
    "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight",
    "norm.weight",
];

/// The first window's position offsets: its last row is the window's side lengths less
/// one (spandrel's `split_size`).
const OFFSETS_KEY: &str = "layers.0.blocks.0.attn.attns.0.rpe_biases";

/// spandrel's training image size when no shifted block's mask is stored.
const DEFAULT_IMAGE_SIZE: i64 = 64;

/// A DAT file (its own names, unwrapped; the window read from `path`), or `None` when
/// its tensors do not make one network spandrel would build.
pub(super) fn detect(path: &Path, unwrapped: &Unwrapped) -> Result<Option<Layout>> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let refused = |name: &str| refusal(path, name);
    let Some(split) = split_size(path, unwrapped)? else {
        return Err(refused(OFFSETS_KEY));
    };
    let Some(first) = shape("conv_first.weight") else {
        return Ok(None);
    };
    let (features, channels) = (first[0], first.get(1).copied().unwrap_or(0));
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let groups = numbered_children(names(), "layers.");
    let heads = (0..groups)
        .map(|g| group_heads(unwrapped, g))
        .collect::<Option<Vec<i64>>>();
    let ffn_hidden = shape(KEYS[3]).and_then(|s| s.first().copied());
    let upsampling = upsampling(unwrapped, channels);
    let (Some(heads), Some(ffn_hidden), Some((upsampler, scale, upsample_features))) =
        (heads, ffn_hidden, upsampling)
    else {
        return Ok(None);
    };
    let image_size = match shape("layers.0.blocks.2.attn.attn_mask_0") {
        Some([windows, pixels, ..]) => ((windows * pixels) as f64).sqrt() as i64,
        _ => DEFAULT_IMAGE_SIZE,
    };
    let fits = channels >= 1
        && groups >= 1
        && features % 2 == 0
        && ffn_hidden % 2 == 0
        && heads
            .iter()
            .all(|h| *h >= 2 && features % h == 0 && (features / 2) % (h / 2) == 0);
    Ok(fits.then(|| Layout {
        architecture: Architecture::Dat {
            channels,
            features,
            groups,
            split,
            heads: heads.iter().copied().max().unwrap_or(1),
            ffn_hidden,
            image_size,
            upsampler,
            upsample_features,
            scale,
            three_conv: shape("conv_after_body.weight").is_none(),
        },
        names: own_names(unwrapped),
    }))
}

/// The window's `[rows, columns]` (spandrel's `split_size`): the last stored offset plus
/// one, where it fits the stored tables' shapes and the smaller side divides the larger
/// (the reference pads to the larger side, which the other branch's windows must fill).
fn split_size(path: &Path, unwrapped: &Unwrapped) -> Result<Option<[i64; 2]>> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let (Some(offsets), Some(index)) = (shape(OFFSETS_KEY), shape(KEYS[11])) else {
        return Ok(None);
    };
    let stored = unwrapped
        .iter()
        .find(|(_, n, _)| *n == OFFSETS_KEY)
        .map_or(OFFSETS_KEY, |(s, _, _)| *s);
    if offsets.len() != 2 || offsets[1] != 2 || offsets[0] < 1 || index.is_empty() {
        return Ok(None);
    }
    let values = Vec::<f32>::try_from(read_tensor(path, stored, offsets)?.flatten(0, -1))
        .map_err(|e| EngineError::Internal(format!("reading `{stored}`: {e}")))?;
    let last = &values[values.len() - 2..];
    let side = |v: f32| (v.fract() == 0.0 && (0.0..=256.0).contains(&v)).then(|| v as i64 + 1);
    let (Some(rows), Some(columns)) = (side(last[0]), side(last[1])) else {
        return Ok(None);
    };
    let fits = rows * columns == index[0]
        && (2 * rows - 1) * (2 * columns - 1) == offsets[0]
        && rows.max(columns) % rows.min(columns) == 0;
    Ok(fits.then_some([rows, columns]))
}

/// A group's heads: twice the first block's window heads (spandrel's reading where a
/// group has one block), or its channel block's heads.
fn group_heads(unwrapped: &Unwrapped, group: i64) -> Option<i64> {
    let block =
        |b: i64, name: &str| shape_of(unwrapped, &format!("layers.{group}.blocks.{b}.attn.{name}"));
    match block(1, "temperature") {
        Some(temperature) => temperature.first().copied(),
        None => Some(block(0, "attns.0.pos.pos3.2.weight")?.first()? * 2),
    }
}

/// The upsampler, the scale and the upsampling convolutions' width, as spandrel tells
/// them from which modules exist: a pixel shuffle after `conv_before_upsample`, or the
/// direct one.
fn upsampling(unwrapped: &Unwrapped, channels: i64) -> Option<(SwinUpsampler, i64, i64)> {
    let shape = |name: &str| shape_of(unwrapped, name);
    if shape("conv_last.weight").is_some() {
        let width = *shape("conv_before_upsample.0.weight")?.first()?;
        let scale = pixel_shuffle_scale(unwrapped, width)?;
        return Some((SwinUpsampler::PixelShuffle, scale, width));
    }
    let shuffled = *shape("upsample.0.weight")?.first()?;
    let scale = exact_root(shuffled / channels.max(1)).filter(|s| *s >= 1)?;
    (shuffled == scale * scale * channels).then_some((SwinUpsampler::PixelShuffleDirect, scale, 0))
}

impl Architecture {
    /// spandrel's DAT tags: a size (light below four groups, small with 8×16 windows,
    /// else medium), the training size and window, `num_feat`, the width, the FFN's
    /// expansion as Python prints the float, the residual connection.
    pub(super) fn dat_tags(&self) -> Vec<String> {
        let Architecture::Dat {
            features,
            groups,
            split,
            ffn_hidden,
            image_size,
            upsampler,
            upsample_features,
            scale,
            three_conv,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let size = match (groups, split) {
            (..=3, _) => "light",
            (_, [8, 16]) => "small",
            _ => "medium",
        };
        // `get_pixelshuffle_params` reads the width from the first upsampling round
        // (64 without one); the direct upsampler's is the embedding width.
        let num_feat = match upsampler {
            SwinUpsampler::PixelShuffle if scale > 1 => upsample_features,
            SwinUpsampler::PixelShuffle => 64,
            _ => features,
        };
        let expansion = ffn_hidden as f64 / features as f64;
        let mut expansion = format!("{expansion}");
        if !expansion.contains(['.', 'e', 'i', 'N']) {
            expansion.push_str(".0");
        }
        vec![
            size.to_string(),
            format!("s{image_size}|{}x{}", split[0], split[1]),
            format!("{num_feat}nf"),
            format!("{features}dim"),
            format!("{expansion}ef"),
            if three_conv { "3conv" } else { "1conv" }.to_string(),
        ]
    }
}
