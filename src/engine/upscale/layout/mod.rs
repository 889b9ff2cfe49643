//! Which super-resolution network a weight file holds, read from its tensor names and
//! shapes as spandrel reads them: RRDBNet (ESRGAN, Real-ESRGAN x4/x2, BSRGAN; the old
//! `model.N` layout, BasicSR's and BSRGAN's), SRVGGNetCompact, SPAN, PLKSR, RealPLKSR,
//! SAFMN, SAFMN-BCIE, MoSR, MoESR, SwinIR, Swin2SR, HAT, ATD, DCTLSA, AuraSR, CRAFT, MMRealSR, DAT, DRCT, SCUNet, Real-CUGAN,
//! RCAN, OmniSR, RGT, FDAT, DITN, Swift-SRGAN, SeemoRe, DnCNN, DRUNet, FBCNN and NAFNet.
//! Every stored name is mapped to one canonical (BasicSR's, or the network's own) name; a name
//! that fits no layout is refused.

use std::collections::HashMap;
use std::path::Path;

use crate::engine::error::{EngineError, Result};
use crate::engine::weights::Shapes;

mod activations;
mod architecture;
pub mod atd;
pub mod aura_sr;
mod basicsr;
pub mod craft;
mod dat;
pub mod dctlsa;
mod descriptor;
pub mod ditn;
pub mod drct;
pub mod fdat;
mod hat;
pub mod kair;
pub mod mmrealsr;
pub mod moesr;
pub mod mosr;
mod nafnet;
mod omnisr;
mod plksr;
mod rcan;
pub mod realcugan;
pub mod rgt;
pub mod safmn;
mod safmn_bcie;
pub mod scunet;
mod seemore;
mod span;
pub mod swiftsrgan;
mod swin2sr;
mod swinir;
pub mod uni_upsample;

pub use architecture::Architecture;
pub use aura_sr::AuraShape;
use basicsr::{compact, rrdb, rrdb_names};
pub use descriptor::SizeRequirements;
pub use kair::{KairDownsample, KairUnet, KairUpsample, FBCNN_QF_WIDTH};
pub use mosr::MoSrUpsampler;
pub use plksr::{dysample_groups, ChannelMixer, LargeKernel};
pub use seemore::ExpertGrowth;
pub use swinir::SwinUpsampler;
pub use uni_upsample::UniUpsampler;

/// The architecture of the upscaler file at `path` (its header only).
pub fn read(path: &Path) -> Result<Architecture> {
    let (shapes, _) = crate::engine::weights::read_shapes(path)?;
    Ok(detect(path, &shapes)?.architecture)
}

/// A weight file's architecture and the canonical name of each stored tensor it uses.
#[derive(Debug)]
pub struct Layout {
    pub architecture: Architecture,
    pub names: HashMap<String, String>,
}

/// The layout of `shapes` (read from `path`, named in errors).
pub fn detect(path: &Path, shapes: &Shapes) -> Result<Layout> {
    let unwrapped = unwrap(shapes);
    let has = |name: &str| unwrapped.iter().any(|(_, n, _)| *n == name);
    let unknown = |name: &str| EngineError::UnknownTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
    };
    if ditn::KEYS.iter().all(|key| has(key)) {
        return ditn::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    let fdat_first = has("conv_first.weight") || has("conv_first.1.weight");
    if fdat_first && fdat::KEYS.iter().all(|key| has(key)) {
        return fdat::detect(path, &unwrapped);
    }
    if span::KEYS.iter().all(|key| has(key)) {
        return span::detect(&unwrapped).ok_or_else(|| unknown(span::KEYS[0]));
    }
    if atd::KEYS.iter().all(|key| has(key)) {
        if has(atd::ABSOLUTE_KEY) {
            return Err(unknown(atd::ABSOLUTE_KEY));
        }
        return atd::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    if aura_sr::KEYS.iter().all(|key| has(key)) {
        return aura_sr::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    if dctlsa::KEYS.iter().all(|key| has(key)) {
        return dctlsa::detect(&unwrapped).map_err(unknown);
    }
    if craft::KEYS.iter().all(|key| has(key)) {
        return craft::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    if mmrealsr::KEYS.iter().all(|key| has(key)) {
        return mmrealsr::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    if hat::KEYS.iter().all(|key| has(key)) {
        if has(hat::ABSOLUTE_KEY) {
            return Err(unknown(hat::ABSOLUTE_KEY));
        }
        return hat::detect(&unwrapped).ok_or_else(|| unknown(hat::KEYS[0]));
    }
    if scunet::KEYS.iter().all(|key| has(key)) {
        return scunet::detect(&unwrapped).ok_or_else(|| unknown(scunet::KEYS[0]));
    }
    if dat::KEYS.iter().all(|key| has(key)) {
        return dat::detect(path, &unwrapped)?.ok_or_else(|| unknown(dat::KEYS[0]));
    }
    let rgt_residual = rgt::RESIDUAL_KEYS.iter().any(|key| has(key));
    if rgt_residual && rgt::KEYS.iter().all(|key| has(key)) {
        return rgt::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    if drct::KEYS.iter().all(|key| has(key)) {
        return drct::detect(path, &unwrapped);
    }
    // Before SwinIR's: Swin2SR has SwinIR's keys too.
    if swin2sr::KEYS.iter().all(|key| has(key)) {
        return swin2sr::detect(path, &unwrapped);
    }
    let swin_first = has("conv_first.weight") || has(swinir::UNSHUFFLE_KEY);
    if swin_first && swinir::KEYS.iter().all(|key| has(key)) {
        if has(swinir::UNSHUFFLE_KEY) {
            return Err(unknown(swinir::UNSHUFFLE_KEY));
        }
        return swinir::detect(&unwrapped).ok_or_else(|| unknown(swinir::KEYS[0]));
    }
    if realcugan::KEYS.iter().all(|key| has(key)) {
        return realcugan::detect(&unwrapped).map_err(unknown);
    }
    if omnisr::KEYS.iter().all(|key| has(key)) {
        return omnisr::detect(&unwrapped).map_err(unknown);
    }
    let rcan_head = rcan::HEAD_KEYS.iter().any(|key| has(key));
    if rcan_head && rcan::KEYS.iter().all(|key| has(key)) {
        return rcan::detect(&unwrapped).map_err(unknown);
    }
    if plksr::KEYS.iter().all(|key| has(key)) {
        return plksr::detect(&unwrapped).map_err(unknown);
    }
    if mosr::KEYS.iter().all(|key| has(key)) {
        return mosr::detect(&unwrapped).map_err(unknown);
    }
    if safmn::KEYS.iter().all(|key| has(key)) {
        return safmn::detect(&unwrapped).map_err(unknown);
    }
    if safmn_bcie::KEYS.iter().all(|key| has(key)) {
        return safmn_bcie::detect(&unwrapped).map_err(unknown);
    }
    if moesr::KEYS.iter().all(|key| has(key)) {
        return moesr::detect(path, &unwrapped);
    }
    if seemore::KEYS.iter().all(|key| has(key)) {
        return seemore::detect(&unwrapped).map_err(unknown);
    }
    if swiftsrgan::KEYS.iter().all(|key| has(key)) {
        return swiftsrgan::detect(&unwrapped).map_err(unknown);
    }
    if kair::DRUNET_KEYS.iter().all(|key| has(key)) {
        return kair::detect_drunet(&unwrapped).map_err(|name| unknown(&name));
    }
    if kair::FBCNN_KEYS.iter().all(|key| has(key)) {
        return kair::detect_fbcnn(&unwrapped).map_err(|name| unknown(&name));
    }
    if nafnet::KEYS.iter().all(|key| has(key)) {
        return nafnet::detect(&unwrapped).map_err(|name| unknown(&name));
    }
    let dncnn_body = [kair::DNCNN_PLAIN_KEYS, kair::DNCNN_NORMED_KEYS]
        .iter()
        .any(|keys| keys.iter().all(|key| has(key)));
    if dncnn_body && kair::DNCNN_KEYS.iter().all(|key| has(key)) {
        return kair::detect_dncnn(&unwrapped).map_err(|name| unknown(&name));
    }
    if plksr::ORIGINAL_KEYS.iter().all(|key| has(key)) {
        return plksr::detect_original(&unwrapped).map_err(unknown);
    }
    let names: HashMap<String, String> = if has("body.0.weight") && has("body.1.weight") {
        own_names(&unwrapped)
    } else {
        let canonical = rrdb_names(&unwrapped);
        let mut names = HashMap::new();
        for ((stored, _, _), name) in unwrapped.iter().zip(canonical) {
            names.insert(stored.to_string(), name.ok_or_else(|| unknown(stored))?);
        }
        names
    };
    let shape = |name: &str| {
        names
            .iter()
            .find(|(_, n)| *n == name)
            .and_then(|(stored, _)| shapes.iter().find(|(s, _)| s == stored))
            .map(|(_, shape)| shape.as_slice())
    };
    let architecture = if has("body.0.weight") && has("body.1.weight") {
        compact(&names, &shape)
    } else {
        rrdb(&names, &shape)
    };
    let architecture = architecture.ok_or_else(|| {
        let first = shapes.first().map_or("(no tensors)", |(n, _)| n.as_str());
        unknown(first)
    })?;
    Ok(Layout {
        architecture,
        names,
    })
}

/// A file's tensors as (stored name, unwrapped name, shape).
type Unwrapped<'a> = [(&'a str, &'a str, &'a [i64])];

/// The integer square root of `n` when `n` is a square.
fn exact_root(n: i64) -> Option<i64> {
    let root = (n.max(0) as f64).sqrt().round() as i64;
    (root * root == n).then_some(root)
}

/// Whether spandrel, reading a layer's width `part` of `width` as the float ratio
/// `part / width` and building the layer `int(ratio * width)` wide, gets `part` back (in
/// the same double arithmetic).
fn ratio_gives_back(width: i64, part: i64) -> bool {
    width > 0 && ((part as f64 / width as f64) * width as f64) as i64 == part
}

/// The shape of the unwrapped tensor `name`.
fn shape_of<'a>(unwrapped: &Unwrapped<'a>, name: &str) -> Option<&'a [i64]> {
    unwrapped
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(_, _, s)| *s)
}

/// Dimension `d` of the unwrapped tensor `name`; `Err(name)` where it has none.
fn dimension_of(
    unwrapped: &Unwrapped,
    name: &'static str,
    d: usize,
) -> std::result::Result<i64, &'static str> {
    shape_of(unwrapped, name)
        .and_then(|s| s.get(d).copied())
        .ok_or(name)
}

/// The refusal of the file at `path` naming its tensor `name`.
fn refusal(path: &Path, name: &str) -> EngineError {
    EngineError::UnknownTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
    }
}

/// Dimension `d` of the unwrapped tensor `name` of the file at `path`, or the refusal
/// naming it where it has none.
fn dimension_or_refused(path: &Path, unwrapped: &Unwrapped, name: &str, d: usize) -> Result<i64> {
    shape_of(unwrapped, name)
        .and_then(|s| s.get(d).copied())
        .ok_or_else(|| refusal(path, name))
}

/// Every stored name mapped to its unwrapped one: a layout in the network's own names.
fn own_names(unwrapped: &Unwrapped) -> HashMap<String, String> {
    unwrapped
        .iter()
        .map(|(stored, name, _)| (stored.to_string(), name.to_string()))
        .collect()
}

/// spandrel's `get_scale_and_output_channels`: the output channels are the input's, or
/// 3, 4 or 1, whichever leaves a square factor of `shuffled`.
fn shuffle_factor(shuffled: i64, in_channels: i64) -> Option<(i64, i64)> {
    [in_channels, 3, 4, 1].into_iter().find_map(|c| {
        let square = c > 0 && shuffled % c == 0 && shuffled / c > 0;
        let root = ((shuffled / c.max(1)) as f64).sqrt().round() as i64;
        (square && root * root == shuffled / c).then_some((root, c))
    })
}

/// The tensors under `params_ema.` (preferred) or `params.` with the prefix removed, as
/// (stored name, unwrapped name, shape); all of them when neither wraps any. Then, as
/// spandrel canonicalises a state dict, `module.` (a data-parallel wrapper's) and `netG.`
/// removed in turn where every name starts with it.
fn unwrap(shapes: &Shapes) -> Vec<(&str, &str, &[i64])> {
    let mut tensors = unwrap_params(shapes);
    for prefix in ["module.", "netG."] {
        if !tensors.is_empty() && tensors.iter().all(|(_, n, _)| n.starts_with(prefix)) {
            for (_, name, _) in &mut tensors {
                *name = &name[prefix.len()..];
            }
        }
    }
    tensors
}

/// The tensors under `params_ema.` (preferred) or `params.`, the prefix removed; all of
/// them where neither wraps any.
fn unwrap_params(shapes: &Shapes) -> Vec<(&str, &str, &[i64])> {
    for prefix in ["params_ema.", "params."] {
        let inner: Vec<_> = shapes
            .iter()
            .filter_map(|(n, s)| Some((n.as_str(), n.strip_prefix(prefix)?, s.as_slice())))
            .collect();
        if !inner.is_empty() {
            return inner;
        }
    }
    shapes
        .iter()
        .map(|(n, s)| (n.as_str(), n.as_str(), s.as_slice()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::ratio_gives_back;

    /// Python's `int(61 / 28 * 28)` is 60: a 61-channel layer of a 28-wide network is
    /// built 60 wide by spandrel; widths whose ratio comes back whole are kept.
    #[test]
    fn widths_a_float_ratio_loses_are_told_apart() {
        assert!(!ratio_gives_back(28, 61));
        assert!(!ratio_gives_back(44, 49));
        assert!(ratio_gives_back(28, 60));
        assert!(ratio_gives_back(16, 24));
        assert!(ratio_gives_back(24, 36));
        assert!(!ratio_gives_back(0, 4));
    }
}
