//! AuraSR's hyperparameters read from its tensors as spandrel reads them
//! (`AuraSR/__init__.py`): the width from the last convolution, the style network from
//! its first layer and length, each level's width from its upsampling or downsampling
//! convolution, which up levels attend and how deep from their transformers, the heads'
//! width from the middle transformer (spandrel's eight heads, which no tensor tells), the
//! kernels each modulated convolution chooses from.

use super::{dimension_of, own_names, shape_of, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects AuraSR by.
pub(super) const KEYS: [&str; 3] = [
    OUT_KEY,
    "mid_block2.block1.proj.weights",
    "final_res_block.block1.proj.weights",
];

const OUT_KEY: &str = "mid_attn.layers.0.0.to_out.weight";
const RGB_KEY: &str = "final_to_rgb.weight";
const STYLE_KEY: &str = "style_network.net.0.weight";
const KERNELS_KEY: &str = "mid_block1.block1.proj.weights";
const INIT_KEY: &str = "init_conv.weight";

/// The attention heads (spandrel's `self_attn_heads`, not in the file).
pub const HEADS: i64 = 8;
/// Up levels, each doubling the resolution (fixed in the reference).
pub const LEVELS: usize = 5;
/// Modulated residual blocks per level.
pub const BLOCKS: usize = 6;

/// AuraSR's shape: a GigaGAN upsampler (a U-Net of style-modulated convolutions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuraShape {
    /// Image channels in and out.
    pub channels: i64,
    /// The base width (`dim`); the last level's and the closing block's.
    pub dim: i64,
    /// The style network's input (the noise drawn per call) and output widths.
    pub style_in: i64,
    pub style_out: i64,
    /// The style network's layers.
    pub style_depth: i64,
    /// The up levels' widths over `dim`, from the finest (`up_dim_mults`).
    pub up_mults: [i64; LEVELS],
    /// The down levels (each halving the resolution); the first `downs` of `down_mults`.
    pub downs: usize,
    pub down_mults: [i64; LEVELS],
    /// Whether each level (from the finest) has a transformer, and how many layers.
    pub attention: [bool; LEVELS],
    pub attention_depths: [i64; LEVELS],
    /// The middle transformer's layers.
    pub mid_depth: i64,
    /// Each head's width.
    pub head_width: i64,
    /// The kernels each modulated convolution mixes (`num_conv_kernels`).
    pub kernels: i64,
}

impl AuraShape {
    /// The widths of the up path from its input (`init_dim`, equal to `dim`): `up_dims`.
    pub fn up_widths(&self) -> [i64; LEVELS + 1] {
        let mut widths = [self.dim; LEVELS + 1];
        for (w, m) in widths[1..].iter_mut().zip(self.up_mults) {
            *w = self.dim * m;
        }
        widths
    }

    /// The widths of the down path from its first level: `down_dims`.
    pub fn down_widths(&self) -> Vec<i64> {
        let first = self.up_widths()[LEVELS - self.downs];
        let rest = self.down_mults[..self.downs].iter().map(|m| self.dim * m);
        std::iter::once(first).chain(rest).collect()
    }

    /// The factor the network enlarges by: each up level doubles, each down level halves.
    pub fn scale(&self) -> i64 {
        1 << (LEVELS - self.downs)
    }
}

/// An AuraSR file (its own names); `Err` names the tensor that does not fit: widths the
/// base width does not divide, a first up level narrower or wider than the last block, no
/// down level or more than five, a scale that differs from the style network's ratio
/// (which spandrel reports as the scale), skip connections of other widths than their up
/// levels, heads' widths the eight heads do not divide, fewer than two kernels (the
/// reference mixes kernels only from two on).
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, String> {
    let dimension = |name: &str, d: usize| {
        shape_of(unwrapped, name)
            .and_then(|s| s.get(d).copied())
            .ok_or_else(|| name.to_string())
    };
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let has = |name: &str| unwrapped.iter().any(|(_, n, _)| *n == name);
    let dim = dimension_of(unwrapped, RGB_KEY, 1)?;
    let channels = dimension_of(unwrapped, RGB_KEY, 0)?;
    if dim < 1 || dimension("ups.4.1.0.conv.bias", 0)? != dim {
        return Err("ups.4.1.0.conv.bias".into());
    }
    let times_dim = |name: String, d: usize| -> Result<i64, String> {
        let width = dimension(&name, d)?;
        (width > 0 && width % dim == 0)
            .then_some(width / dim)
            .ok_or(name)
    };
    let mut up_mults = [0; LEVELS];
    for (i, m) in up_mults.iter_mut().enumerate() {
        *m = times_dim(format!("ups.{}.1.0.conv.weight", LEVELS - 1 - i), 1)?;
    }
    let downs = numbered_children(names(), "downs.") as usize;
    if !(1..=LEVELS).contains(&downs) {
        return Err(INIT_KEY.into());
    }
    let mut down_mults = [0; LEVELS];
    for (i, m) in down_mults[..downs].iter_mut().enumerate() {
        *m = times_dim(format!("downs.{i}.1.1.weight"), 0)?;
    }
    let mut attention = [false; LEVELS];
    let mut attention_depths = [2; LEVELS];
    for i in 0..LEVELS {
        let level = format!("ups.{}.1.1.layers.", LEVELS - 1 - i);
        attention[i] = has(&format!("{level}0.0.to_qkv.weight"));
        if attention[i] {
            attention_depths[i] = numbered_children(names(), &level);
        }
    }
    let hidden = dimension_of(unwrapped, OUT_KEY, 1)?;
    let (style_in, style_out) = (
        dimension_of(unwrapped, STYLE_KEY, 1)?,
        dimension_of(unwrapped, STYLE_KEY, 0)?,
    );
    let shape = AuraShape {
        channels,
        dim,
        style_in,
        style_out,
        style_depth: (numbered_children(names(), "style_network.net.") + 1) / 2,
        up_mults,
        downs,
        down_mults,
        attention,
        attention_depths,
        mid_depth: numbered_children(names(), "mid_attn.layers."),
        head_width: hidden / HEADS,
        kernels: dimension_of(unwrapped, KERNELS_KEY, 0)?,
    };
    if hidden < HEADS || hidden % HEADS != 0 {
        return Err(OUT_KEY.into());
    }
    if shape.kernels < 2 {
        return Err(KERNELS_KEY.into());
    }
    let ratio = (style_in > 0 && style_out % style_in == 0).then(|| style_out / style_in);
    if ratio != Some(shape.scale()) {
        return Err(STYLE_KEY.into());
    }
    check_skips(&shape)?;
    Ok(Layout {
        architecture: Architecture::AuraSr(shape),
        names: own_names(unwrapped),
    })
}

/// The down path must end as wide as the middle, and each up level that joins a down
/// level's outputs must be as wide as they are (the reference concatenates them onto its
/// blocks' inputs, built twice the level's width).
fn check_skips(shape: &AuraShape) -> Result<(), String> {
    let (up, down) = (shape.up_widths(), shape.down_widths());
    if down[shape.downs] != up[LEVELS] {
        return Err(format!("downs.{}.1.1.weight", shape.downs - 1));
    }
    for j in 0..shape.downs {
        if up[LEVELS - 1 - j] != down[shape.downs - 1 - j] {
            return Err(format!("ups.{j}.0.0.block1.proj.weights"));
        }
    }
    Ok(())
}
