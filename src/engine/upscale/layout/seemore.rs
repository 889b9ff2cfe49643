//! SeemoRe's hyperparameters read from its tensors as spandrel reads them
//! (`SeemoRe/__init__.py`): the width and channels from the first convolution, the
//! groups and experts from their sequences' lengths, the experts' growth from the second
//! or third expert's width, the striped kernel from the first global block, the scale
//! from the upsampler; the shuffle and the calibration's depth (which the file does not
//! tell) as spandrel sets them from the width and depth.

use super::{dimension_of, exact_root, own_names, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects SeemoRe by.
pub(super) const KEYS: [&str; 28] = [
    FIRST_KEY,
    "conv_1.bias",
    "norm.weight",
    "norm.bias",
    "conv_2.weight",
    "conv_2.bias",
    UPSAMPLER_KEY,
    "upsampler.0.bias",
    "body.0.local_block.norm_1.weight",
    "body.0.local_block.norm_1.bias",
    "body.0.local_block.block.conv_1.0.weight",
    "body.0.local_block.block.conv_1.2.weight",
    "body.0.local_block.block.agg_conv.0.weight",
    "body.0.local_block.block.conv.0.weight",
    "body.0.local_block.block.conv.1.weight",
    "body.0.local_block.block.conv_2.0.conv.0.weight",
    "body.0.local_block.block.conv_2.0.conv.1.weight",
    "body.0.local_block.block.moe_layer.experts.0.conv_1.weight",
    "body.0.local_block.block.moe_layer.experts.0.conv_2.weight",
    "body.0.local_block.block.moe_layer.experts.0.conv_3.weight",
    "body.0.local_block.block.proj.weight",
    "body.0.local_block.norm_2.weight",
    "body.0.local_block.ffn.gate.weight",
    "body.0.global_block.norm_1.weight",
    "body.0.global_block.block.proj.weight",
    KERNEL_KEY,
    "body.0.global_block.ffn.fn_2.0.weight",
    "body.0.global_block.ffn.gate.weight",
];

const FIRST_KEY: &str = "conv_1.weight";
const UPSAMPLER_KEY: &str = "upsampler.0.weight";
const KERNEL_KEY: &str = "body.0.global_block.block.attn.conv.0.weight";
const EXPERTS: &str = "body.0.local_block.block.moe_layer.experts.";

/// How the experts' low-rank widths grow with their index (`lr_space`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertGrowth {
    /// 2, 3, 4, ...
    Linear,
    /// 2, 4, 6, ...
    Double,
    /// 2, 4, 8, ...
    Exponential,
}

impl ExpertGrowth {
    /// The low-rank width of expert `i`.
    pub fn width(self, i: i64) -> i64 {
        match self {
            ExpertGrowth::Linear => i + 2,
            ExpertGrowth::Double => 2 * i + 2,
            ExpertGrowth::Exponential => 1 << (i + 1),
        }
    }
}

/// A SeemoRe file (its own names); `Err` names the tensor that does not fit: a first
/// convolution over other than three colours (the reference shifts three channel means),
/// an upsampler of no square scale, an expert of a width spandrel's growth rules do not
/// know, a striped kernel of even side (its output would outgrow the input).
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let dimension = |name: &'static str, d: usize| dimension_of(unwrapped, name, d);
    let (features, channels) = (dimension(FIRST_KEY, 0)?, dimension(FIRST_KEY, 1)?);
    if channels != 3 || features < 1 {
        return Err(FIRST_KEY);
    }
    let shuffled = dimension(UPSAMPLER_KEY, 0)?;
    let scale = exact_root(shuffled / channels).unwrap_or(0);
    if scale < 1 || shuffled != channels * scale * scale {
        return Err(UPSAMPLER_KEY);
    }
    let kernel = dimension(KERNEL_KEY, 3)?;
    if kernel % 2 == 0 {
        return Err(KERNEL_KEY);
    }
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let layers = numbered_children(names(), "body.");
    // The file does not tell these: spandrel's settings for its named sizes ("Large"
    // without the shuffle and with one calibration round), its defaults otherwise.
    let large = layers == 16 && features == 48;
    Ok(Layout {
        architecture: Architecture::SeemoRe {
            channels,
            features,
            layers,
            experts: numbered_children(names(), EXPERTS),
            growth: expert_growth(unwrapped)?,
            kernel,
            scale,
            shuffle: !large,
            calibration_rounds: if large { 1 } else { 2 },
        },
        names: own_names(unwrapped),
    })
}

/// spandrel's `_get_lr_space`: the third expert's width (4, 6 or 8), else the second's
/// (3 or 4), else linear; any other width is refused naming that expert.
fn expert_growth(unwrapped: &Unwrapped) -> Result<ExpertGrowth, &'static str> {
    const THIRD: &str = "body.0.local_block.block.moe_layer.experts.2.conv_1.weight";
    const SECOND: &str = "body.0.local_block.block.moe_layer.experts.1.conv_1.weight";
    if let Ok(width) = dimension_of(unwrapped, THIRD, 0) {
        return match width {
            4 => Ok(ExpertGrowth::Linear),
            6 => Ok(ExpertGrowth::Double),
            8 => Ok(ExpertGrowth::Exponential),
            _ => Err(THIRD),
        };
    }
    match dimension_of(unwrapped, SECOND, 0) {
        Ok(3) | Err(_) => Ok(ExpertGrowth::Linear),
        Ok(4) => Ok(ExpertGrowth::Double),
        Ok(_) => Err(SECOND),
    }
}

impl Architecture {
    /// spandrel's SeemoRe tags: "Tiny", "Big" or "Large" for its named sizes, the width,
    /// the experts, the groups.
    pub(super) fn seemore_tags(&self) -> Vec<String> {
        let Architecture::SeemoRe {
            features,
            layers,
            experts,
            ..
        } = *self
        else {
            return Vec::new();
        };
        let size = match (layers, features) {
            (6, 36) => Some("Tiny"),
            (8, 48) => Some("Big"),
            (16, 48) => Some("Large"),
            _ => None,
        };
        let mut tags: Vec<String> = size.into_iter().map(str::to_string).collect();
        tags.extend([
            format!("{features}dim"),
            format!("{experts}ne"),
            format!("{layers}nl"),
        ]);
        tags
    }
}
