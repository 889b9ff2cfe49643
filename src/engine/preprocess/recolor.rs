//! sd-webui-controlnet's recolor preprocessors (`recolor_luminance`,
//! `recolor_intensity`): a grey map of the image's lightness, gamma corrected, that the
//! recolor ControlNets (Stability's recolor Control-LoRAs) colour back in.
//!
//! sd-webui-controlnet hands its RGB image to OpenCV's BGR conversions, and so does this:
//! the luminance is the L of `cv2.cvtColor(image, COLOR_BGR2LAB)` (red and blue trade
//! weights), the intensity the V of `COLOR_BGR2HSV` (the brightest channel, which the
//! order leaves alone). The 8-bit L is OpenCV's fixed-point conversion (`RGB2Lab_b`), its
//! tables built as OpenCV builds them, so the map equals OpenCV's byte for byte.

use std::sync::OnceLock;

use image::{GrayImage, RgbImage};

/// Which lightness the map shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lightness {
    /// CIE L* (`recolor_luminance`).
    Luminance,
    /// HSV value, the brightest channel (`recolor_intensity`).
    Intensity,
}

/// The grey map of `image`'s `lightness`, each value v becoming
/// `uint8(clip((v / 255) ** gamma * 255, 0, 255))` in float32, as sd-webui-controlnet
/// corrects it.
pub fn recolor(image: &RgbImage, lightness: Lightness, gamma: f32) -> GrayImage {
    let corrected = gamma_table(gamma);
    let values = image.pixels().map(|p| {
        let value = match lightness {
            Lightness::Luminance => lab_lightness(p.0),
            Lightness::Intensity => p.0[0].max(p.0[1]).max(p.0[2]),
        };
        corrected[usize::from(value)]
    });
    let (width, height) = image.dimensions();
    GrayImage::from_raw(width, height, values.collect())
        .unwrap_or_else(|| GrayImage::new(width, height))
}

/// What each 8-bit value becomes under `gamma`: the value over 255 in float32, raised to
/// the power (in double precision, rounded to float32: numpy's float32 power, which
/// its vectorised loops compute to within a unit in the last place), times 255,
/// truncated.
pub fn gamma_table(gamma: f32) -> [u8; 256] {
    let mut table = [0u8; 256];
    for (value, out) in table.iter_mut().enumerate() {
        let x = value as f32 / 255.0;
        let raised = f64::from(x).powf(f64::from(gamma)) as f32;
        *out = (raised * 255.0).clamp(0.0, 255.0) as u8;
    }
    table
}

/// The fixed-point shifts of OpenCV's 8-bit Lab conversion.
const XYZ_SHIFT: u32 = 12;
const GAMMA_SHIFT: u32 = 3;
const LAB_SHIFT2: u32 = XYZ_SHIFT + GAMMA_SHIFT;
/// sRGB's linear values in fixed point reach 255 << GAMMA_SHIFT.
const LINEAR_TOP: i32 = 255 << GAMMA_SHIFT;
/// The Y row of OpenCV's sRGB-to-XYZ matrix (D65; Y's white is 1), red, green, blue.
const SRGB_TO_Y: [f64; 3] = [0.212671, 0.715160, 0.072169];

/// The tables OpenCV's `initLabTabs` builds for 8-bit Lab: sRGB's 8-bit values made
/// linear (`sRGBGammaTab_b`), and the cube root of a fixed-point Y (`LabCbrtTab_b`, as
/// far as an 8-bit colour's Y reaches).
struct LabTables {
    linear: [i32; 256],
    cube_root: Vec<i32>,
    /// Y's weights of the first, second and third byte, which OpenCV reads as blue,
    /// green and red.
    weights: [i32; 3],
}

fn lab_tables() -> &'static LabTables {
    static TABLES: OnceLock<LabTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let fixed = |c: f64| (c * f64::from(1 << XYZ_SHIFT)).round_ties_even() as i32;
        let [red, green, blue] = SRGB_TO_Y.map(fixed);
        LabTables {
            linear: std::array::from_fn(|v| srgb_to_linear(v as u8)),
            cube_root: (0..=LINEAR_TOP).map(cube_root_entry).collect(),
            weights: [blue, green, red],
        }
    })
}

/// `sRGBGammaTab_b[v]`: sRGB's transfer undone in double precision on the float32
/// `v / 255`, rounded to float32, times 255 << 3 in float32, rounded half to even.
fn srgb_to_linear(v: u8) -> i32 {
    let x = f64::from(f32::from(v) / 255.0);
    let linear = if x <= 0.04045 {
        x / 12.92
    } else {
        ((x + 0.055) / (1.0 + 0.055)).powf(2.4)
    };
    (LINEAR_TOP as f32 * linear as f32).round_ties_even() as i32
}

/// `LabCbrtTab_b[i]`: L*'s f(Y) of `Y = i / (255 << 3)` in float32 (the linear piece as
/// one fused multiply-add below 216/24389), times 2^15, rounded half to even. OpenCV's
/// float32 cube root keeps the leading 24 bits of a double-precision root (its mantissa
/// truncated, not rounded), and so does this.
fn cube_root_entry(i: i32) -> i32 {
    let x = (1.0f32 / LINEAR_TOP as f32) * i as f32;
    let f = if x < 216.0f32 / 24389.0 {
        x.mul_add(841.0f32 / 108.0, 16.0f32 / 116.0)
    } else {
        truncated_to_f32(f64::from(x).cbrt())
    };
    ((1 << LAB_SHIFT2) as f32 * f).round_ties_even() as i32
}

/// The float32 nearest `x` (positive) towards zero.
fn truncated_to_f32(x: f64) -> f32 {
    let rounded = x as f32;
    if f64::from(rounded) > x {
        f32::from_bits(rounded.to_bits() - 1)
    } else {
        rounded
    }
}

/// The L of OpenCV's 8-bit `COLOR_BGR2LAB` of the bytes `bgr` (the first taken as blue).
pub fn lab_lightness(bgr: [u8; 3]) -> u8 {
    const L_SCALE: i32 = (116 * 255 + 50) / 100;
    const L_SHIFT: i32 = -((16 * 255 * (1 << LAB_SHIFT2) + 50) / 100);
    let tables = lab_tables();
    let y: i32 = bgr
        .iter()
        .zip(tables.weights)
        .map(|(&v, weight)| tables.linear[usize::from(v)] * weight)
        .sum();
    let index = (y + (1 << (XYZ_SHIFT - 1))) >> XYZ_SHIFT;
    let f_y = tables.cube_root[index as usize];
    let lightness = (L_SCALE * f_y + L_SHIFT + (1 << (LAB_SHIFT2 - 1))) >> LAB_SHIFT2;
    lightness.clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn black_and_white_span_the_lightness_and_grey_keeps_its_order() {
        assert_eq!(lab_lightness([0, 0, 0]), 0);
        assert_eq!(lab_lightness([255, 255, 255]), 255);
        let greys: Vec<u8> = (0..=255).map(|v| lab_lightness([v, v, v])).collect();
        assert!(greys.windows(2).all(|w| w[0] <= w[1]), "{greys:?}");
        // Mid grey is L* 53.6, 137 in 8 bits (L * 255 / 100).
        assert_eq!(greys[128], 137);
    }

    #[test]
    fn the_first_byte_weighs_as_blue() {
        // OpenCV's L of pure blue and pure red.
        assert_eq!(lab_lightness([255, 0, 0]), 82);
        assert_eq!(lab_lightness([0, 0, 255]), 136);
    }

    #[test]
    fn a_gamma_of_one_keeps_every_value() {
        // v / 255 * 255 in float32 comes back to v for every byte.
        let table = gamma_table(1.0);
        assert!(table.iter().enumerate().all(|(v, t)| v == usize::from(*t)));
        // A gamma below one brightens, above one darkens.
        assert!(gamma_table(0.5)[64] > table[64] && gamma_table(2.0)[64] < table[64]);
    }

    #[test]
    fn intensity_is_the_brightest_channel() {
        let image = RgbImage::from_fn(3, 1, |x, _| image::Rgb([x as u8 * 40, 200, 7 * x as u8]));
        let map = recolor(&image, Lightness::Intensity, 1.0);
        let table = gamma_table(1.0);
        assert_eq!(map.as_raw(), &vec![table[200]; 3]);
    }
}
