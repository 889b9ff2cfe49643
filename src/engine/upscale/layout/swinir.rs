//! SwinIR's hyperparameters read from its tensors as spandrel reads them
//! (`SwinIR/__init__.py`): the upsampler from which modules exist, the scale from their
//! shapes, the window from the stored relative position index, the training image size
//! from the first shifted block's stored mask, the heads of every group from its bias
//! table.

use super::{exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// How SwinIR turns its features into the output image (spandrel's `upsampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinUpsampler {
    /// Classical SR (`pixelshuffle`): a convolution and LeakyReLU, pixel-shuffle rounds
    /// (×2 each, or one ×3), a last convolution.
    PixelShuffle,
    /// Lightweight SR (`pixelshuffledirect`): one convolution and one pixel shuffle.
    PixelShuffleDirect,
    /// Real-world SR (`nearest+conv`): nearest ×2 rounds, each followed by a convolution.
    NearestConv,
    /// Denoising and JPEG restoration (no upsampler): the image plus a last convolution.
    Residual,
}

/// The tensors spandrel detects SwinIR by (beside `conv_first.weight`).
pub(super) const KEYS: [&str; 3] = [
    "layers.0.residual_group.blocks.0.norm1.weight",
    "layers.0.residual_group.blocks.0.mlp.fc1.bias",
    "layers.0.residual_group.blocks.0.attn.relative_position_index",
];

/// The first convolution of a SwinIR that pixel-unshuffles its input (not served:
/// spandrel's padding does not fit such a network's windows).
pub(super) const UNSHUFFLE_KEY: &str = "conv_first.1.weight";

/// spandrel's training image size when no shifted block's mask is stored.
const DEFAULT_IMAGE_SIZE: i64 = 64;

/// The scale of an `Upsample` of `width` channels (`upsample.0`, `upsample.2`, ...): ×2
/// rounds of 4·width channels, or one ×3 round of 9·width; 1 without rounds.
pub(super) fn pixel_shuffle_scale(unwrapped: &Unwrapped, width: i64) -> Option<i64> {
    let factors = (0..5)
        .map_while(|i| shape_of(unwrapped, &format!("upsample.{}.weight", 2 * i)))
        .map(|s| exact_root(s.first()? / width.max(1)))
        .collect::<Option<Vec<i64>>>()?;
    match factors.as_slice() {
        [3] => Some(3),
        twos if twos.iter().all(|f| *f == 2) => Some(1 << twos.len()),
        _ => None,
    }
}

/// A SwinIR file (its own names, unwrapped), or `None` when its tensors do not make one
/// network spandrel would build.
pub(super) fn detect(unwrapped: &Unwrapped) -> Option<Layout> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let first = shape("conv_first.weight")?;
    let (features, channels) = (*first.first()?, *first.get(1)?);
    let out_channels = shape("conv_last.weight").map_or(Some(channels), |s| s.first().copied())?;
    let index = shape(KEYS[2])?;
    let window = exact_root(*index.first()?).filter(|w| *w >= 1)?;
    let image_size = match shape("layers.0.residual_group.blocks.1.attn_mask") {
        Some(mask) => ((*mask.first()? as f64).sqrt() * window as f64) as i64,
        None => DEFAULT_IMAGE_SIZE,
    };
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let groups = numbered_children(names(), "layers.");
    let heads = (0..groups)
        .map(|g| {
            let table =
                format!("layers.{g}.residual_group.blocks.0.attn.relative_position_bias_table");
            shape(&table).and_then(|s| s.get(1).copied())
        })
        .collect::<Option<Vec<i64>>>()?;
    let (upsampler, scale, upsample_features) = upsampling(unwrapped, out_channels)?;
    let fits = channels == out_channels
        && groups >= 1
        && heads.iter().all(|h| *h >= 1 && features % h == 0);
    fits.then_some(Layout {
        architecture: Architecture::SwinIr {
            channels,
            features,
            groups,
            window,
            heads: heads.into_iter().max()?,
            mlp_hidden: *shape(KEYS[1])?.first()?,
            image_size,
            upsampler,
            upsample_features,
            scale,
            three_conv: shape("conv_after_body.weight").is_none(),
        },
        names: own_names(unwrapped),
    })
}

/// The upsampler, the scale and the upsampling convolutions' width (0 without them),
/// as spandrel tells them from which modules exist.
pub(super) fn upsampling(
    unwrapped: &Unwrapped,
    out_channels: i64,
) -> Option<(SwinUpsampler, i64, i64)> {
    let shape = |name: &str| shape_of(unwrapped, name);
    if let Some(before) = shape("conv_before_upsample.0.weight") {
        let width = *before.first()?;
        if shape("conv_up1.weight").is_some() {
            // One nearest ×2 round per `conv_upN` (spandrel builds up to three).
            let rounds = unwrapped
                .iter()
                .filter(|(_, n, _)| n.contains("conv_up") && !n.contains("bias"))
                .count() as u32;
            return (1..=3).contains(&rounds).then_some((
                SwinUpsampler::NearestConv,
                1 << rounds,
                width,
            ));
        }
        let scale = pixel_shuffle_scale(unwrapped, width)?;
        return Some((SwinUpsampler::PixelShuffle, scale, width));
    }
    if let Some(bias) = shape("upsample.0.bias") {
        let scale = exact_root(*bias.first()? / out_channels.max(1))?;
        return (scale >= 1).then_some((SwinUpsampler::PixelShuffleDirect, scale, 0));
    }
    Some((SwinUpsampler::Residual, 1, 0))
}

/// spandrel's size tag of a Swin network (SwinIR's and Swin2SR's) by its group count.
pub(super) fn size_tag(groups: i64) -> &'static str {
    match groups {
        ..=4 => "small",
        5..=8 => "medium",
        _ => "large",
    }
}

impl Architecture {
    /// spandrel's SwinIR tags: a size by the group count, the training size and window,
    /// `num_feat` (spandrel's 64 unless read from a pixel-shuffle upsampler), the width,
    /// the residual connection, no unshuffle.
    pub(super) fn swinir_tags(&self) -> Vec<String> {
        let Architecture::SwinIr {
            features,
            groups,
            window,
            image_size,
            upsampler,
            upsample_features,
            three_conv,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let size = size_tag(groups);
        let num_feat = match upsampler {
            SwinUpsampler::PixelShuffle => upsample_features,
            _ => 64,
        };
        vec![
            size.to_string(),
            format!("s{image_size}w{window}"),
            format!("{num_feat}nf"),
            format!("{features}dim"),
            if three_conv { "3conv" } else { "1conv" }.to_string(),
            "1unshuf".to_string(),
        ]
    }
}
