//! `spec.init_image.padding_mask_crop`: the masked area cut from the init image and its
//! mask at the generation size, and what puts the result back into the original.

use image::RgbImage;

use crate::api::validate::fields::Violations;
use crate::engine::inpaint_area::{crop_init, crop_region, PasteBack};
use crate::engine::request::InitImage;
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
    let pad = spec.init_image.as_ref().and_then(|i| i.padding_mask_crop);
    let (Some(pad), Some(init)) = (pad, init.as_ref()) else {
        return (init, None);
    };
    let Some(mask) = init.mask.as_ref() else {
        return (None, None);
    };
    let dims = (init.width as u32, init.height as u32);
    let Some(region) = crop_region(mask, dims, size, pad) else {
        v.add(
            "spec.init_image.mask",
            "has no masked pixel: padding_mask_crop needs a masked area",
        );
        return (None, None);
    };
    let Some(original) = RgbImage::from_raw(dims.0, dims.1, init.pixels.clone()) else {
        v.add("spec.init_image.image", "has fewer pixels than its size");
        return (None, None);
    };
    let back = PasteBack {
        original,
        mask: mask.clone(),
        region,
        padding: pad,
    };
    (Some(crop_init(init, region, size)), Some(back))
}
