//! RRDBNet's names in any of its three layouts (the old `model.N` one, BasicSR's and
//! BSRGAN's) mapped to BasicSR's, and the hyperparameters of RRDBNet and SRVGGNetCompact
//! read from them.

use std::collections::HashMap;

use super::{shuffle_factor, Architecture, Unwrapped};
use crate::engine::weights::numbered_children;

/// BasicSR names for RRDBNet tensors in any of the three layouts (`None`: no fit).
pub(super) fn rrdb_names(unwrapped: &Unwrapped) -> Vec<Option<String>> {
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

pub(super) type ShapeOf<'a> = dyn Fn(&str) -> Option<&'a [i64]> + 'a;

pub(super) fn rrdb(names: &HashMap<String, String>, shape: &ShapeOf) -> Option<Architecture> {
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

pub(super) fn compact(names: &HashMap<String, String>, shape: &ShapeOf) -> Option<Architecture> {
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
