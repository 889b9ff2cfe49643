//! Real-CUGAN's variant read from its tensors as spandrel reads it
//! (`RealCUGAN/__init__.py`): a final convolution makes the x4 network, or the fast x2
//! one where its outputs are the pixel-unshuffled input's; otherwise the first U-Net's
//! bottom deconvolution tells x3 (5×5) from x2; a `pro` flag the models trained for it.

use super::{dimension_of, own_names, shape_of, Architecture, Layout, Unwrapped};

/// The tensors spandrel detects Real-CUGAN by (a subset of its list).
pub(super) const KEYS: [&str; 6] = [
    "unet1.conv1.conv.0.weight",
    "unet1.conv2.seblock.conv1.weight",
    "unet1.conv_bottom.weight",
    "unet2.conv1.conv.0.weight",
    "unet2.conv3.seblock.conv1.weight",
    "unet2.conv_bottom.weight",
];

/// The flag of the "pro" models (a buffer of one zero).
pub const PRO_KEY: &str = "pro";

/// A Real-CUGAN file (its own names); `Err` names the tensor that does not fit: a fast
/// x2 network with the `pro` flag (its constructor has no such buffer, so spandrel
/// cannot load the file), channels that fit no variant.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let pro = shape_of(unwrapped, PRO_KEY).is_some();
    let first_in = dimension_of(unwrapped, KEYS[0], 1)?;
    let (channels, out_channels, scale, fast) = match shape_of(unwrapped, "conv_final.weight") {
        Some(last) => {
            let out = last.first().copied().unwrap_or(0) / 4;
            match out * 4 == first_in {
                true if pro => return Err(PRO_KEY),
                true => (first_in / 4, out, 2, true),
                false => (first_in, out, 4, false),
            }
        }
        None => {
            let bottom = dimension_of(unwrapped, KEYS[2], 2)?;
            (
                first_in,
                dimension_of(unwrapped, KEYS[5], 0)?,
                if bottom == 5 { 3 } else { 2 },
                false,
            )
        }
    };
    if channels < 1 || out_channels != channels {
        return Err(KEYS[0]);
    }
    Ok(Layout {
        architecture: Architecture::RealCugan {
            channels,
            scale,
            fast,
            pro,
        },
        names: own_names(unwrapped),
    })
}
