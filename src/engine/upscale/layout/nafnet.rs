//! NAFNet's hyperparameters read from its tensors as spandrel reads them
//! (`NAFNet/__init__.py`): the image channels and width from the first convolution, the
//! levels and each level's blocks from their sequences' lengths.

use super::{own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects NAFNet by.
pub(super) const KEYS: [&str; 18] = [
    FIRST_KEY,
    "ending.weight",
    UP_KEY,
    "downs.0.weight",
    "middle_blks.0.beta",
    "middle_blks.0.gamma",
    "middle_blks.0.conv1.weight",
    "middle_blks.0.conv2.weight",
    "middle_blks.0.conv3.weight",
    "middle_blks.0.sca.1.weight",
    "middle_blks.0.conv4.weight",
    "middle_blks.0.conv5.weight",
    "middle_blks.0.norm1.weight",
    "middle_blks.0.norm2.weight",
    "encoders.0.0.beta",
    "encoders.0.0.gamma",
    "decoders.0.0.beta",
    "decoders.0.0.gamma",
];

const FIRST_KEY: &str = "intro.weight";
const UP_KEY: &str = "ups.0.0.weight";

/// The most encoder levels a file may have (each halves the image; spandrel reads any
/// number, the published files have four).
pub const MAX_LEVELS: usize = 8;

/// A NAFNet file (its own names); `Err` names the tensor that does not fit: a first
/// convolution of no channels or width, encoder, decoder, downsampling and upsampling
/// sequences of unequal lengths (the reference builds as many upsamplers as decoder
/// levels and pairs them with the encoders in reverse), more levels than
/// [`MAX_LEVELS`].
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let (channels, features) = match shape_of(unwrapped, FIRST_KEY) {
        Some([width, channels, ..]) if *width > 0 && *channels > 0 => (*channels, *width),
        _ => return Err(FIRST_KEY.into()),
    };
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let count = |prefix: &str| numbered_children(names(), prefix) as usize;
    let levels = count("encoders.");
    let equal = [count("decoders."), count("downs."), count("ups.")]
        .iter()
        .all(|&c| c == levels);
    if !equal || levels > MAX_LEVELS {
        return Err(UP_KEY.into());
    }
    let mut encoders = [0; MAX_LEVELS];
    let mut decoders = [0; MAX_LEVELS];
    for level in 0..levels {
        encoders[level] = count(&format!("encoders.{level}.")) as i64;
        decoders[level] = count(&format!("decoders.{level}.")) as i64;
    }
    Ok(Layout {
        architecture: Architecture::NafNet {
            channels,
            features,
            levels: levels as i64,
            encoders,
            decoders,
            middle: count("middle_blks.") as i64,
        },
        names: own_names(unwrapped),
    })
}
