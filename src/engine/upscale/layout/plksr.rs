//! PLKSR's and RealPLKSR's hyperparameters read from their tensors as spandrel reads
//! them (`PLKSR/__init__.py`).

use super::{exact_root, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects RealPLKSR by.
pub(super) const KEYS: [&str; 4] = [
    "feats.0.weight",
    "feats.1.lk.conv.weight",
    "feats.1.refine.weight",
    "feats.1.channel_mixer.0.weight",
];

/// Both networks' element-wise attention, where the blocks have it.
const ATTENTION_KEY: &str = "feats.1.attn.f.0.weight";

/// RealPLKSR's DySample output layer.
const DYSAMPLE_KEY: &str = "to_img.init_pos";

/// The groups RealPLKSR's DySample samples in: one per colour at odd scales, else four.
pub fn dysample_groups(scale: i64) -> i64 {
    if scale % 2 != 0 {
        3
    } else {
        4
    }
}

/// A RealPLKSR file, its hyperparameters read as spandrel reads them; `Err` names the
/// tensor that does not fit (a large kernel of even side or over more channels than the
/// block has included).
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let has = |name: &str| shape(name).is_some();
    // The first convolution, the blocks, a norm and the last convolution.
    let Trunk {
        channels,
        features,
        blocks,
        scale,
    } = trunk(unwrapped, 3)?;
    let large_kernel = shape(KEYS[1]).ok_or(KEYS[1])?;
    let kernel = dimension(large_kernel, 2);
    let split = dimension(large_kernel, 0);
    if kernel < 1 || kernel % 2 == 0 || !within(split, features) {
        return Err(KEYS[1]);
    }
    Ok(Layout {
        architecture: Architecture::RealPlksr {
            channels,
            features,
            blocks,
            kernel,
            split,
            scale,
            attention: has(ATTENTION_KEY),
            layer_norm: has("feats.1.layer_norm.bias"),
            dysample: has(DYSAMPLE_KEY),
        },
        names: own_names(unwrapped),
    })
}

/// What the `feats` sequence's first and last convolutions and its length tell.
struct Trunk {
    channels: i64,
    features: i64,
    blocks: i64,
    scale: i64,
}

/// The trunk of a `feats` sequence with `extra` layers beside the blocks: RGB in, a
/// pixel shuffle's worth of RGB out; `Err` names its first tensor where it does not fit.
fn trunk(unwrapped: &Unwrapped, extra: i64) -> Result<Trunk, &'static str> {
    const FIRST: &str = "feats.0.weight";
    let first = shape_of(unwrapped, FIRST).ok_or(FIRST)?;
    let layers = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "feats.");
    let last = format!("feats.{}.weight", layers - 1);
    let shuffled = shape_of(unwrapped, &last).map_or(0, |s| dimension(s, 0));
    let scale = exact_root(shuffled / 3).unwrap_or(0);
    let trunk = Trunk {
        channels: dimension(first, 1),
        features: dimension(first, 0),
        blocks: layers - extra,
        scale,
    };
    let fits = trunk.channels == 3 && trunk.blocks >= 1 && scale >= 1;
    match fits && shuffled == 3 * scale * scale {
        true => Ok(trunk),
        false => Err(FIRST),
    }
}

/// Whether a large kernel over `split` channels fits a block `features` wide.
fn within(split: i64, features: i64) -> bool {
    (1..=features).contains(&split)
}

/// Dimension `d` of a stored shape (0 where it has none).
fn dimension(shape: &[i64], d: usize) -> i64 {
    shape.get(d).copied().unwrap_or(0)
}

/// The tensors spandrel detects PLKSR's original layout by (it misspells
/// `channe_mixer`); one of the large-kernel layers' tensors is read beside them.
pub(super) const ORIGINAL_KEYS: [&str; 3] =
    ["feats.0.weight", "feats.1.refine.weight", MIXER_KEYS[0]];

/// The first block's channel mixer convolutions, whose kernels tell its type.
const MIXER_KEYS: [&str; 2] = [
    "feats.1.channe_mixer.0.weight",
    "feats.1.channe_mixer.2.weight",
];

/// Each large-kernel layer's first tensor in the first block.
const PLAIN_KEY: &str = "feats.1.lk.conv.weight";
const SPARSE_KEY: &str = "feats.1.lk.convs.0.weight";
const RECTANGULAR_KEY: &str = "feats.1.lk.mn_conv.weight";

/// The kernel side spandrel gives a sparse large-kernel layer (it cannot be read from
/// the file; only the tag shows it).
const SPARSE_KERNEL_TAG: i64 = 17;

/// PLKSR's channel mixer (`ccm_type`), told by its two convolutions' kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelMixer {
    /// 3×3 then 1×1.
    Ccm,
    /// 1×1 then 3×3 (inverted).
    Iccm,
    /// 3×3 then 3×3 (doubled).
    Dccm,
}

impl ChannelMixer {
    /// The two convolutions' kernel sides.
    pub fn kernels(self) -> [i64; 2] {
        match self {
            ChannelMixer::Ccm => [3, 1],
            ChannelMixer::Iccm => [1, 3],
            ChannelMixer::Dccm => [3, 3],
        }
    }

    /// The name spandrel tags it with.
    pub fn name(self) -> &'static str {
        match self {
            ChannelMixer::Ccm => "CCM",
            ChannelMixer::Iccm => "ICCM",
            ChannelMixer::Dccm => "DCCM",
        }
    }
}

/// PLKSR's large-kernel layer over the first channels (`lk_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeKernel {
    /// One square convolution (`PLK`).
    Plain,
    /// Four 5×5 convolutions dilated 1 to 4, summed (`SparsePLK`, spandrel's defaults).
    Sparse,
    /// A k×k/3, a k/3×k and a k/3×k/3 convolution, summed (`RectSparsePLK`).
    Rectangular,
}

/// A PLKSR file in its original layout, its hyperparameters read as spandrel reads
/// them; `Err` names the tensor that does not fit (a large kernel of even side, whose
/// output the reference cannot write back, or over more channels than the block has,
/// included).
pub(super) fn detect_original(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let kernel_of = |name: &str| shape(name).and_then(|s| s.get(2).copied());
    // The first convolution, the blocks and the last convolution.
    let Trunk {
        channels,
        features,
        blocks,
        scale,
    } = trunk(unwrapped, 2)?;
    let mixer = match (kernel_of(MIXER_KEYS[0]), kernel_of(MIXER_KEYS[1])) {
        (Some(3), Some(1)) => ChannelMixer::Ccm,
        (Some(1), Some(3)) => ChannelMixer::Iccm,
        (Some(3), Some(3)) => ChannelMixer::Dccm,
        (Some(1 | 3), _) => return Err(MIXER_KEYS[1]),
        _ => return Err(MIXER_KEYS[0]),
    };
    let odd = |side: i64| side > 0 && side % 2 == 1;
    let (large_kernel, kernel, key) = if let Some(s) = shape(PLAIN_KEY) {
        (LargeKernel::Plain, dimension(s, 2), PLAIN_KEY)
    } else if shape(SPARSE_KEY).is_some() {
        (LargeKernel::Sparse, SPARSE_KERNEL_TAG, SPARSE_KEY)
    } else if let Some(s) = shape(RECTANGULAR_KEY) {
        (LargeKernel::Rectangular, dimension(s, 2), RECTANGULAR_KEY)
    } else {
        return Err(PLAIN_KEY);
    };
    let split = shape(key).map_or(0, |s| dimension(s, 0));
    let short_side_odd = large_kernel != LargeKernel::Rectangular || odd(kernel / 3);
    if !odd(kernel) || !short_side_odd || !within(split, features) {
        return Err(key);
    }
    Ok(Layout {
        architecture: Architecture::Plksr {
            channels,
            features,
            blocks,
            kernel,
            split,
            scale,
            attention: shape(ATTENTION_KEY).is_some(),
            mixer,
            large_kernel,
        },
        names: own_names(unwrapped),
    })
}
