//! A ControlNet unit's `pixel_perfect` (A1111's "Pixel Perfect"): each of its images
//! with a preprocessor is detected at the resolution that makes its control map meet the
//! output pixel for pixel under the unit's resize mode. The resolution is computed here,
//! then checked by the preprocessor's own rules as if the client had sent it; what those
//! rules refuse is told against `pixel_perfect`.

use crate::api::validate::fields::Violations;
use crate::engine::control::ResizeMode;
use crate::proto::v1 as pb;

/// The detect resolutions a computed one must fall in, as a sent one must.
const RESOLUTIONS: std::ops::RangeInclusive<u64> = 64..=2048;

/// A unit's pixel-perfect rule: where it is named and what it fits the images to.
pub struct PixelPerfect {
    /// `spec.controlnets[i].pixel_perfect`.
    pub field: String,
    /// The size the unit controls.
    pub output: (u32, u32),
    /// How the unit fits its maps to it.
    pub resize: ResizeMode,
}

/// An image's parameters with the computed detect resolution.
pub struct Fitted {
    pub params: pb::PreprocessorParams,
    resolution: u64,
    in_range: bool,
}

impl PixelPerfect {
    /// `params` (under `prefix`, which ends with a dot) of an `image` with `preprocessor`,
    /// their detect resolution computed; `None` (nothing to compute) without a
    /// preprocessor, with one sd-webui-controlnet gives no resolution (tile resampling,
    /// invert, recolor), without an image, or where the client set one (a violation naming it).
    pub fn fit(
        &self,
        prefix: &str,
        preprocessor: i32,
        params: Option<&pb::PreprocessorParams>,
        image: Option<&image::DynamicImage>,
        v: &mut Violations,
    ) -> Option<Fitted> {
        let without = [
            pb::Preprocessor::Unspecified,
            pb::Preprocessor::None,
            pb::Preprocessor::TileResample,
            pb::Preprocessor::Invert,
            pb::Preprocessor::RecolorLuminance,
            pb::Preprocessor::RecolorIntensity,
        ];
        if without.iter().any(|p| *p as i32 == preprocessor) {
            return None;
        }
        let params = params.cloned().unwrap_or_default();
        if params.detect_resolution != 0 {
            v.add(
                format!("{prefix}preprocessor_params.detect_resolution"),
                format!(
                    "is computed when {} is set; leave it 0, got {}",
                    self.field, params.detect_resolution
                ),
            );
            return None;
        }
        let image = image?;
        let size = (image.width(), image.height());
        let resolution = self.resize.pixel_perfect_resolution(size, self.output);
        let in_range = RESOLUTIONS.contains(&resolution);
        if !in_range {
            let (w, h) = size;
            let (ow, oh) = self.output;
            v.add(
                &self.field,
                format!(
                    "computes a detect resolution of {resolution} for the {w}x{h} image at {prefix}image (output {ow}x{oh}), outside [64, 2048]: set a detect_resolution instead"
                ),
            );
        }
        let clamped = resolution.clamp(*RESOLUTIONS.start(), *RESOLUTIONS.end());
        Some(Fitted {
            params: pb::PreprocessorParams {
                detect_resolution: clamped as u32,
                ..params
            },
            resolution,
            in_range,
        })
    }

    /// The violations the preprocessor's checks added from `from` on that name the
    /// detect resolution under `prefix`: told against this field (dropped where the
    /// resolution itself was already refused).
    pub fn blame(&self, prefix: &str, fitted: &Fitted, from: usize, v: &mut Violations) {
        let detect = format!("{prefix}preprocessor_params.detect_resolution");
        let named = format!("`{detect}`");
        let told = format!(
            "`{}` (a detect resolution of {})",
            self.field, fitted.resolution
        );
        for (field, description) in v.0.split_off(from) {
            if field != detect {
                v.0.push((field, description));
            } else if fitted.in_range {
                v.0.push((self.field.clone(), description.replacen(&named, &told, 1)));
            }
        }
    }
}
