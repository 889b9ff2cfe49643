//! DCTLSA's hyperparameters read from its tensors as spandrel reads them
//! (`DCTLSA/__init__.py`): the channels and width from the first convolution, the
//! module count from the closing 1×1 convolution, the scale and output channels from the
//! upsampler's; the heads are spandrel's fixed 5, which no tensor tells.

use super::{dimension_of, own_names, shuffle_factor, Architecture, Layout, Unwrapped};

/// The tensors spandrel detects DCTLSA by.
pub(super) const KEYS: [&str; 17] = [
    FIRST_KEY,
    "B1.body.0.transformer_body.0.blocks.0.attn.qkv.weight",
    "B1.body.0.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight",
    "B1.body.1.transformer_body.0.blocks.0.attn.qkv.weight",
    "B1.body.1.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight",
    "B6.body.0.transformer_body.0.blocks.0.attn.qkv.weight",
    "B6.body.0.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight",
    "B6.body.1.transformer_body.0.blocks.0.attn.qkv.weight",
    "B6.body.1.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight",
    MODULES_KEY,
    "c1.0.weight",
    "c2.0.weight",
    "c3.0.weight",
    "c4.0.weight",
    "c5.0.weight",
    "LR_conv.weight",
    UPSAMPLER_KEY,
];

const FIRST_KEY: &str = "fea_conv.weight";
const MODULES_KEY: &str = "c.0.weight";
const UPSAMPLER_KEY: &str = "upsampler.0.weight";

/// The attention heads (spandrel's `num_head`, not in the file).
pub const HEADS: i64 = 5;
/// The modules the network chains (`B1` to `B6`, fixed in the reference).
pub const MODULES: i64 = 6;

/// The stored tensors inference does not read: the batch norms' step counts.
pub fn is_unread(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
}

/// A DCTLSA file (its own names); `Err` names the tensor that does not fit: a width the
/// five heads do not divide, a module count other than the reference's six (whose
/// forward pass concatenates six), an upsampler of no square scale.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let features = dimension_of(unwrapped, FIRST_KEY, 0)?;
    let channels = dimension_of(unwrapped, FIRST_KEY, 1)?;
    if features < HEADS || features % HEADS != 0 || channels < 1 {
        return Err(FIRST_KEY);
    }
    if dimension_of(unwrapped, MODULES_KEY, 1)? != MODULES * features {
        return Err(MODULES_KEY);
    }
    let shuffled = dimension_of(unwrapped, UPSAMPLER_KEY, 0)?;
    let (scale, out_channels) = shuffle_factor(shuffled, channels).ok_or(UPSAMPLER_KEY)?;
    if out_channels != channels {
        return Err(UPSAMPLER_KEY);
    }
    Ok(Layout {
        architecture: Architecture::Dctlsa {
            channels,
            features,
            scale,
        },
        names: own_names(unwrapped),
    })
}
