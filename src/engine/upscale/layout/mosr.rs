//! MoSR's hyperparameters read from its tensors as spandrel reads them
//! (`MoSR/__init__.py`): the width and channels from the first convolution, the blocks
//! from the sequence's length, the hidden and convolved widths and the kernel from the
//! first block, the upsampler and scale from the upsampler's tensors.

use super::{dimension_of, exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects MoSR by.
pub(super) const KEYS: [&str; 10] = [
    "gblocks.0.weight",
    "gblocks.0.bias",
    "gblocks.1.norm.weight",
    "gblocks.1.norm.bias",
    "gblocks.1.fc1.weight",
    "gblocks.1.fc1.bias",
    "gblocks.1.conv.weight",
    "gblocks.1.conv.bias",
    "gblocks.1.fc2.weight",
    "gblocks.1.fc2.bias",
];

/// Each upsampler's tensors that tell it and its scale: DySample's offsets (beside its
/// initial positions and end convolution), the geometric ensemble pixel shuffle's
/// convolution, the plain one's.
const DYSAMPLE_KEYS: [&str; 3] = [
    "upsampler.init_pos",
    "upsampler.offset.weight",
    "upsampler.end_conv.weight",
];
const ENSEMBLE_KEY: &str = "upsampler.in_to_k.weight";
const SHUFFLE_KEY: &str = "upsampler.0.weight";

/// The groups MoSR's DySample samples in (the constructor's).
pub const DYSAMPLE_GROUPS: i64 = 4;

/// How MoSR's features become the image (`upsampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoSrUpsampler {
    /// `ps`: a 3×3 convolution and a pixel shuffle.
    PixelShuffle,
    /// `gps`: eight predictions of each sub-pixel averaged, then a pixel shuffle.
    GeometricEnsemble,
    /// `dys`: DySample's learned sampling and a 1×1 convolution.
    DySample,
}

/// The geometric ensemble's predictions per output value (`GPS`'s eight).
pub const ENSEMBLE: i64 = 8;

/// The layers of `gblocks` beside the blocks: the first convolution and the tail's five.
const TRAIL: i64 = 6;

/// A MoSR file (its own names); `Err` names the tensor that does not fit: a depthwise
/// kernel of even side (the reference's parts would not line up), a hidden width the
/// convolved part exceeds, an upsampler of no square scale, DySample over a width its
/// groups do not divide or ending at other channels than the image's.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let dimension = |name: &'static str, d: usize| dimension_of(unwrapped, name, d);
    let (features, channels) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 1)?);
    let blocks = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "gblocks.") - TRAIL;
    if channels < 1 || features < 1 || blocks < 1 {
        return Err(KEYS[0]);
    }
    let doubled = dimension(KEYS[4], 0)?;
    let hidden = doubled / 2;
    let (conv_channels, kernel) = (dimension(KEYS[6], 0)?, dimension(KEYS[6], 2)?);
    if doubled % 2 != 0 {
        return Err(KEYS[4]);
    }
    if !(1..=hidden).contains(&conv_channels) || kernel < 1 || kernel % 2 == 0 {
        return Err(KEYS[6]);
    }
    let has = |name: &str| shape_of(unwrapped, name).is_some();
    let (upsampler, key, per_scale) = if has(DYSAMPLE_KEYS[0]) {
        // DySample splits the features into its groups and ends at the image's channels.
        if features % DYSAMPLE_GROUPS != 0 {
            return Err(DYSAMPLE_KEYS[1]);
        }
        if dimension(DYSAMPLE_KEYS[2], 0)? != channels {
            return Err(DYSAMPLE_KEYS[2]);
        }
        let offsets = 2 * DYSAMPLE_GROUPS;
        (MoSrUpsampler::DySample, DYSAMPLE_KEYS[1], offsets)
    } else if has(ENSEMBLE_KEY) {
        let predictions = ENSEMBLE * channels;
        (MoSrUpsampler::GeometricEnsemble, ENSEMBLE_KEY, predictions)
    } else {
        (MoSrUpsampler::PixelShuffle, SHUFFLE_KEY, channels)
    };
    let shuffled = dimension(key, 0)?;
    let scale = exact_root(shuffled / per_scale).unwrap_or(0);
    if scale < 1 || shuffled != per_scale * scale * scale {
        return Err(key);
    }
    Ok(Layout {
        architecture: Architecture::MoSr {
            channels,
            features,
            blocks,
            hidden,
            conv_channels,
            kernel,
            scale,
            upsampler,
        },
        names: own_names(unwrapped),
    })
}
