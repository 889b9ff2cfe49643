//! OmniSR's hyperparameters read from its tensors as spandrel reads them
//! (`OmniSR/__init__.py`): the width and image channels from the first convolution, its
//! bias for all the biased-or-not layers, the scale from the pixel shuffle's
//! convolution, groups and blocks from their numbered modules, the window from the
//! position-bias table (8 where there is none).

use super::{dimension_of, own_names, shape_of, shuffle_factor, Architecture, Layout, Unwrapped};
use crate::engine::weights::numbered_children;

/// The tensors spandrel detects OmniSR by.
pub(super) const KEYS: [&str; 3] = [
    "residual_layer.0.residual_layer.0.layer.0.fn.0.weight",
    "input.weight",
    "up.0.weight",
];

/// Its position-bias table (`(2 * window - 1)²` rows), where the file has one.
const POSITION_BIAS_KEY: &str = "residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight";

/// spandrel's window without a position-bias table.
const DEFAULT_WINDOW: i64 = 8;

/// The ends of the profiler's counters some files carry (`thop`'s), which spandrel drops.
const PROFILER_ENDS: [&str; 2] = ["total_ops", "total_params"];

/// An OmniSR file (its own names); `Err` names the tensor that does not fit: a width
/// that is not whole quarters (the channel attentions' four heads would not split it),
/// a position-bias table of no window's size, a pixel shuffle to other channels.
pub(super) fn detect(unwrapped: &Unwrapped) -> Result<Layout, &'static str> {
    let dimension = |name: &'static str, d: usize| dimension_of(unwrapped, name, d);
    let (features, channels) = (dimension(KEYS[1], 0)?, dimension(KEYS[1], 1)?);
    if features < 1 || channels < 1 {
        return Err(KEYS[1]);
    }
    // The channel attentions' four heads split the width.
    if features % 4 != 0 {
        return Err(KEYS[1]);
    }
    let (scale, out_channels) = shuffle_factor(dimension(KEYS[2], 0)?, channels).ok_or(KEYS[2])?;
    if out_channels != channels {
        return Err(KEYS[2]);
    }
    let position_bias = shape_of(unwrapped, POSITION_BIAS_KEY).is_some();
    let window = match position_bias {
        true => {
            let rows = dimension(POSITION_BIAS_KEY, 0)?;
            // spandrel's `int((sqrt(rows) + 1) / 2)`, which must give the table back.
            let window = (((rows as f64).sqrt() + 1.0) / 2.0) as i64;
            if window < 1 || (2 * window - 1).pow(2) != rows {
                return Err(POSITION_BIAS_KEY);
            }
            window
        }
        false => DEFAULT_WINDOW,
    };
    let names = || unwrapped.iter().map(|(_, n, _)| *n);
    let profiled = |name: &str| PROFILER_ENDS.iter().any(|end| name.ends_with(end));
    Ok(Layout {
        architecture: Architecture::OmniSr {
            channels,
            features,
            groups: numbered_children(names(), "residual_layer."),
            blocks: numbered_children(names(), "residual_layer.0.residual_layer.") - 1,
            window,
            position_bias,
            bias: shape_of(unwrapped, "input.bias").is_some(),
            scale,
        },
        names: own_names(unwrapped)
            .into_iter()
            .filter(|(_, name)| !profiled(name))
            .collect(),
    })
}

impl Architecture {
    /// spandrel's OmniSR tags: width, window and groups.
    pub(super) fn omnisr_tags(&self) -> Vec<String> {
        let Architecture::OmniSr {
            features,
            window,
            groups,
            ..
        } = *self
        else {
            return Vec::new();
        };
        vec![
            format!("{features}nf"),
            format!("w{window}"),
            format!("{groups}nr"),
        ]
    }
}
