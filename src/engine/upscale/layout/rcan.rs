//! RCAN's hyperparameters read from its tensors as spandrel reads them
//! (`RCAN/__init__.py`): groups and blocks from their numbered modules, the width and
//! kernel from the head's convolution, the channel attention's reduction from its first
//! convolution, the scale from the upsampler's convolutions, or from the pixel-unshuffle
//! the head's input channels tell; the mean shift from its tensors.

use super::{dimension_of, exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects RCAN by (besides the head's convolution).
pub(super) const KEYS: [&str; 3] = [
    "tail.1.weight",
    "body.0.body.0.body.0.weight",
    "body.0.body.0.body.3.conv_du.0.weight",
];

/// The head's convolution, at index 1 behind a pixel unshuffle.
pub(super) const HEAD_KEYS: [&str; 2] = ["head.0.weight", "head.1.weight"];

/// The upsampler's first convolution.
const UPSAMPLER_KEY: &str = "tail.0.0.weight";

/// The width spandrel gives a network without upsampling convolutions (it reads the
/// width from them).
const DEFAULT_FEATURES: i64 = 64;

/// An RCAN file (its own names); `Err` names the tensor that does not fit what
/// spandrel's constructor builds: an unshuffle other than 2 or 4, upsampling
/// convolutions other than ×2 rounds or one ×3, a reduction the width does not give back,
/// a width other than 64 without upsampling convolutions.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let dimension = |name: &'static str, d: usize| dimension_of(unwrapped, name, d);
    let shuffled = shape_of(unwrapped, HEAD_KEYS[1]).is_some();
    let head = HEAD_KEYS[usize::from(shuffled)];
    let channels = dimension(KEYS[0], 0)?;
    let features = dimension(head, 0)?;
    let kernel = dimension(head, 3)?;
    let head_in = dimension(head, 1)?;
    if features < 1 || channels < 1 {
        return Err(head);
    }
    let unshuffle = match shuffled {
        true => exact_root(head_in / channels)
            .filter(|d| matches!(d, 2 | 4) && head_in == channels * d * d)
            .ok_or(head)?,
        false if head_in == channels => 1,
        false => return Err(head),
    };
    let rounds = upsampling_rounds(unwrapped, features)?;
    let scale = match unshuffle {
        // The constructor enlarges an unshuffled network by 4 in two ×2 rounds.
        1 => rounds.iter().product(),
        d if rounds == [2, 2] => 4 / d,
        _ => return Err(UPSAMPLER_KEY),
    };
    if unshuffle == 1 && rounds.is_empty() && features != DEFAULT_FEATURES {
        return Err(head);
    }
    let squeezed = dimension(KEYS[2], 0)?;
    if squeezed < 1 || features / (features / squeezed).max(1) != squeezed {
        return Err(KEYS[2]);
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    Ok(Layout {
        architecture: Architecture::Rcan {
            channels,
            features,
            groups: numbered_children(names(), "body.") - 1,
            blocks: numbered_children(names(), "body.0.body.") - 1,
            kernel,
            squeezed,
            scale,
            unshuffle,
            mean_shift: shape_of(unwrapped, "sub_mean.weight").is_some(),
        },
        names: own_names(unwrapped),
    })
}

/// The factors of the upsampler's convolution and pixel-shuffle rounds; `Err` names the
/// first convolution where the rounds are not ×2 ones or a single ×3 (the constructor
/// builds no other).
fn upsampling_rounds(unwrapped: &Unwrapped, features: i64) -> Result<Vec<i64>, &'static str> {
    let mut rounds = Vec::new();
    while let Some(shape) = shape_of(unwrapped, &format!("tail.0.{}.weight", 2 * rounds.len())) {
        let factor = shape
            .first()
            .filter(|_| shape.get(1) == Some(&features))
            .and_then(|out| exact_root(out / features))
            .filter(|f| shape.first() == Some(&(f * f * features)));
        rounds.push(factor.ok_or(UPSAMPLER_KEY)?);
    }
    match rounds.as_slice() {
        [3] => Ok(rounds),
        r if r.iter().all(|f| *f == 2) => Ok(rounds),
        _ => Err(UPSAMPLER_KEY),
    }
}

impl Architecture {
    /// spandrel's RCAN tags: width, groups, blocks and `unshuffle`.
    pub(super) fn rcan_tags(&self) -> Vec<String> {
        let Architecture::Rcan {
            features,
            groups,
            blocks,
            unshuffle,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let mut tags = vec![
            format!("{features}nf"),
            format!("{groups}nrg"),
            format!("{blocks}nrb"),
        ];
        if unshuffle > 1 {
            tags.push("unshuffle".into());
        }
        tags
    }
}
