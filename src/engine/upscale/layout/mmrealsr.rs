//! MMRealSR's hyperparameters read from its tensors as spandrel reads them
//! (`MMRealSR/__init__.py`): the width and output channels from the last convolution,
//! the input channels and scale from the first, the blocks and growth from the body, the
//! degradations from their embedding, the degradation estimator's stages from its first
//! branch (every plain convolution in it taken as strided, as spandrel takes it).

use super::{dimension_of, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects MMRealSR by.
pub(super) const KEYS: [&str; 12] = [
    FIRST_KEY,
    "conv_body.weight",
    "conv_up1.weight",
    "conv_up2.weight",
    "conv_hr.weight",
    LAST_KEY,
    GROWTH_KEY,
    "am_list.0.fc.0.weight",
    ESTIMATOR_KEY,
    "de_net.body.0.0.conv1.weight",
    "de_net.fc_degree.0.0.weight",
    EMBED_KEY,
];

const FIRST_KEY: &str = "conv_first.weight";
const LAST_KEY: &str = "conv_last.weight";
const GROWTH_KEY: &str = "body.0.rdb1.conv1.weight";
/// The degradation estimator's first convolution (its first stage's width).
const ESTIMATOR_KEY: &str = "de_net.conv_first.0.weight";
/// The degrees' embedding (`dd_embed`), as wide as there are degradations.
const EMBED_KEY: &str = "dd_embed.0.weight";

/// The reference's forward pass reads a custom degree for each degradation from a pair.
pub const MAX_DEGRADATIONS: i64 = 2;

/// An MMRealSR file (its own names); `Err` names the tensor that does not fit: an input
/// spandrel reads as pixel-unshuffled (its x2 and x1 networks, whose degradation
/// estimator the reference builds for the unshuffled channels but runs on the image),
/// more degradations than the reference's forward pass takes.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let named = |name: &str| name.to_string();
    let channels = dimension_of(unwrapped, LAST_KEY, 0).map_err(named)?;
    let features = dimension_of(unwrapped, LAST_KEY, 1).map_err(named)?;
    let combined = dimension_of(unwrapped, FIRST_KEY, 1).map_err(named)?;
    let unshuffled = in_channels_and_scale(combined, channels) != Some((combined, 4));
    if channels < 1 || features < 1 || unshuffled {
        return Err(named(ESTIMATOR_KEY));
    }
    let degradations = dimension_of(unwrapped, EMBED_KEY, 1).map_err(named)?;
    if !(1..=MAX_DEGRADATIONS).contains(&degradations) {
        return Err(named(EMBED_KEY));
    }
    let estimator_width = dimension_of(unwrapped, ESTIMATOR_KEY, 0).map_err(named)?;
    check_estimator_body(unwrapped, estimator_width)?;
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    Ok(Layout {
        architecture: Architecture::MmRealSr {
            channels,
            features,
            blocks: numbered_children(names(), "body."),
            growth: dimension_of(unwrapped, GROWTH_KEY, 0).map_err(named)?,
            degradations,
            estimator_width,
        },
        names: own_names(unwrapped),
    })
}

/// The estimator's first branch as spandrel rebuilds its stages from it: residual blocks
/// of one width per stage, each stage but the first after a strided convolution into its
/// width, a convolution at the end keeping the last width; `Err` names the first tensor
/// that does not fit (blocks of another width with no convolution between, a
/// convolution after no blocks, one into another width than the next blocks', the
/// first blocks of another width than the first convolution's).
fn check_estimator_body(unwrapped: &Unwrapped, first_width: i64) -> Result<(), String> {
    let width_of = |key: &str| shape_of(unwrapped, key).and_then(|s| s.first().copied());
    // The width the next blocks must have, and whether a convolution may come next.
    let mut expected = Some(first_width);
    let mut after_blocks: Option<i64> = None;
    for i in 0.. {
        let block = format!("de_net.body.0.{i}.conv1.weight");
        let conv = format!("de_net.body.0.{i}.weight");
        if let Some(width) = width_of(&block) {
            if expected.is_some_and(|e| e != width) || after_blocks.is_some_and(|w| w != width) {
                return Err(block);
            }
            expected = None;
            after_blocks = Some(width);
        } else if let Some(output) = width_of(&conv) {
            let Some(input) = after_blocks.take() else {
                return Err(conv);
            };
            let last = width_of(&format!("de_net.body.0.{}.conv1.weight", i + 1)).is_none();
            if last && output != input {
                return Err(conv);
            }
            expected = Some(output);
        } else {
            return Ok(());
        }
    }
    Ok(())
}

/// spandrel's `_get_in_ch_and_scale`: the image channels and scale a first convolution
/// over `combined` channels implies (an x2 network unshuffles by 2, an x1 by 4), the
/// output channels taken as the input's where they fit.
fn in_channels_and_scale(combined: i64, out_channels: i64) -> Option<(i64, i64)> {
    let in_channels = if [1, 4, 16].contains(&(combined / out_channels.max(1)))
        && combined % out_channels.max(1) == 0
    {
        out_channels
    } else if combined % 3 == 0 {
        3
    } else if combined % 16 == 0 && combined > 16 {
        combined / 16
    } else if combined % 4 != 0 {
        combined
    } else if combined == 16 {
        1
    } else {
        4
    };
    [(1, 4), (4, 2), (16, 1)]
        .into_iter()
        .find(|(factor, _)| in_channels * factor == combined)
        .map(|(_, scale)| (in_channels, scale))
}

impl Architecture {
    /// spandrel's MMRealSR tags: the width and the blocks.
    pub(super) fn mmrealsr_tags(&self) -> Vec<String> {
        let Architecture::MmRealSr {
            features, blocks, ..
        } = *self
        else {
            return Vec::new();
        };
        vec![format!("{features}nf"), format!("{blocks}nb")]
    }
}
