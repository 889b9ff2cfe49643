//! `spec.init_image.padding_mask_crop`: the masked area cut from the init image and its
//! mask at the generation size, and what puts the result back into the original.

use image::RgbImage;

use crate::api::validate::fields::Violations;
use crate::engine::control::ResizeMode;
use crate::engine::inpaint_area::{crop_init, crop_region, PasteBack};
use crate::engine::request::InitImage;
use crate::jobs::ControlNetJob;
use crate::proto::v1 as pb;

/// Whether the request generates only its init image's masked area.
pub fn asked(spec: &pb::GenerationSpec) -> bool {
    spec.init_image
        .as_ref()
        .is_some_and(|i| i.padding_mask_crop.is_some())
}

/// The init image the pipeline generates from (the masked area at `size` when asked)
/// and, then, how its result goes back into the original image.
pub fn masked_area(
    spec: &pb::GenerationSpec,
    init: Option<InitImage>,
    size: (u32, u32),
    v: &mut Violations,
) -> (Option<InitImage>, Option<PasteBack>) {
    let Some(pad) = spec.init_image.as_ref().and_then(|i| i.padding_mask_crop) else {
        return (init, None);
    };
    // A padding without a mask was refused with the init image.
    let Some(mut init) = init.filter(|i| i.mask.is_some()) else {
        return (None, None);
    };
    let dims = (init.width as u32, init.height as u32);
    let region = init
        .mask
        .as_deref()
        .and_then(|mask| crop_region(mask, dims, size, pad));
    let Some(region) = region else {
        v.add(
            "spec.init_image.mask",
            "has no masked pixel: padding_mask_crop needs a masked area",
        );
        return (None, None);
    };
    let pixels = std::mem::take(&mut init.pixels);
    let Some(original) = RgbImage::from_raw(dims.0, dims.1, pixels) else {
        v.add("spec.init_image.image", "has fewer pixels than its size");
        return (None, None);
    };
    let cropped = crop_init(&init, &original, region, size);
    let back = PasteBack {
        original,
        mask: init.mask.take().unwrap_or_default(),
        region,
        padding: pad,
    };
    (Some(cropped), Some(back))
}

/// Inpainting only the masked area, each ControlNet unit's maps are cut to that area and
/// fitted as the image is (diffusers' "fill"): a unit asking for another resize mode is
/// refused naming it, and the units' resize mode reads what is done.
pub fn control_maps(spec: &pb::GenerationSpec, units: &mut [ControlNetJob], v: &mut Violations) {
    if !asked(spec) {
        return;
    }
    let fill = pb::ResizeMode::ResizeAndFill as i32;
    for (i, unit) in spec.controlnets.iter().enumerate() {
        if ![pb::ResizeMode::Unspecified as i32, fill].contains(&unit.resize_mode) {
            v.add(
                format!("spec.controlnets[{i}].resize_mode"),
                "must be unset or RESIZE_MODE_RESIZE_AND_FILL with padding_mask_crop: the \
                 control map is cut to the masked area and fitted as the image is",
            );
        }
    }
    for unit in units {
        unit.resize = ResizeMode::ResizeAndFill;
    }
}
