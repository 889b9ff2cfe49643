//! Which super-resolution network a weight file holds, read from its tensor names and
//! shapes as spandrel reads them: RRDBNet (ESRGAN, Real-ESRGAN x4/x2, BSRGAN; the old
//! `model.N` layout, BasicSR's and BSRGAN's), SRVGGNetCompact, SPAN and RealPLKSR. Every stored
//! name is mapped to one canonical (BasicSR's, or the network's own) name; a name that
//! fits no layout is refused.

use std::collections::HashMap;
use std::path::Path;

use crate::engine::error::{EngineError, Result};
use crate::engine::weights::{numbered_children, Shapes};

/// An upscaler's architecture and its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// RRDBNet: residual-in-residual dense blocks, nearest ×2 upsampling rounds.
    Rrdb {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_feat`).
        features: i64,
        /// RRDB blocks (`num_block`).
        blocks: i64,
        /// Dense-block growth (`num_grow_ch`).
        growth: i64,
        /// Nearest ×2 upsampling rounds.
        upsamplings: i64,
        /// Pixel-unshuffle factor of the input (Real-ESRGAN x2: 2), or 1.
        unshuffle: i64,
    },
    /// SRVGGNetCompact: PReLU convolutions, then a pixel shuffle plus the nearest-upsampled
    /// input.
    Compact {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`num_feat`).
        features: i64,
        /// Body convolutions after the first (`num_conv`).
        convs: i64,
        /// The pixel-shuffle factor.
        scale: i64,
    },
    /// SPAN: six parameter-free attention blocks of folded 3×3 convolutions, a pixel
    /// shuffle.
    Span {
        /// Image channels in and out.
        channels: i64,
        /// Feature width (`feature_channels`).
        features: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// Whether the input is normalised (mean subtracted, times 255); a file with a
        /// `no_norm` tensor is not.
        normalised: bool,
    },
    /// RealPLKSR: partial large kernel blocks, a pixel shuffle plus the repeated input.
    RealPlksr {
        /// Image channels in and out (3).
        channels: i64,
        /// Feature width (`dim`).
        features: i64,
        /// PLK blocks (`n_blocks`).
        blocks: i64,
        /// The large kernel's side.
        kernel: i64,
        /// The channels the large kernel convolves (`dim * split_ratio`).
        split: i64,
        /// The pixel-shuffle factor.
        scale: i64,
        /// Whether the blocks have element-wise attention (`use_ea`).
        attention: bool,
        /// Whether the blocks start with a channel layer norm instead of ending with a
        /// group norm.
        layer_norm: bool,
    },
}

impl Architecture {
    /// Floats alive at the network's peak per input pixel (a rough bound for choosing
    /// tiles): the images in and out, and the widest stage, the body at the input's
    /// resolution (RRDBNet's dense block holds its input and four growths) or the
    /// upsampled features at the output's.
    pub fn peak_floats_per_pixel(&self) -> u64 {
        let out = (self.scale() * self.scale()) as u64;
        let (body, upsampled) = match *self {
            Architecture::Rrdb {
                features,
                growth,
                unshuffle,
                ..
            } => {
                let dense = (4 * features + 4 * growth) as u64;
                (
                    dense.div_ceil((unshuffle * unshuffle) as u64),
                    3 * features as u64 * out,
                )
            }
            Architecture::Compact { features, .. } => (2 * features as u64, 9 * out),
            // The block outputs kept for the concatenation and the concatenation itself.
            Architecture::Span { features, .. } => (10 * features as u64, 6 * out),
            // The block's input, the mixer's doubled width and the attention's product.
            Architecture::RealPlksr { features, .. } => (6 * features as u64, 6 * out),
        };
        3 + 3 * out + body.max(upsampled)
    }

    /// The factor the network enlarges by.
    pub fn scale(&self) -> i64 {
        match *self {
            Architecture::Rrdb {
                upsamplings,
                unshuffle,
                ..
            } => (1 << upsamplings) / unshuffle,
            Architecture::Compact { scale, .. }
            | Architecture::Span { scale, .. }
            | Architecture::RealPlksr { scale, .. } => scale,
        }
    }

    /// Image channels in and out.
    pub fn channels(&self) -> i64 {
        match *self {
            Architecture::Rrdb { channels, .. }
            | Architecture::Compact { channels, .. }
            | Architecture::Span { channels, .. }
            | Architecture::RealPlksr { channels, .. } => channels,
        }
    }

    /// The architecture's name as users know it.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Rrdb { .. } => "ESRGAN",
            Architecture::Compact { .. } => "RealESRGAN Compact",
            Architecture::Span { .. } => "SPAN",
            Architecture::RealPlksr { .. } => "PLKSR",
        }
    }

    /// spandrel's tags: feature width, blocks or convolutions, `unshuffle`.
    pub fn tags(&self) -> Vec<String> {
        match *self {
            Architecture::Rrdb {
                features,
                blocks,
                unshuffle,
                ..
            } => {
                let mut tags = vec![format!("{features}nf"), format!("{blocks}nb")];
                if unshuffle > 1 {
                    tags.push("unshuffle".into());
                }
                tags
            }
            Architecture::Compact {
                features, convs, ..
            } => vec![format!("{features}nf"), format!("{convs}nc")],
            Architecture::Span { features, .. } => vec![format!("{features}nf")],
            Architecture::RealPlksr {
                features,
                blocks,
                kernel,
                layer_norm,
                ..
            } => {
                let mut tags = vec![
                    format!("{features}dim"),
                    format!("{blocks}nb"),
                    format!("{kernel}ks"),
                    "Real".to_string(),
                ];
                if layer_norm {
                    tags.push("LayerNorm".into());
                }
                tags
            }
        }
    }
}

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
    if SPAN_KEYS.iter().all(|key| has(key)) {
        return span(&unwrapped).ok_or_else(|| unknown(SPAN_KEYS[0]));
    }
    if PLKSR_KEYS.iter().all(|key| has(key)) {
        // DySample's learned upsampling is not served.
        if has(DYSAMPLE_KEY) {
            return Err(unknown(DYSAMPLE_KEY));
        }
        return real_plksr(&unwrapped).ok_or_else(|| unknown(PLKSR_KEYS[0]));
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

/// The shape of the unwrapped tensor `name`.
fn shape_of<'a>(unwrapped: &[(&str, &str, &'a [i64])], name: &str) -> Option<&'a [i64]> {
    unwrapped
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(_, _, s)| *s)
}

/// Every stored name mapped to its unwrapped one: a layout in the network's own names.
fn own_names(unwrapped: &[(&str, &str, &[i64])]) -> HashMap<String, String> {
    unwrapped
        .iter()
        .map(|(stored, name, _)| (stored.to_string(), name.to_string()))
        .collect()
}

/// The tensors spandrel detects SPAN by.
const SPAN_KEYS: [&str; 8] = [
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
fn span(unwrapped: &[(&str, &str, &[i64])]) -> Option<Layout> {
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

/// The tensors spandrel detects RealPLKSR by (PLKSR's original layout misspells
/// `channe_mixer` and is not served).
const PLKSR_KEYS: [&str; 4] = [
    "feats.0.weight",
    "feats.1.lk.conv.weight",
    "feats.1.refine.weight",
    "feats.1.channel_mixer.0.weight",
];

/// RealPLKSR's DySample output layer.
const DYSAMPLE_KEY: &str = "to_img.init_pos";

/// A RealPLKSR file, its hyperparameters read as spandrel reads them.
fn real_plksr(unwrapped: &[(&str, &str, &[i64])]) -> Option<Layout> {
    let shape = |name: &str| shape_of(unwrapped, name);
    let has = |name: &str| shape(name).is_some();
    let first = shape("feats.0.weight")?;
    let (features, channels) = (*first.first()?, *first.get(1)?);
    let layers = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "feats.");
    let blocks = layers - 3;
    let shuffled = *shape(&format!("feats.{}.weight", layers - 1))?.first()?;
    let scale = ((shuffled / 3) as f64).sqrt().round() as i64;
    let large_kernel = shape("feats.1.lk.conv.weight")?;
    let fits = channels == 3 && blocks >= 1 && scale >= 1 && shuffled == 3 * scale * scale;
    fits.then_some(Layout {
        architecture: Architecture::RealPlksr {
            channels,
            features,
            blocks,
            kernel: *large_kernel.get(2)?,
            split: *large_kernel.first()?,
            scale,
            attention: has("feats.1.attn.f.0.weight"),
            layer_norm: has("feats.1.layer_norm.bias"),
        },
        names: own_names(unwrapped),
    })
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
/// (stored name, unwrapped name, shape); all of them when neither wraps any.
fn unwrap(shapes: &Shapes) -> Vec<(&str, &str, &[i64])> {
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

/// BasicSR names for RRDBNet tensors in any of the three layouts (`None`: no fit).
fn rrdb_names(unwrapped: &[(&str, &str, &[i64])]) -> Vec<Option<String>> {
    // The old layout numbers the top-level modules: 0 conv_first, 1 the trunk, then
    // upsampling convolutions, conv_hr and conv_last in order.
    let mut top: Vec<i64> = unwrapped
        .iter()
        .filter_map(|(_, n, _)| {
            n.strip_prefix("model.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .filter(|i| *i >= 2)
        .collect();
    top.sort_unstable();
    let top_name = |index: i64| -> Option<String> {
        let position = top.iter().position(|i| *i == index)?;
        let count = top.len();
        Some(match count - position {
            1 => "conv_last".to_string(),
            2 => "conv_hr".to_string(),
            _ => format!("conv_up{}", position + 1),
        })
    };
    let trunk_blocks = numbered_children(unwrapped.iter().map(|(_, n, _)| *n), "model.1.sub.");
    unwrapped
        .iter()
        .map(|(_, name, _)| {
            let (stem, param) = name.rsplit_once('.')?;
            if param != "weight" && param != "bias" {
                return None;
            }
            let stem = rrdb_stem(stem, &top_name, trunk_blocks)?;
            Some(format!("{stem}.{param}"))
        })
        .collect()
}

/// The BasicSR module name of one module name of any RRDBNet layout.
fn rrdb_stem(stem: &str, top_name: &dyn Fn(i64) -> Option<String>, trunk: i64) -> Option<String> {
    const SAME: [&str; 4] = ["conv_first", "conv_body", "conv_hr", "conv_last"];
    if SAME.contains(&stem) {
        return Some(stem.to_string());
    }
    let renamed = match stem {
        "model.0" => Some("conv_first"),
        "trunk_conv" => Some("conv_body"),
        "HRconv" => Some("conv_hr"),
        _ => None,
    };
    if let Some(name) = renamed {
        return Some(name.to_string());
    }
    for prefix in ["upconv", "conv_up"] {
        if let Some(n) = stem
            .strip_prefix(prefix)
            .filter(|n| n.parse::<u32>().is_ok())
        {
            return Some(format!("conv_up{n}"));
        }
    }
    if let Some(dense) = dense_conv(stem) {
        return Some(dense);
    }
    if let Some(index) = stem
        .strip_prefix("model.1.sub.")
        .and_then(|i| i.parse::<i64>().ok())
    {
        return (index == trunk - 1).then(|| "conv_body".to_string());
    }
    top_name(stem.strip_prefix("model.")?.parse().ok()?)
}

/// `body.B.rdbR.convC` from any layout's name of a dense-block convolution.
fn dense_conv(stem: &str) -> Option<String> {
    let parts: Vec<&str> = stem.split('.').collect();
    let (block, rdb, conv) = match parts.as_slice() {
        ["body", b, r, c] => (*b, r.strip_prefix("rdb")?, *c),
        ["RRDB_trunk", b, r, c] => (*b, r.strip_prefix("RDB")?, *c),
        ["model", "1", "sub", b, r, c, "0"] => (*b, r.strip_prefix("RDB")?, *c),
        _ => return None,
    };
    let conv = conv.strip_prefix("conv")?;
    let numbers = [block, rdb, conv];
    numbers
        .iter()
        .all(|n| n.parse::<u32>().is_ok())
        .then(|| format!("body.{block}.rdb{rdb}.conv{conv}"))
}

type ShapeOf<'a> = dyn Fn(&str) -> Option<&'a [i64]> + 'a;

fn rrdb(names: &HashMap<String, String>, shape: &ShapeOf) -> Option<Architecture> {
    let first = shape("conv_first.weight")?;
    let last = shape("conv_last.weight")?;
    let (features, in_channels, channels) = (first[0], first[1], last[0]);
    let blocks = numbered_children(names.values().map(String::as_str), "body.");
    let growth = shape("body.0.rdb1.conv1.weight")?[0];
    let upsamplings = count_ups(names);
    if (1..=upsamplings).any(|n| shape(&format!("conv_up{n}.weight")).is_none()) {
        return None;
    }
    // Real-ESRGAN x2 (and x1) feed a pixel-unshuffled image: 4 or 16 times the channels.
    let unshuffle = match in_channels / channels.max(1) {
        4 if in_channels == channels * 4 => 2,
        16 if in_channels == channels * 16 => 4,
        _ if in_channels == channels => 1,
        _ => return None,
    };
    let enlarges = (1i64 << upsamplings.min(4)) % unshuffle == 0;
    (enlarges && blocks > 0 && upsamplings <= 4).then_some(Architecture::Rrdb {
        channels,
        features,
        blocks,
        growth,
        upsamplings,
        unshuffle,
    })
}

/// How many `conv_upN` modules there are (they must be numbered 1..=N).
fn count_ups(names: &HashMap<String, String>) -> i64 {
    names
        .values()
        .filter(|n| n.starts_with("conv_up") && n.ends_with(".weight"))
        .count() as i64
}

fn compact(names: &HashMap<String, String>, shape: &ShapeOf) -> Option<Architecture> {
    let highest = numbered_children(names.values().map(String::as_str), "body.") - 1;
    let first = shape("body.0.weight")?;
    let (features, in_channels) = (first[0], first[1]);
    let shuffled = shape(&format!("body.{highest}.bias"))?[0];
    let (scale, channels) = shuffle_factor(shuffled, in_channels)?;
    (channels == in_channels && highest >= 2 && highest % 2 == 0).then_some(Architecture::Compact {
        channels,
        features,
        convs: (highest - 2) / 2,
        scale,
    })
}
