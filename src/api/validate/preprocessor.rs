//! A preprocessor and its parameters, as a ControlNet unit and the Preprocess RPC name
//! them: every field checked, then the preprocessors not implemented yet deferred as
//! UNIMPLEMENTED naming the field.

use crate::api::status::ApiError;
use crate::api::validate::fields::{at_most, enum_value, Violations};
use crate::api::validate::images::decode_image;
use crate::api::validate::Deferred;
use crate::config::Limits;
use crate::engine::preprocess::Preprocessor;
use crate::proto::v1 as pb;

/// Canny's thresholds when the request names none (controlnet_aux's defaults).
const DEFAULT_THRESHOLDS: (u32, u32) = (100, 200);

/// The preprocessors implemented, as the capabilities list them.
pub const IMPLEMENTED: [pb::Preprocessor; 2] = [pb::Preprocessor::None, pb::Preprocessor::Canny];

/// Checks `preprocessor` and `params` (fields under `prefix`, which ends with a dot or
/// is empty); the domain preprocessor when all is valid and implemented.
pub fn preprocessor(
    prefix: &str,
    preprocessor: i32,
    params: Option<&pb::PreprocessorParams>,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Option<Preprocessor> {
    let field = format!("{prefix}preprocessor");
    let kind = enum_value::<pb::Preprocessor>(v, &field, preprocessor);
    let default = pb::PreprocessorParams::default();
    let params = params.unwrap_or(&default);
    let p = format!("{prefix}preprocessor_params");
    let low = params.low_threshold.unwrap_or(DEFAULT_THRESHOLDS.0);
    let high = params.high_threshold.unwrap_or(DEFAULT_THRESHOLDS.1);
    at_most(v, &format!("{p}.low_threshold"), low, 255);
    at_most(v, &format!("{p}.high_threshold"), high, 255);
    if high <= 255 && low > high {
        v.add(
            format!("{p}.low_threshold"),
            format!("must be at most high_threshold ({low} > {high})"),
        );
    }
    let resolution = params.detect_resolution;
    if resolution != 0 && !(64..=2048).contains(&resolution) {
        v.add(
            format!("{p}.detect_resolution"),
            format!("must be 0 or between 64 and 2048, got {resolution}"),
        );
    } else if resolution != 0 {
        deferred.unimplemented(ApiError::Unimplemented(
            format!("{p}.detect_resolution"),
            "resizing for detection is not implemented yet; 0 detects at the image size".into(),
        ));
    }
    match kind? {
        pb::Preprocessor::Unspecified | pb::Preprocessor::None => Some(Preprocessor::None),
        pb::Preprocessor::Canny => Some(Preprocessor::Canny { low, high }),
        other => {
            deferred.unimplemented(ApiError::Unimplemented(
                field,
                format!(
                    "the {} preprocessor is not implemented yet",
                    other.as_str_name()
                ),
            ));
            None
        }
    }
}

/// A Preprocess request, checked: its image and preprocessor.
pub fn preprocess_request(
    request: &pb::PreprocessRequest,
    limits: &Limits,
) -> Result<(image::DynamicImage, Preprocessor), ApiError> {
    let mut v = Violations::default();
    let mut deferred = Deferred::default();
    let max_pixels = u64::from(limits.max_width) * u64::from(limits.max_height) * 4;
    let image = if request.image.is_empty() {
        v.add("image", "is required");
        None
    } else {
        decode_image(&request.image, "image", max_pixels, &mut v)
    };
    let preprocessor = preprocessor(
        "",
        request.preprocessor,
        request.preprocessor_params.as_ref(),
        &mut v,
        &mut deferred,
    );
    v.into_result()?;
    deferred.into_result()?;
    match (image, preprocessor) {
        (Some(image), Some(preprocessor)) => Ok((image, preprocessor)),
        _ => Err(ApiError::Internal(
            "a valid request without its parts".into(),
        )),
    }
}
