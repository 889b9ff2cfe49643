//! ATD's hyperparameters read from its tensors as spandrel reads them
//! (`ATD/__init__.py`): the width from the first convolution, the window from the stored
//! self-attention index, every group's layers and heads, the dictionary's tokens and
//! reduced width from the first layer, the upsampler from which modules exist, the
//! category size by spandrel's rule (128 for its "light" networks, else 256).

use super::swinir::pixel_shuffle_scale;
use super::{
    dimension_of, exact_root, own_names, ratio_gives_back, shape_of, Architecture, Layout,
    SwinUpsampler, Unwrapped,
};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects ATD by.
pub(super) const KEYS: [&str; 29] = [
    INDEX_KEY,
    FIRST_KEY,
    "conv_first.bias",
    "layers.0.residual_group.td",
    "layers.0.residual_group.layers.0.sigma",
    "layers.0.residual_group.layers.0.norm1.weight",
    "layers.0.residual_group.layers.0.norm1.bias",
    "layers.0.residual_group.layers.0.norm2.weight",
    "layers.0.residual_group.layers.0.norm2.bias",
    "layers.0.residual_group.layers.0.norm3.weight",
    "layers.0.residual_group.layers.0.norm3.bias",
    "layers.0.residual_group.layers.0.wqkv.weight",
    "layers.0.residual_group.layers.0.attn_win.relative_position_bias_table",
    "layers.0.residual_group.layers.0.attn_win.proj.weight",
    "layers.0.residual_group.layers.0.attn_win.proj.bias",
    TOKENS_KEY,
    REDUCED_KEY,
    "layers.0.residual_group.layers.0.attn_atd.wk.weight",
    "layers.0.residual_group.layers.0.attn_atd.wv.weight",
    "layers.0.residual_group.layers.0.attn_aca.logit_scale",
    "layers.0.residual_group.layers.0.attn_aca.proj.weight",
    FFN_KEY,
    "layers.0.residual_group.layers.0.convffn.fc1.bias",
    KERNEL_KEY,
    "layers.0.residual_group.layers.0.convffn.dwconv.depthwise_conv.0.bias",
    "layers.0.residual_group.layers.0.convffn.fc2.weight",
    "layers.0.residual_group.layers.0.convffn.fc2.bias",
    "norm.weight",
    "norm.bias",
];

/// An absolute position embedding: only for images of the training size (not served).
pub(super) const ABSOLUTE_KEY: &str = "absolute_pos_embed";

const INDEX_KEY: &str = "relative_position_index_SA";
const FIRST_KEY: &str = "conv_first.weight";
const TOKENS_KEY: &str = "layers.0.residual_group.layers.0.attn_atd.scale";
const REDUCED_KEY: &str = "layers.0.residual_group.layers.0.attn_atd.wq.weight";
const FFN_KEY: &str = "layers.0.residual_group.layers.0.convffn.fc1.weight";
const KERNEL_KEY: &str = "layers.0.residual_group.layers.0.convffn.dwconv.depthwise_conv.0.weight";
const BEFORE_UPSAMPLE_KEY: &str = "conv_before_upsample.0.weight";
const DIRECT_KEY: &str = "upsample.0.weight";

/// The upsampling convolutions' width (`num_feat`, fixed in the reference).
pub const UPSAMPLE_FEATURES: i64 = 64;
/// spandrel's category sizes: its "light" networks' and the others'.
const LIGHT_CATEGORY: i64 = 128;
const CATEGORY: i64 = 256;
/// The width of spandrel's "light" networks (with the direct upsampler).
const LIGHT_FEATURES: i64 = 48;

/// An ATD file (its own names); `Err` names the tensor that does not fit: a window index
/// of no square window, heads that do not divide the width, a feed-forward width the
/// reference's ratio does not give back, upsampling convolutions of another width than
/// the constructor's, an upsampler of no scale it builds.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let dimension = |name: &'static str, d| dimension_of(unwrapped, name, d);
    let (features, channels) = (dimension(FIRST_KEY, 0)?, dimension(FIRST_KEY, 1)?);
    let window = exact_root(dimension(INDEX_KEY, 0)?)
        .filter(|w| *w >= 1)
        .ok_or(INDEX_KEY)?;
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let groups = numbered_children(names(), "layers.");
    let mut heads = Vec::new();
    for g in 0..groups {
        let table =
            format!("layers.{g}.residual_group.layers.0.attn_win.relative_position_bias_table");
        let group_heads = shape_of(unwrapped, &table).and_then(|s| s.get(1).copied());
        match group_heads {
            Some(h) if h >= 1 && features % h == 0 => heads.push(h),
            _ => return Err(table),
        }
    }
    let mlp_hidden = dimension(FFN_KEY, 0)?;
    if channels < 1 || !ratio_gives_back(features, mlp_hidden) {
        return Err(FFN_KEY.to_string());
    }
    let (upsampler, scale) = upsampling(unwrapped, channels)?;
    let light = upsampler == SwinUpsampler::PixelShuffleDirect && features == LIGHT_FEATURES;
    let has = |name: &str| shape_of(unwrapped, name).is_some();
    Ok(Layout {
        architecture: Architecture::Atd {
            channels,
            features,
            groups,
            window,
            heads: heads.into_iter().max().unwrap_or(1),
            mlp_hidden,
            tokens: dimension(TOKENS_KEY, 0)?,
            reduced: dimension(REDUCED_KEY, 0)?,
            kernel: dimension(KERNEL_KEY, 2)?,
            category: if light { LIGHT_CATEGORY } else { CATEGORY },
            upsampler,
            scale,
            three_conv: !has("layers.0.conv.weight"),
            patch_norm: has("patch_embed.norm.weight"),
            mean_shift: !has("no_norm"),
        },
        names: own_names(unwrapped),
    })
}

/// The upsampler and the scale as spandrel tells them: two nearest rounds (x4) where
/// `conv_up1` exists, pixel-shuffle rounds (none at x1) after `conv_before_upsample`,
/// none where only `conv_last` is left, else the direct pixel shuffle.
fn upsampling(unwrapped: &Unwrapped, channels: i64) -> Result<(SwinUpsampler, i64), String> {
    let has = |name: &str| shape_of(unwrapped, name).is_some();
    let nearest = has("conv_up1.weight");
    if nearest || has(BEFORE_UPSAMPLE_KEY) {
        if dimension_of(unwrapped, BEFORE_UPSAMPLE_KEY, 0)? != UPSAMPLE_FEATURES {
            return Err(BEFORE_UPSAMPLE_KEY.to_string());
        }
        if nearest {
            return Ok((SwinUpsampler::NearestConv, 4));
        }
        let scale = pixel_shuffle_scale(unwrapped, UPSAMPLE_FEATURES).ok_or("upsample.0.weight")?;
        return Ok((SwinUpsampler::PixelShuffle, scale));
    }
    if has("conv_last.weight") {
        return Ok((SwinUpsampler::Residual, 1));
    }
    let rows = dimension_of(unwrapped, DIRECT_KEY, 0)?;
    let scale = exact_root(rows / channels)
        .filter(|s| *s >= 1 && rows % channels == 0)
        .ok_or(DIRECT_KEY)?;
    Ok((SwinUpsampler::PixelShuffleDirect, scale))
}

impl Architecture {
    /// spandrel's ATD tags: "light" for its light networks, the width, the window and
    /// the category size.
    pub(super) fn atd_tags(&self) -> Vec<String> {
        let Architecture::Atd {
            features,
            window,
            category,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let light = (category == LIGHT_CATEGORY).then(|| "light".to_string());
        light
            .into_iter()
            .chain([
                format!("{features}dim"),
                format!("{window}w"),
                format!("{category}cat"),
            ])
            .collect()
    }
}
