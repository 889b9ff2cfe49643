//! SPAN's hyperparameters read from its tensors as spandrel reads them
//! (`SPAN/__init__.py`).

use super::{own_names, shape_of, shuffle_factor, Architecture, Layout, Unwrapped};

/// The tensors spandrel detects SPAN by.
pub(super) const KEYS: [&str; 8] = [
    "conv_1.sk.weight",
    "block_1.c1_r.sk.weight",
    "block_1.c1_r.eval_conv.weight",
    "block_1.c3_r.eval_conv.weight",
    "conv_cat.weight",
    "conv_2.sk.weight",
    "conv_2.eval_conv.weight",
    "upsampler.0.weight",
];

/// A SPAN file (its own names, unwrapped): the channels and width from `conv_1.sk`, the
/// scale and output channels from the upsampler as spandrel reads them.
pub(super) fn detect(unwrapped: &Unwrapped) -> Option<Layout> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let first = shape("conv_1.sk.weight")?;
    let (features, channels) = (*first.first()?, *first.get(1)?);
    let (scale, out_channels) = shuffle_factor(*shape("upsampler.0.weight")?.first()?, channels)?;
    (out_channels == channels).then_some(Layout {
        architecture: Architecture::Span {
            channels,
            features,
            scale,
            normalised: shape("no_norm").is_none(),
        },
        names: own_names(unwrapped),
    })
}
