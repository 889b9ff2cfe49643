//! ControlNet units in domain terms: how a unit's control map is fitted to the output
//! size (A1111's three resize modes, as diffusers' image processor implements them), and
//! when and how strongly its residuals join the UNet (diffusers' `controlnet_keep`).

use image::imageops;
use image::RgbImage;

use crate::engine::models::controlnet::ControlNetConfig;
use crate::engine::models::t2i_adapter::T2IAdapterConfig;
use crate::engine::models::unet_config::UNetConfig;
use crate::engine::resample::{lanczos_resize, lanczos_window, resize_box, Filter, Window};

/// How a unit's residuals enter the guided batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// The ControlNet sees both halves of the guided batch (diffusers' default).
    #[default]
    Balanced,
    /// diffusers' guess mode: the ControlNet sees only the conditional half, its residuals
    /// scaled from 0.1 (shallowest) to 1 (mid block); the unconditional half gets none.
    Guess,
}

/// How a control map of another size becomes one of the output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// Stretch to the output size (diffusers' behaviour).
    #[default]
    JustResize,
    /// Scale to cover the output, keep the aspect ratio, crop the overflow evenly.
    CropAndResize,
    /// Scale to fit inside the output, keep the aspect ratio, and fill the bands by
    /// stretching the map's edge rows or columns.
    ResizeAndFill,
}

impl ResizeMode {
    /// The detect resolution at which an `image`-sized control image's map meets an
    /// `output`-sized image pixel for pixel when this mode fits it (sd-webui-controlnet's
    /// `pixel_perfect_resolution`, A1111's "Pixel Perfect"): the image's short side times
    /// the factor that covers the output (that fits inside it for resize and fill),
    /// rounded half to even as numpy rounds.
    pub fn pixel_perfect_resolution(self, image: (u32, u32), output: (u32, u32)) -> u64 {
        let (width, height) = (f64::from(image.0), f64::from(image.1));
        let by_height = f64::from(output.1) / height;
        let by_width = f64::from(output.0) / width;
        let factor = match self {
            Self::ResizeAndFill => by_height.min(by_width),
            Self::JustResize | Self::CropAndResize => by_height.max(by_width),
        };
        (factor * height.min(width)).round_ties_even() as u64
    }
}

/// A control type of ControlNet Union models, in the order they were trained with (the
/// index is the model's `control_type` slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    /// OpenPose skeletons.
    OpenPose,
    /// Depth maps.
    Depth,
    /// HED, PiDiNet, scribbles, TEED.
    HedScribble,
    /// Canny edges, line art, anime line art, MLSD.
    CannyLineart,
    /// Surface normals.
    Normal,
    /// Segmentation.
    Segment,
    /// Tile ("promax" models).
    Tile,
    /// Repaint / inpainting ("promax" models).
    Repaint,
}

impl ControlType {
    /// The model's slot for this type.
    pub fn index(self) -> i64 {
        self as i64
    }
}

/// One condition of a unit of a union model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlCondition {
    /// What its map shows.
    pub control_type: ControlType,
    /// Its scale, in [0, 2].
    pub scale: f64,
}

/// One ControlNet unit's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlUnit {
    /// Conditioning scale, in [0, 2].
    pub scale: f64,
    /// Fraction of the model calls at which the unit starts, in [0, 1).
    pub guidance_start: f64,
    /// Fraction of the model calls at which the unit ends, in (0, 1], above the start.
    pub guidance_end: f64,
    /// How the residuals enter the guided batch.
    pub mode: ControlMode,
    /// A union model's conditions, one per control map in order; empty for other
    /// ControlNets.
    pub conditions: Vec<ControlCondition>,
}

impl Default for ControlUnit {
    fn default() -> Self {
        Self {
            scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            mode: ControlMode::Balanced,
            conditions: Vec::new(),
        }
    }
}

impl ControlUnit {
    /// The scale of model call `index` of the `count` calls a run makes: the unit's scale
    /// inside its window, 0 outside, exactly as diffusers' `controlnet_keep` decides.
    pub fn scale_at(&self, index: usize, count: usize) -> f64 {
        if self.in_window(index, count) {
            self.scale
        } else {
            0.0
        }
    }

    /// Whether a T2I-Adapter unit acts at model call `index` of a run diffusers counts
    /// `steps` steps in: `index < int(steps * guidance_end)`, the adapter pipeline's
    /// `adapter_conditioning_factor` rule, and from `guidance_start` on (`index / steps`
    /// not below it).
    pub fn adapter_in_window(&self, index: usize, steps: usize) -> bool {
        let (i, n) = (index as f64, steps as f64);
        i / n >= self.guidance_start && index < (n * self.guidance_end) as usize
    }

    /// Whether model call `index` of `count` lies in the unit's window (diffusers'
    /// `controlnet_keep` is 1).
    pub fn in_window(&self, index: usize, count: usize) -> bool {
        let (i, n) = (index as f64, count as f64);
        !(i / n < self.guidance_start || (i + 1.0) / n > self.guidance_end)
    }
}

/// `map` at `width` x `height`, the `mode` way, as diffusers' image processor computes it
/// (Pillow's Lanczos resampling, bit for bit); the map itself when it has that size.
pub fn fit(map: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    if map.dimensions() == (width, height) {
        return map.clone();
    }
    let (src_w, src_h) = (u64::from(map.width()), u64::from(map.height()));
    let (w, h) = (u64::from(width), u64::from(height));
    // Aspect ratios compared exactly: w / h < src_w / src_h.
    let wider_source = w * src_h < src_w * h;
    let taller_source = w * src_h > src_w * h;
    match mode {
        ResizeMode::JustResize => lanczos_resize(map, width, height),
        ResizeMode::CropAndResize => {
            let scaled = if taller_source {
                (w, src_h * w / src_w)
            } else {
                (src_w * h / src_h, h)
            };
            cropped_cover(map, scaled, width, height)
        }
        ResizeMode::ResizeAndFill => {
            let (scaled_w, scaled_h) = if wider_source {
                (w, src_h * w / src_w)
            } else {
                (src_w * h / src_h, h)
            };
            let scaled = lanczos_resize(map, scaled_w as u32, scaled_h as u32);
            filled(&scaled, width, height, (wider_source, taller_source))
        }
    }
}

/// `map` scaled to `scaled` (covering `width` x `height`) and
/// pasted centred on a black canvas of that size, as [`centred`] pastes it: only the
/// part that shows is resampled, so a thin map scaled to cover costs no more than the
/// output.
fn cropped_cover(map: &RgbImage, scaled: (u64, u64), width: u32, height: u32) -> RgbImage {
    let (scaled_w, scaled_h) = (scaled.0.max(1), scaled.1.max(1));
    // PIL's paste offset, and the part of the scaled map that lands on the canvas.
    let offset = |side: u32, scaled: u64| i64::from(side / 2) - (scaled / 2) as i64;
    let (x, y) = (offset(width, scaled_w), offset(height, scaled_h));
    let shown = |offset: i64, side: u32, scaled: u64| {
        let start = (-offset).max(0) as u64;
        start.min(scaled)..((i64::from(side) - offset).max(0) as u64).min(scaled)
    };
    let window = Window {
        x: shown(x, width, scaled_w),
        y: shown(y, height, scaled_h),
    };
    let (left, top) = (window.x.start as i64 + x, window.y.start as i64 + y);
    let part = lanczos_window(map, (scaled_w, scaled_h), window);
    let mut canvas = RgbImage::new(width, height);
    imageops::replace(&mut canvas, &part, left, top);
    canvas
}

/// `image` pasted centred on a black canvas of `width` x `height` (PIL's paste at
/// `(width / 2 - w / 2, height / 2 - h / 2)`), clipped where it overflows.
fn centred(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let mut canvas = RgbImage::new(width, height);
    let x = i64::from(width / 2) - i64::from(image.width() / 2);
    let y = i64::from(height / 2) - i64::from(image.height() / 2);
    imageops::replace(&mut canvas, image, x, y);
    canvas
}

/// `image` (fitting inside) centred on `width` x `height`, the bands beside it filled
/// with its edge rows or columns stretched across them, as diffusers' `_resize_and_fill`
/// does (Pillow's default bicubic resize of an empty box at the edge, which weighs the
/// nearest lines).
fn filled(image: &RgbImage, width: u32, height: u32, (wider, taller): (bool, bool)) -> RgbImage {
    let mut canvas = centred(image, width, height);
    let (w, h) = (f64::from(image.width()), f64::from(image.height()));
    if wider {
        let band = (height / 2).saturating_sub(image.height() / 2);
        if band > 0 {
            let top = resize_box(
                Filter::Bicubic,
                image,
                width,
                band,
                [0.0, 0.0, f64::from(width), 0.0],
            );
            let bottom = resize_box(
                Filter::Bicubic,
                image,
                width,
                band,
                [0.0, h, f64::from(width), h],
            );
            imageops::replace(&mut canvas, &top, 0, 0);
            imageops::replace(&mut canvas, &bottom, 0, i64::from(band + image.height()));
        }
    } else if taller {
        let band = (width / 2).saturating_sub(image.width() / 2);
        if band > 0 {
            let left = resize_box(
                Filter::Bicubic,
                image,
                band,
                height,
                [0.0, 0.0, 0.0, f64::from(height)],
            );
            let right = resize_box(
                Filter::Bicubic,
                image,
                band,
                height,
                [w, 0.0, w, f64::from(height)],
            );
            imageops::replace(&mut canvas, &left, 0, 0);
            imageops::replace(&mut canvas, &right, i64::from(band + image.width()), 0);
        }
    }
    canvas
}

/// What a ControlNet must share with the pipeline it controls.
pub struct ControlledModel<'a> {
    /// The base UNet.
    pub unet: &'a UNetConfig,
    /// Pixels per latent.
    pub vae_factor: i64,
    /// Channels of the latents (the ControlNet sees them without an inpainting UNet's
    /// mask channels).
    pub latent_channels: i64,
}

/// Why the T2I-Adapter of `adapter` cannot control `model`, if it cannot: each feature
/// the UNet's down blocks take must have the width and size of the state it joins (in a
/// block with attention, the state before its downsampler; in one without, its output),
/// as diffusers adds them; a feature beyond them joins the mid block's output only where
/// it fits, and others are left unused.
pub fn adapter_mismatch(model: &ControlledModel<'_>, adapter: &T2IAdapterConfig) -> Option<String> {
    let unet = model.unet;
    let levels = unet.block_out_channels.len();
    let mut factor = model.vae_factor;
    let features = adapter.features();
    for (i, feature) in features.iter().enumerate().take(levels) {
        let attended =
            unet.down_block_types.get(i).map(String::as_str) == Some("CrossAttnDownBlock2D");
        let downsamples = i + 1 < levels;
        let joins = if attended || !downsamples {
            factor
        } else {
            factor * 2
        };
        let channels = unet.block_out_channels[i];
        if (feature.channels, feature.factor) != (channels, joins) {
            return Some(format!(
                "its feature {i} has {} channels at 1/{} of the image size where the base model's down block {i} takes {channels} at 1/{joins}",
                feature.channels, feature.factor
            ));
        }
        if downsamples {
            factor *= 2;
        }
    }
    None
}

/// Why `controlnet` cannot control `model` (residuals of other shapes, another text
/// conditioning, another control image scale), if it cannot.
pub fn mismatch(model: &ControlledModel<'_>, controlnet: &ControlNetConfig) -> Option<String> {
    let (encoder, unet) = (&controlnet.encoder, model.unet);
    let debug = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let checks = [
        (
            "block_out_channels",
            debug(&encoder.block_out_channels),
            debug(&unet.block_out_channels),
        ),
        (
            "layers_per_block",
            debug(&encoder.layers_per_block),
            debug(&unet.layers_per_block),
        ),
        (
            "cross_attention_dim",
            debug(&encoder.cross_attention_dim),
            debug(&unet.cross_attention_dim),
        ),
        (
            "addition_embed_type",
            debug(&encoder.addition_embed_type),
            debug(&unet.addition_embed_type),
        ),
        (
            "projection_class_embeddings_input_dim",
            debug(&encoder.projection_class_embeddings_input_dim),
            debug(&unet.projection_class_embeddings_input_dim),
        ),
        (
            "addition_time_embed_dim",
            debug(&encoder.addition_time_embed_dim),
            debug(&unet.addition_time_embed_dim),
        ),
        (
            "in_channels",
            debug(&encoder.in_channels),
            debug(&model.latent_channels),
        ),
        (
            "control image scale",
            debug(&controlnet.control.downscale()),
            debug(&model.vae_factor),
        ),
    ];
    checks
        .into_iter()
        .find(|(_, ours, theirs)| ours != theirs)
        .map(|(key, ours, theirs)| {
            format!("its {key} is {ours} where the base model's is {theirs}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crop and resize equals the whole scaled map pasted centred (as diffusers' image
    /// processor does it) on maps taller, wider, smaller, larger and of the output's
    /// aspect.
    #[test]
    fn crop_and_resize_equals_the_whole_scaled_map_pasted_centred() {
        let noise = |w: u32, h: u32| {
            RgbImage::from_fn(w, h, |x, y| {
                let v = (x * 7919 + y * 104_729) ^ (x * y);
                image::Rgb([v as u8, (v >> 3) as u8, (v >> 6) as u8])
            })
        };
        let cases = [
            ((30, 70), (64, 48)),
            ((70, 30), (48, 64)),
            ((33, 33), (64, 64)),
            ((97, 13), (64, 40)),
            ((13, 97), (40, 64)),
            ((200, 150), (64, 40)),
        ];
        for ((w, h), (out_w, out_h)) in cases {
            let map = noise(w, h);
            let (src_w, src_h) = (u64::from(w), u64::from(h));
            let (ow, oh) = (u64::from(out_w), u64::from(out_h));
            let (sw, sh) = if ow * src_h > src_w * oh {
                (ow, src_h * ow / src_w)
            } else {
                (src_w * oh / src_h, oh)
            };
            let whole = lanczos_resize(&map, sw as u32, sh as u32);
            let expected = centred(&whole, out_w, out_h);
            let got = fit(&map, out_w, out_h, ResizeMode::CropAndResize);
            assert!(got == expected, "{w}x{h} to {out_w}x{out_h}");
        }
        // A thin map fits without its scaled whole (64 x 256,000,000 pixels).
        let thin = fit(&noise(1, 4_000_000), 64, 64, ResizeMode::CropAndResize);
        assert_eq!(thin.dimensions(), (64, 64));
    }

    /// sd-webui-controlnet's `pixel_perfect_resolution` on the same sizes, as numpy
    /// computed them (ties rounded to even: 100.5 to 100, 167.5 to 168).
    #[test]
    fn pixel_perfect_resolutions_equal_sd_webui_controlnet() {
        use ResizeMode::{CropAndResize, JustResize, ResizeAndFill};
        let cases = [
            ((640, 480), (1024, 1024), JustResize, 1024),
            ((640, 480), (1024, 1024), CropAndResize, 1024),
            ((640, 480), (1024, 1024), ResizeAndFill, 768),
            ((480, 640), (1024, 768), CropAndResize, 1024),
            ((480, 640), (1024, 768), ResizeAndFill, 576),
            ((1000, 10), (64, 64), ResizeAndFill, 1),
            ((100, 4000), (2048, 2048), JustResize, 2048),
            ((100, 4000), (2048, 2048), ResizeAndFill, 51),
            ((333, 517), (832, 1216), ResizeAndFill, 783),
            ((96, 67), (144, 1024), ResizeAndFill, 100),
            ((96, 67), (240, 1024), ResizeAndFill, 168),
        ];
        for (image, output, mode, expected) in cases {
            assert_eq!(
                mode.pixel_perfect_resolution(image, output),
                expected,
                "{image:?} to {output:?}, {mode:?}"
            );
        }
    }
}
