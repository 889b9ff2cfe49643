//! FDAT's hyperparameters read from its tensors as spandrel reads them
//! (`FDAT/__init__.py`): the upsampler, its scale, the width, the image channels and the
//! upsampler's width from the stored `upsampler.MetaUpsample` record; the input
//! channels or the pixel unshuffle from the first convolution; groups and blocks from
//! their sequences' lengths; heads and window from the first block's attention bias; the
//! feed-forward and interaction widths from the first block's layers.

use std::path::Path;

use super::uni_upsample::{meta_record, UniUpsampler, DYSAMPLE_GROUPS};
use super::{
    dimension_or_refused, exact_root, own_names, refusal, shape_of, Architecture, Layout, Unwrapped,
};
use crate::engine::error::Result;
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects FDAT by (beside `conv_first.weight`, or
/// `conv_first.1.weight` after a pixel unshuffle).
pub(super) const KEYS: [&str; 5] = [
    "groups.0.blocks.0.attn.bias",
    "groups.0.blocks.0.inter.cg.1.weight",
    "groups.0.blocks.0.ffn.fc1.weight",
    "groups.0.blocks.0.n1.weight",
    META_KEY,
];

/// The upsampler's record (see [`super::uni_upsample::meta_record`]).
pub const META_KEY: &str = "upsampler.MetaUpsample";

/// The first convolution, alone or after the pixel unshuffle.
const FIRST_KEY: &str = "conv_first.weight";
const UNSHUFFLED_FIRST_KEY: &str = "conv_first.1.weight";

/// The block types in each group, in turn (the constructor's `group_block_pattern`).
pub const PATTERN: i64 = 2;

/// An FDAT file (its own names). Refused naming the tensor where spandrel cannot load
/// or run it: a record of no known upsampler, of a width other than the first
/// convolution's (as `pa_up` files store their inner width there), of a scale the
/// upsampler cannot take; an unshuffle other than 2 or 4; groups of another block count
/// than the first's or of an odd one; heads that do not divide the width; an interaction
/// width its reduction does not give back; DySample's or the deformable attention's
/// width its groups do not divide.
pub(super) fn detect(path: &Path, unwrapped: &Unwrapped) -> Result<Layout> {
    let refused = |name: &str| refusal(path, name);
    let dimension = |name: &str, d: usize| dimension_or_refused(path, unwrapped, name, d);
    let record = meta_record(path, unwrapped, META_KEY)?;
    let upsampler = *UniUpsampler::ALL
        .get(usize::from(record[1]))
        .ok_or_else(|| refused(META_KEY))?;
    let (features, channels, upsample_features) = (
        i64::from(record[3]),
        i64::from(record[4]),
        i64::from(record[5]),
    );
    let (first, unshuffle, in_channels) = match shape_of(unwrapped, UNSHUFFLED_FIRST_KEY) {
        Some(shape) => {
            let squared = shape.get(1).copied().unwrap_or(0) / channels.max(1);
            (
                UNSHUFFLED_FIRST_KEY,
                exact_root(squared).unwrap_or(0),
                channels,
            )
        }
        None => (FIRST_KEY, 1, dimension(FIRST_KEY, 1)?),
    };
    // spandrel builds the unshuffle for scales 1 and 2 only (4 // scale), and then an
    // upsampler at 4.
    let (scale, upsampler_scale) = match unshuffle {
        1 => (i64::from(record[2]), i64::from(record[2])),
        2 | 4 => (4 / unshuffle, 4),
        _ => return Err(refused(first)),
    };
    if dimension(first, 0)? != features || channels != in_channels || channels < 1 {
        return Err(refused(META_KEY));
    }
    if !upsampler.takes(upsampler_scale) || upsample_features < 1 {
        return Err(refused(META_KEY));
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let groups = numbered_children(names(), "groups.");
    let blocks = numbered_children(names(), "groups.0.blocks.");
    for group in 0..groups {
        let prefix = format!("groups.{group}.blocks.");
        let count = numbered_children(names(), &prefix);
        if count != blocks || count % PATTERN != 0 || count == 0 {
            return Err(refused(&format!("{prefix}0.n1.weight")));
        }
    }
    let (heads, window_area) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 2)?);
    let window = exact_root(window_area).unwrap_or(0);
    if heads < 1 || features % heads != 0 || window < 1 {
        return Err(refused(KEYS[0]));
    }
    let aim_reduced = dimension(KEYS[1], 0)?;
    if aim_reduced < 1 || features / (features / aim_reduced) != aim_reduced {
        return Err(refused(KEYS[1]));
    }
    check_upsampler_width(path, upsampler, upsampler_scale, upsample_features)?;
    Ok(Layout {
        architecture: Architecture::Fdat {
            channels,
            features,
            groups,
            blocks,
            heads,
            window,
            ffn_hidden: dimension(KEYS[2], 0)?,
            aim_reduced,
            upsampler,
            upsample_features,
            scale,
            unshuffle,
        },
        names: own_names(unwrapped),
    })
}

/// DySample splits its input into four groups and the deformable attention into two
/// groups of a quarter of its width: refused naming the record where they do not divide.
fn check_upsampler_width(
    path: &Path,
    upsampler: UniUpsampler,
    scale: i64,
    inner: i64,
) -> Result<()> {
    let fits = match upsampler {
        _ if scale == 1 => true,
        UniUpsampler::DySample => inner > DYSAMPLE_GROUPS && inner % DYSAMPLE_GROUPS == 0,
        // A quarter of the width in two groups, and the width itself in two.
        UniUpsampler::Lda => inner >= 8 && matches!(inner % 8, 0 | 2),
        _ => true,
    };
    if fits {
        Ok(())
    } else {
        Err(refusal(path, META_KEY))
    }
}

impl Architecture {
    /// spandrel's FDAT tags: the width, the upsampler, the size's name, `unshuffle`.
    pub(super) fn fdat_tags(&self) -> Vec<String> {
        let Architecture::Fdat {
            features,
            groups,
            upsampler,
            unshuffle,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let mut tags = vec![format!("{features}dim"), upsampler.name().to_string()];
        let size = match features {
            96 => Some("tiny"),
            108 => Some("light"),
            120 => Some("medium"),
            180 => Some("large"),
            _ => None,
        };
        if let Some(size) = size {
            tags.push(if groups == 6 { "xl" } else { size }.to_string());
        }
        if unshuffle > 1 {
            tags.push("unshuffle".to_string());
        }
        tags
    }
}
