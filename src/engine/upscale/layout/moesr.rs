//! MoESR's hyperparameters read from its tensors as spandrel reads them
//! (`MoESR/__init__.py`): the upsampler, scale, output channels and inner width from the
//! stored `upscale.MetaUpsample` record, the width and input channels from the first
//! convolution, the groups and blocks from their sequences' lengths, the gated blocks'
//! hidden widths from their first projections.

use std::path::Path;

use super::uni_upsample::{meta_record, UniUpsampler};
use super::{
    dimension_or_refused, own_names, ratio_gives_back, refusal, Architecture, Layout, Unwrapped,
};
use crate::engine::error::Result;
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects MoESR by.
pub(super) const KEYS: [&str; 16] = [
    FIRST_KEY,
    "in_to_dim.bias",
    "blocks.0.blocks.0.gamma",
    "blocks.0.blocks.0.norm.weight",
    "blocks.0.blocks.0.norm.bias",
    BLOCK_KEY,
    "blocks.0.blocks.0.fc1.bias",
    "blocks.0.blocks.0.conv.dwconv_hw.weight",
    "blocks.0.blocks.0.conv.dwconv_hw.bias",
    "blocks.0.blocks.0.conv.dwconv_w.weight",
    "blocks.0.blocks.0.conv.dwconv_w.bias",
    "blocks.0.blocks.0.conv.dwconv_h.weight",
    "blocks.0.blocks.0.conv.dwconv_h.bias",
    "blocks.0.blocks.0.fc2.weight",
    "blocks.0.blocks.0.fc2.bias",
    META_KEY,
];

/// The upsampler's record: version, upsampler index (of the first five), scale, input
/// width, output channels, inner width, DySample's groups (`uint8`).
pub const META_KEY: &str = "upscale.MetaUpsample";

const FIRST_KEY: &str = "in_to_dim.weight";
const BLOCK_KEY: &str = "blocks.0.blocks.0.fc1.weight";
const MSG_BLOCK_KEY: &str = "blocks.0.msg.gated.0.fc1.weight";

/// The upsamplers MoESR's record can name (`SampleMods`: the first five).
const UPSAMPLERS: usize = 5;

/// The width the multi-scale gate's down-convolution divides by 4 before its ×2 pixel
/// unshuffle, and the inception convolution's branches by 8: a width below 8 or of no
/// multiple of 4 builds layers spandrel cannot make or run.
const WIDTH_MULTIPLE: i64 = 4;
const NARROWEST: i64 = 8;

/// A MoESR file (its own names). Refused naming the tensor where spandrel cannot load
/// it or would report another scale than it computes: a record of an upsampler MoESR
/// does not have, of a scale the upsampler cannot take (the plain convolution at any
/// scale but 1), of output channels other than the input's; a width below 8 or of no
/// multiple of 4; a gated block's projection of odd width, narrower than twice the
/// features, or of a width spandrel's expansion ratio does not give back.
pub(super) fn detect(path: &Path, unwrapped: &Unwrapped) -> Result<Layout> {
    let refused = |name: &str| refusal(path, name);
    let dimension = |name: &str, d: usize| dimension_or_refused(path, unwrapped, name, d);
    let record = meta_record(path, unwrapped, META_KEY)?;
    let upsampler = *UniUpsampler::ALL[..UPSAMPLERS]
        .get(usize::from(record[1]))
        .ok_or_else(|| refused(META_KEY))?;
    let (scale, out_channels, inner) = (
        i64::from(record[2]),
        i64::from(record[4]),
        i64::from(record[5]),
    );
    let (features, channels) = (dimension(FIRST_KEY, 0)?, dimension(FIRST_KEY, 1)?);
    let scale_fits = match upsampler {
        UniUpsampler::Conv => scale == 1,
        UniUpsampler::PixelShuffle => upsampler.takes(scale) && (scale == 1 || inner >= 1),
        _ => upsampler.takes(scale),
    };
    if !scale_fits || out_channels != channels || channels < 1 {
        return Err(refused(META_KEY));
    }
    if features < NARROWEST || features % WIDTH_MULTIPLE != 0 {
        return Err(refused(FIRST_KEY));
    }
    let hidden = gated_hidden(path, features, dimension(BLOCK_KEY, 0)?, BLOCK_KEY)?;
    let msg_hidden = gated_hidden(path, features, dimension(MSG_BLOCK_KEY, 0)?, MSG_BLOCK_KEY)?;
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    Ok(Layout {
        architecture: Architecture::MoEsr {
            channels,
            features,
            groups: numbered_children(names(), "blocks."),
            blocks: numbered_children(names(), "blocks.0.blocks."),
            hidden,
            msg_hidden,
            upsampler,
            upsample_features: inner,
            scale,
        },
        names: own_names(unwrapped),
    })
}

/// A gated block's hidden width from its projection's `doubled` width, as spandrel
/// reads it back (its ratio `doubled / features / 2` is half the projection over the
/// features, to the bit), the block's convolved part (all the features) fitting in it.
fn gated_hidden(path: &Path, features: i64, doubled: i64, key: &str) -> Result<i64> {
    let hidden = doubled / 2;
    if doubled % 2 != 0 || hidden < features || !ratio_gives_back(features, hidden) {
        return Err(refusal(path, key));
    }
    Ok(hidden)
}
