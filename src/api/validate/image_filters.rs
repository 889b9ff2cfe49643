//! The parameters of the preprocessors that only filter the image (tile resampling's
//! rate, the blur's sigma, the recolor maps' gamma, XDoG's threshold): each in its range,
//! each for its own preprocessors, and a rate that leaves the detected image a pixel.

use crate::api::validate::fields::{float, read_by_any, Range, Violations};
use crate::engine::preprocess::image_filters::{resampled_size, Param};
use crate::proto::v1 as pb;

/// The rates A1111's "Down Sampling Rate" slider offers.
const RATES: Range = Range::closed(1.0, 8.0);
/// The sigmas A1111's "Sigma" slider offers.
const SIGMAS: Range = Range::closed(0.01, 64.0);
/// The rate when none is sent (A1111's default: the image as it is).
const DEFAULT_RATE: f32 = 1.0;
/// The sigma when none is sent (A1111's default).
const DEFAULT_SIGMA: f32 = 9.0;
/// The gammas A1111's "Gamma Correction" slider offers.
const GAMMAS: Range = Range::closed(0.1, 2.0);
/// The gamma when none is sent (A1111's default: the lightness as it is).
const DEFAULT_GAMMA: f32 = 1.0;
/// The preprocessors that read a gamma.
const RECOLORS: [pb::Preprocessor; 2] = [
    pb::Preprocessor::RecolorLuminance,
    pb::Preprocessor::RecolorIntensity,
];

/// The thresholds A1111's "XDoG Threshold" slider offers, and its default.
const XDOG_THRESHOLDS: std::ops::RangeInclusive<u32> = 1..=64;
const DEFAULT_XDOG_THRESHOLD: u32 = 32;

/// The checked filter parameters, as the client sent them (defaults where unset).
#[derive(Debug, Clone, Copy)]
pub struct FilterParameters {
    /// Tile resampling's rate.
    pub rate: Param,
    /// The blur's sigma.
    pub sigma: Param,
    /// The recolor maps' gamma.
    pub gamma: Param,
    /// XDoG's threshold.
    pub xdog_threshold: u32,
}

impl Default for FilterParameters {
    fn default() -> Self {
        Self {
            rate: Param(DEFAULT_RATE),
            sigma: Param(DEFAULT_SIGMA),
            gamma: Param(DEFAULT_GAMMA),
            xdog_threshold: DEFAULT_XDOG_THRESHOLD,
        }
    }
}

/// `down_sampling_rate`, `blur_sigma`, `gamma_correction` and `xdog_threshold` (under
/// `p`) for a preprocessor of `kind`.
pub fn parameters(
    p: &str,
    kind: Option<pb::Preprocessor>,
    params: &pb::PreprocessorParams,
    v: &mut Violations,
) -> FilterParameters {
    let mut checked = |name: &str,
                       value: Option<f32>,
                       owners: &[pb::Preprocessor],
                       range: Range,
                       default: f32| {
        let field = format!("{p}.{name}");
        match value {
            None => default,
            Some(_) if !read_by_any(v, &field, kind, owners) => default,
            Some(x) if float(v, &field, x, range).is_some() => x,
            Some(_) => default,
        }
    };
    FilterParameters {
        rate: Param(checked(
            "down_sampling_rate",
            params.down_sampling_rate,
            &[pb::Preprocessor::TileResample],
            RATES,
            DEFAULT_RATE,
        )),
        sigma: Param(checked(
            "blur_sigma",
            params.blur_sigma,
            &[pb::Preprocessor::Blur],
            SIGMAS,
            DEFAULT_SIGMA,
        )),
        gamma: Param(checked(
            "gamma_correction",
            params.gamma_correction,
            &RECOLORS,
            GAMMAS,
            DEFAULT_GAMMA,
        )),
        xdog_threshold: xdog_threshold(p, kind, params.xdog_threshold, v),
    }
}

/// `xdog_threshold` (under `p`): for XDoG only, in [`XDOG_THRESHOLDS`].
fn xdog_threshold(
    p: &str,
    kind: Option<pb::Preprocessor>,
    sent: Option<u32>,
    v: &mut Violations,
) -> u32 {
    let field = format!("{p}.xdog_threshold");
    match sent {
        None => DEFAULT_XDOG_THRESHOLD,
        Some(_) if !read_by_any(v, &field, kind, &[pb::Preprocessor::ScribbleXdog]) => {
            DEFAULT_XDOG_THRESHOLD
        }
        Some(t) if XDOG_THRESHOLDS.contains(&t) => t,
        Some(t) => {
            v.add(field, format!("must be in [1, 64], got {t}"));
            DEFAULT_XDOG_THRESHOLD
        }
    }
}

/// Tile resampling at `rate` must leave the image of `size` (as detected) a pixel each
/// way.
pub fn resampled_sides(p: &str, rate: Param, (w, h): (u64, u64), v: &mut Violations) {
    let side = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
    let (rw, rh) = resampled_size(side(w), side(h), rate.0);
    if rw == 0 || rh == 0 {
        v.add(
            format!("{p}.down_sampling_rate"),
            format!(
                "{} would shrink the {w}x{h} image to {rw}x{rh}: a side needs at least one pixel",
                rate.0
            ),
        );
    }
}
