//! Swin2SR's hyperparameters read from its tensors as spandrel reads them
//! (`Swin2SR/__init__.py`): the width from the first convolution, the patch size from
//! the embedding's projection, the window from the stored relative position index, the
//! training image size from the first shifted block's stored mask, each group's heads
//! from its first block's logit scales, the residual connection and the upsampler from
//! which modules exist (SwinIR's four, and the auxiliary bicubic branch of the
//! compressed-input models).

use std::path::Path;

use super::swinir::{size_tag, upsampling};
use super::{
    dimension_or_refused, exact_root, own_names, refusal, shape_of, Architecture, Layout,
    SwinUpsampler, Unwrapped,
};
use crate::engine::error::Result;
use crate::engine::weights::numbered_children;

/// The tensors told apart from SwinIR's by (beside SwinIR's keys, which Swin2SR has too).
pub(super) const KEYS: [&str; 3] = [
    "conv_first.weight",
    "patch_embed.proj.weight",
    "layers.0.residual_group.blocks.0.attn.logit_scale",
];

/// Tensors of layouts spandrel builds but its descriptor cannot run: an absolute
/// position embedding (fixed to the training size), the high-frequency branch
/// (`pixelshuffle_hf`, whose network returns three images).
const REFUSED_KEYS: [&str; 2] = ["absolute_pos_embed", "conv_after_body_hf.weight"];

/// The auxiliary branch's bicubic convolution (`pixelshuffle_aux`).
const AUXILIARY_KEY: &str = "conv_bicubic.weight";

/// A Swin2SR file (its own names). Refused naming the tensor: the layouts above, a patch
/// size other than 1 (the tokens would not fill the image), windows under 2 pixels
/// (the continuous position bias divides by the window less one), heads that do not
/// divide the width.
pub(super) fn detect(path: &Path, unwrapped: &Unwrapped) -> Result<Layout> {
    let refused = |name: &str| refusal(path, name);
    let shape = |name: &str| shape_of(unwrapped, name);
    let dimension = |name: &str, d: usize| dimension_or_refused(path, unwrapped, name, d);
    if let Some(key) = REFUSED_KEYS.iter().find(|key| shape(key).is_some()) {
        return Err(refused(key));
    }
    let (features, channels) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 1)?);
    if dimension(KEYS[1], 2)? != 1 || dimension(KEYS[1], 3)? != 1 {
        return Err(refused(KEYS[1]));
    }
    let index = "layers.0.residual_group.blocks.0.attn.relative_position_index";
    let window = exact_root(dimension(index, 0)?).unwrap_or(0);
    if window < 2 {
        return Err(refused(index));
    }
    let image_size = match shape("layers.0.residual_group.blocks.1.attn_mask") {
        Some(mask) => {
            let windows = mask.first().copied().unwrap_or(0);
            ((windows * window * window) as f64).sqrt() as i64
        }
        None => window,
    };
    let groups = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "layers.");
    let mut most_heads = 1;
    for group in 0..groups {
        let scales = format!("layers.{group}.residual_group.blocks.0.attn.logit_scale");
        let heads = dimension(&scales, 0)?;
        if heads < 1 || features % heads != 0 {
            return Err(refused(&scales));
        }
        most_heads = most_heads.max(heads);
    }
    let three_conv = shape("conv_after_body.0.weight").is_some();
    if !three_conv && shape("conv_after_body.weight").is_none() {
        return Err(refused(KEYS[0]));
    }
    let Some((upsampler, scale, upsample_features)) = upsampling(unwrapped, channels) else {
        return Err(refused("upsample.0.weight"));
    };
    let auxiliary = shape(AUXILIARY_KEY).is_some();
    if channels < 1 || groups < 1 || (auxiliary && upsampler != SwinUpsampler::PixelShuffle) {
        return Err(refused(AUXILIARY_KEY));
    }
    Ok(Layout {
        architecture: Architecture::Swin2Sr {
            channels,
            features,
            groups,
            window,
            heads: most_heads,
            mlp_hidden: dimension("layers.0.residual_group.blocks.0.mlp.fc1.weight", 0)?,
            image_size,
            upsampler,
            auxiliary,
            upsample_features,
            scale,
            three_conv,
            patch_norm: shape("patch_embed.norm.weight").is_some(),
        },
        names: own_names(unwrapped),
    })
}

impl Architecture {
    /// spandrel's Swin2SR tags: a size by the group count, the training size and window,
    /// the width, the residual connection.
    pub(super) fn swin2sr_tags(&self) -> Vec<String> {
        let Architecture::Swin2Sr {
            features,
            groups,
            window,
            image_size,
            three_conv,
            ..
        } = *self
        else {
            return Vec::new();
        };
        vec![
            size_tag(groups).to_string(),
            format!("s{image_size}w{window}"),
            format!("{features}dim"),
            if three_conv { "3conv" } else { "1conv" }.to_string(),
        ]
    }
}
