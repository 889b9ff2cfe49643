//! DITN's hyperparameters read from its tensors as spandrel reads them
//! (`DITN/__init__.py`): the width and input channels from the first convolution, the
//! units and their local and global blocks from the sequences' lengths, the feed-forward
//! width from the first local block, the biases from its attention's projection, the
//! scale from the upsampler's convolution.

use super::{dimension_of, exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects DITN by.
pub(super) const KEYS: [&str; 7] = [
    "sft.weight",
    "UFONE.0.ITLs.0.attn.temperature",
    "UFONE.0.ITLs.0.ffn.project_in.weight",
    "UFONE.0.ITLs.0.ffn.dwconv.weight",
    "UFONE.0.ITLs.0.ffn.project_out.weight",
    "conv_after_body.weight",
    UPSAMPLE_KEY,
];

const UPSAMPLE_KEY: &str = "upsample.0.weight";

/// Whether the attention projections and feed-forward convolutions have biases.
const BIAS_KEY: &str = "UFONE.0.ITLs.0.attn.project_out.bias";

/// The side of the patches the local blocks attend within (spandrel's 8, which the file
/// cannot tell).
pub const PATCH: i64 = 8;

/// A DITN file (its own names); `Err` names the tensor that does not fit: a feed-forward
/// projection of odd width (its output is split in two), an upsampler of no square
/// scale over the three colours spandrel's network ends at, a unit with another count of
/// local or global blocks than the first (spandrel builds them alike).
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let dimension = |name: &'static str, d: usize| dimension_of(unwrapped, name, d);
    let (features, channels) = (dimension(KEYS[0], 0)?, dimension(KEYS[0], 1)?);
    let doubled = dimension(KEYS[2], 0)?;
    if doubled % 2 != 0 || doubled < 2 {
        return Err(KEYS[2].to_string());
    }
    let shuffled = dimension(UPSAMPLE_KEY, 0)?;
    let scale = exact_root(shuffled / 3).unwrap_or(0);
    if scale < 1 || shuffled != 3 * scale * scale {
        return Err(UPSAMPLE_KEY.to_string());
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let units = numbered_children(names(), "UFONE.");
    let local_blocks = numbered_children(names(), "UFONE.0.ITLs.");
    let global_blocks = numbered_children(names(), "UFONE.0.SALs.");
    for unit in 1..units {
        let local = format!("UFONE.{unit}.ITLs.");
        let global = format!("UFONE.{unit}.SALs.");
        if numbered_children(names(), &local) != local_blocks
            || numbered_children(names(), &global) != global_blocks
        {
            return Err(format!("UFONE.{unit}.ITLs.0.attn.temperature"));
        }
    }
    if channels < 1 || features < 1 {
        return Err(KEYS[0].to_string());
    }
    Ok(Layout {
        architecture: Architecture::Ditn {
            channels,
            features,
            units,
            local_blocks,
            global_blocks,
            ffn_hidden: doubled / 2,
            bias: shape_of(unwrapped, BIAS_KEY).is_some(),
            scale,
        },
        names: own_names(unwrapped),
    })
}
