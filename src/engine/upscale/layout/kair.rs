//! The hyperparameters of KAIR's restoration networks read from their tensors as spandrel
//! reads them: DnCNN and FDnCNN (`DnCNN/__init__.py`), DRUNet (`DRUNet/__init__.py`) and
//! FBCNN (`FBCNN/__init__.py`). The U-Nets' widths come from each level's first
//! convolution, the blocks per level from a sequence's length, the resampling from which
//! tensors the level's first entry has.

use super::{dimension_of, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects DnCNN by, beside either [`DNCNN_PLAIN_KEYS`] or
/// [`DNCNN_NORMED_KEYS`].
pub(super) const DNCNN_KEYS: [&str; 4] = [
    "model.0.weight",
    "model.0.bias",
    "model.2.weight",
    "model.2.bias",
];

/// A DnCNN of ReLU layers: at least eight convolutions.
pub(super) const DNCNN_PLAIN_KEYS: [&str; 12] = [
    "model.4.weight",
    "model.4.bias",
    "model.6.weight",
    "model.6.bias",
    "model.8.weight",
    "model.8.bias",
    "model.10.weight",
    "model.10.bias",
    "model.12.weight",
    "model.12.bias",
    "model.14.weight",
    "model.14.bias",
];

/// A DnCNN of batch-normed layers.
pub(super) const DNCNN_NORMED_KEYS: [&str; 12] = [
    "model.3.weight",
    "model.3.bias",
    "model.3.running_mean",
    "model.3.running_var",
    "model.5.weight",
    "model.5.bias",
    "model.6.weight",
    "model.6.bias",
    "model.6.running_mean",
    "model.6.running_var",
    "model.8.weight",
    "model.8.bias",
];

/// The tensors spandrel detects DRUNet by.
pub(super) const DRUNET_KEYS: [&str; 12] = [
    HEAD_KEY,
    "m_down1.0.res.0.weight",
    "m_down1.0.res.2.weight",
    LEVEL_KEYS[1],
    LEVEL_KEYS[2],
    "m_body.0.res.0.weight",
    "m_body.0.res.2.weight",
    "m_up3.2.res.0.weight",
    "m_up3.2.res.2.weight",
    "m_up2.2.res.0.weight",
    "m_up1.2.res.0.weight",
    TAIL_KEY,
];

/// The tensors spandrel detects FBCNN by.
pub(super) const FBCNN_KEYS: [&str; 6] = [
    HEAD_KEY,
    "m_down1.0.res.0.weight",
    LEVEL_KEYS[1],
    FBCNN_BODY_KEY,
    TAIL_KEY,
    "qf_pred.0.res.0.weight",
];

const HEAD_KEY: &str = "m_head.weight";
const TAIL_KEY: &str = "m_tail.weight";
/// The first convolution of the second and third levels' blocks.
const LEVEL_KEYS: [&str; 3] = [HEAD_KEY, "m_down2.0.res.0.weight", "m_down3.0.res.0.weight"];
const DRUNET_BODY_KEY: &str = "m_body.0.res.0.weight";
const FBCNN_BODY_KEY: &str = "m_body_encoder.0.res.0.weight";

/// The width FBCNN's quality-factor layers are built with, which its pooled lowest level
/// must have.
pub const FBCNN_QF_WIDTH: i64 = 512;

/// How a KAIR U-Net halves the resolution after a level's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KairDownsample {
    /// A 2×2 convolution of stride 2.
    StrideConv,
    /// A 2×2 average pool, then a 3×3 convolution (spandrel's reading of a file without
    /// the strided convolution: a max pool stores the same tensors).
    AvgPool,
}

/// How a KAIR U-Net doubles the resolution before a level's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KairUpsample {
    /// A 2×2 transposed convolution of stride 2.
    ConvTranspose,
    /// A 3×3 convolution to four times the width, then a ×2 pixel shuffle.
    PixelShuffle,
    /// A nearest ×2 enlargement, then a 3×3 convolution.
    UpConv,
}

/// A KAIR U-Net's shape: the four levels' widths, the residual blocks per level and how
/// the levels are resampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KairUnet {
    pub widths: [i64; 4],
    pub blocks: i64,
    pub downsample: KairDownsample,
    pub upsample: KairUpsample,
}

/// The stored tensors inference does not read: DnCNN's batch norms' step counts.
pub fn is_unread(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
}

/// A DnCNN or FDnCNN file (its own names); `Err` names the tensor that does not fit: a
/// sequence no count of layers gives, a first convolution over other than the image's
/// channels (DnCNN) or one more (FDnCNN's noise level).
pub(super) fn detect_dncnn(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let length = numbered_children(names(), "model.");
    let last = format!("model.{}.weight", length - 1);
    let batch_norm = shape_of(unwrapped, DNCNN_NORMED_KEYS[0]).is_some();
    // The head and its ReLU, the body's layers (a convolution, a batch norm where there
    // are any, a ReLU), the tail.
    let per_layer = if batch_norm { 3 } else { 2 };
    if length < 3 || (length - 3) % per_layer != 0 {
        return Err(last);
    }
    let channels = shape_of(unwrapped, &last)
        .and_then(|s| s.first().copied())
        .ok_or_else(|| last.clone())?;
    let features = dimension_of(unwrapped, DNCNN_KEYS[0], 0)?;
    let input = dimension_of(unwrapped, DNCNN_KEYS[0], 1)?;
    let noise_map = input == channels + 1;
    if features < 1 || channels < 1 || !(input == channels || noise_map) {
        return Err(DNCNN_KEYS[0].into());
    }
    Ok(Layout {
        architecture: Architecture::DnCnn {
            channels,
            features,
            layers: (length - 3) / per_layer + 2,
            batch_norm,
            noise_map,
        },
        names: own_names(unwrapped),
    })
}

/// A DRUNet file (its own names); `Err` names the tensor that does not fit: a first
/// convolution over other than the image's channels and the noise level's, a level of no
/// width.
pub(super) fn detect_drunet(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let (channels, unet) = unet(unwrapped, "m_body.", DRUNET_BODY_KEY, drunet_upsample)?;
    if dimension_of(unwrapped, HEAD_KEY, 1)? != channels + 1 {
        return Err(HEAD_KEY.into());
    }
    Ok(Layout {
        architecture: Architecture::DrUnet { channels, unet },
        names: own_names(unwrapped),
    })
}

/// An FBCNN file (its own names); `Err` names the tensor that does not fit: a first
/// convolution over other than the image's channels, a level of no width, a lowest level
/// of other than the quality-factor layers' width, an upsampler of no known layout.
pub(super) fn detect_fbcnn(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let (channels, unet) = unet(
        unwrapped,
        "m_body_encoder.",
        FBCNN_BODY_KEY,
        |has, _| match () {
            _ if has("m_up3.0.weight") => Some(KairUpsample::ConvTranspose),
            _ if has("m_up3.0.1.weight") => Some(KairUpsample::UpConv),
            _ if has("m_up3.0.0.weight") => Some(KairUpsample::PixelShuffle),
            _ => None,
        },
    )?;
    if dimension_of(unwrapped, HEAD_KEY, 1)? != channels {
        return Err(HEAD_KEY.into());
    }
    if unet.widths[3] != FBCNN_QF_WIDTH {
        return Err(FBCNN_BODY_KEY.into());
    }
    Ok(Layout {
        architecture: Architecture::Fbcnn { channels, unet },
        names: own_names(unwrapped),
    })
}

/// DRUNet's upsampler, flattened into its level's sequence: the nearest enlargement
/// leaves the convolution second; a first 3×3 convolution shuffles.
fn drunet_upsample(has: &dyn Fn(&str) -> bool, unwrapped: &Unwrapped) -> Option<KairUpsample> {
    if has("m_up3.1.weight") {
        return Some(KairUpsample::UpConv);
    }
    match shape_of(unwrapped, "m_up3.0.weight")?.get(2)? {
        3 => Some(KairUpsample::PixelShuffle),
        _ => Some(KairUpsample::ConvTranspose),
    }
}

/// The image channels and the U-Net of a DRUNet or FBCNN file whose lowest level's blocks
/// are numbered under `body` (`body_key` the first's convolution); `upsample` tells the
/// upsampler from the tensors.
fn unet(
    unwrapped: &Unwrapped,
    body: &str,
    body_key: &'static str,
    upsample: impl Fn(&dyn Fn(&str) -> bool, &Unwrapped) -> Option<KairUpsample>,
) -> Result<(i64, KairUnet), String> {
    let has = |name: &str| shape_of(unwrapped, name).is_some();
    let mut widths = [0; 4];
    for (width, key) in widths.iter_mut().zip(LEVEL_KEYS.iter().chain([&body_key])) {
        *width = dimension_of(unwrapped, key, 0)?;
        if *width < 1 {
            return Err(key.to_string());
        }
    }
    let channels = dimension_of(unwrapped, TAIL_KEY, 0)?;
    if channels < 1 {
        return Err(TAIL_KEY.into());
    }
    let blocks = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), body);
    let downsample = match has(&format!("m_down1.{blocks}.weight")) {
        true => KairDownsample::StrideConv,
        false => KairDownsample::AvgPool,
    };
    let upsample = upsample(&has, unwrapped).ok_or_else(|| "m_up3.0.weight".to_string())?;
    let unet = KairUnet {
        widths,
        blocks,
        downsample,
        upsample,
    };
    Ok((channels, unet))
}
