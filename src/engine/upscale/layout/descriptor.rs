//! What spandrel's model descriptor tells of an architecture: its size requirements,
//! the scale, the image channels, the name and the tags.

use super::Architecture;

/// What spandrel's model descriptor makes of an input's size before the network runs
/// (its `SizeRequirements`, which A1111 and ComfyUI meet on every call): sides of at
/// least `minimum` pixels and a multiple of `multiple_of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRequirements {
    pub minimum: i64,
    pub multiple_of: i64,
}

impl SizeRequirements {
    /// The side a `side`-pixel input is padded to.
    pub fn padded(&self, side: i64) -> i64 {
        let multiple = self.multiple_of.max(1);
        let side = side.max(self.minimum);
        side + (multiple - side % multiple) % multiple
    }
}

impl Architecture {
    /// spandrel's size requirements for the architecture.
    pub fn size_requirements(&self) -> SizeRequirements {
        let (minimum, multiple_of) = match *self {
            // The minimum rounds up to the multiple, as spandrel rounds it.
            Architecture::Rrdb { unshuffle, .. } if unshuffle > 1 => (4, 4),
            Architecture::Rrdb { .. } => (2, 1),
            Architecture::Compact { .. }
            | Architecture::Span { .. }
            | Architecture::Plksr { .. }
            | Architecture::RealPlksr { .. } => (0, 1),
            Architecture::Safmn { .. } => (0, 8),
            // spandrel's multiples of 16, which every unshuffle 1, 2 and 4 divides (of
            // the unshuffle too, where it does not); and sides that pool to at least one
            // pixel at the coarsest of the four levels (spandrel fails below).
            Architecture::SafmnBcie { unshuffle, .. } => {
                (8 * unshuffle, lcm(BCIE_MULTIPLE, unshuffle))
            }
            Architecture::SwiftSrgan { .. } | Architecture::DnCnn { .. } => (0, 1),
            // FBCNN replicates its input to multiples of 8 itself, NAFNet pads with zeros to
            // its levels' multiple; DRUNet has spandrel pad.
            Architecture::Fbcnn { .. } | Architecture::NafNet { .. } => (0, 1),
            Architecture::DrUnet { .. } => (0, 8),
            Architecture::SeemoRe { .. } => (16, 1),
            // Odd sides are reflected to even ones inside the network.
            Architecture::MoEsr { .. } => (2, 1),
            Architecture::MoSr { .. } | Architecture::Rcan { .. } | Architecture::Fdat { .. } => {
                (0, 1)
            }
            Architecture::SwinIr { .. }
            | Architecture::Swin2Sr { .. }
            | Architecture::Hat { .. }
            | Architecture::Dat { .. }
            | Architecture::OmniSr { .. }
            | Architecture::Rgt { .. } => (16, 1),
            Architecture::Drct { .. } => (0, 16),
            // Mirrored to whole windows inside the network.
            Architecture::Atd { .. } => (8, 1),
            // Reflected to whole windows inside each block.
            Architecture::Dctlsa { .. } => (16, 1),
            // spandrel's requirement; mirrored by another window side inside.
            Architecture::Craft { .. } => (16, super::craft::PAD_MULTIPLE),
            Architecture::MmRealSr { .. } => (16, 1),
            // spandrel's 16 and multiples of 8 (its three down levels); sides that halve
            // to whole pixels at every down level of other files.
            Architecture::AuraSr(shape) => (16, 8.max(1 << shape.downs)),
            Architecture::Ditn { .. } => (0, super::ditn::PATCH),
            Architecture::ScuNet { .. } => (40, 1),
            Architecture::RealCugan { fast: true, .. } => (40, 4),
            Architecture::RealCugan { .. } => (32, 1),
        };
        SizeRequirements {
            minimum,
            multiple_of,
        }
    }

    /// The factor the network enlarges by.
    pub fn scale(&self) -> i64 {
        match *self {
            Architecture::Rrdb {
                upsamplings,
                unshuffle,
                ..
            } => (1 << upsamplings) / unshuffle,
            Architecture::ScuNet { .. }
            | Architecture::DnCnn { .. }
            | Architecture::DrUnet { .. }
            | Architecture::Fbcnn { .. }
            | Architecture::NafNet { .. } => 1,
            // The x4 networks only (the layout refuses the unshuffled ones).
            Architecture::MmRealSr { .. } => 4,
            Architecture::Compact { scale, .. }
            | Architecture::Span { scale, .. }
            | Architecture::Plksr { scale, .. }
            | Architecture::RealPlksr { scale, .. }
            | Architecture::Safmn { scale, .. }
            | Architecture::MoSr { scale, .. }
            | Architecture::SwinIr { scale, .. }
            | Architecture::Swin2Sr { scale, .. }
            | Architecture::Hat { scale, .. }
            | Architecture::Atd { scale, .. }
            | Architecture::Dctlsa { scale, .. }
            | Architecture::Craft { scale, .. }
            | Architecture::Dat { scale, .. }
            | Architecture::RealCugan { scale, .. }
            | Architecture::Rcan { scale, .. }
            | Architecture::OmniSr { scale, .. }
            | Architecture::Rgt { scale, .. }
            | Architecture::Fdat { scale, .. }
            | Architecture::Ditn { scale, .. }
            | Architecture::Drct { scale, .. }
            | Architecture::MoEsr { scale, .. }
            | Architecture::SeemoRe { scale, .. } => scale,
            Architecture::SafmnBcie { .. } => 1,
            Architecture::SwiftSrgan { upsamplings, .. } => 1 << upsamplings,
            Architecture::AuraSr(shape) => shape.scale(),
        }
    }

    /// Image channels in and out.
    pub fn channels(&self) -> i64 {
        match *self {
            Architecture::Rrdb { channels, .. }
            | Architecture::Compact { channels, .. }
            | Architecture::Span { channels, .. }
            | Architecture::Plksr { channels, .. }
            | Architecture::RealPlksr { channels, .. }
            | Architecture::Safmn { channels, .. }
            | Architecture::MoSr { channels, .. }
            | Architecture::SwinIr { channels, .. }
            | Architecture::Swin2Sr { channels, .. }
            | Architecture::Hat { channels, .. }
            | Architecture::Atd { channels, .. }
            | Architecture::Dctlsa { channels, .. }
            | Architecture::Craft { channels, .. }
            | Architecture::MmRealSr { channels, .. }
            | Architecture::Dat { channels, .. }
            | Architecture::Drct { channels, .. }
            | Architecture::RealCugan { channels, .. }
            | Architecture::Rcan { channels, .. }
            | Architecture::OmniSr { channels, .. }
            | Architecture::Rgt { channels, .. }
            | Architecture::Fdat { channels, .. }
            | Architecture::Ditn { channels, .. }
            | Architecture::ScuNet { channels, .. }
            | Architecture::SafmnBcie { channels, .. }
            | Architecture::MoEsr { channels, .. }
            | Architecture::SwiftSrgan { channels, .. }
            | Architecture::SeemoRe { channels, .. }
            | Architecture::DnCnn { channels, .. }
            | Architecture::DrUnet { channels, .. }
            | Architecture::Fbcnn { channels, .. }
            | Architecture::NafNet { channels, .. } => channels,
            Architecture::AuraSr(shape) => shape.channels,
        }
    }

    /// The architecture's name as users know it.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Rrdb { .. } => "ESRGAN",
            Architecture::Compact { .. } => "RealESRGAN Compact",
            Architecture::Span { .. } => "SPAN",
            Architecture::Plksr { .. } | Architecture::RealPlksr { .. } => "PLKSR",
            Architecture::Safmn { .. } => "SAFMN",
            Architecture::MoSr { .. } => "MoSR",
            Architecture::SwinIr { .. } => "SwinIR",
            Architecture::Swin2Sr { .. } => "Swin2SR",
            Architecture::Hat { .. } => "HAT",
            Architecture::Atd { .. } => "ATD",
            Architecture::Dctlsa { .. } => "DCTLSA",
            Architecture::Craft { .. } => "CRAFT",
            Architecture::MmRealSr { .. } => "MMRealSR",
            Architecture::AuraSr(_) => "AuraSR",
            Architecture::Dat { .. } => "DAT",
            Architecture::Drct { .. } => "DRCT",
            Architecture::RealCugan { .. } => "RealCUGAN",
            Architecture::Rcan { .. } => "RCAN",
            Architecture::OmniSr { .. } => "OmniSR",
            Architecture::Rgt { .. } => "RGT",
            Architecture::Fdat { .. } => "FDAT",
            Architecture::Ditn { .. } => "DITN",
            Architecture::ScuNet { .. } => "SCUNet",
            Architecture::SafmnBcie { .. } => "SAFMN BCIE",
            Architecture::MoEsr { .. } => "MoESR",
            Architecture::SwiftSrgan { .. } => "Swift-SRGAN",
            Architecture::SeemoRe { .. } => "SeemoRe",
            Architecture::DnCnn { .. } => "DnCNN",
            Architecture::DrUnet { .. } => "DRUNet",
            Architecture::Fbcnn { .. } => "FBCNN",
            Architecture::NafNet { .. } => "NAFNet",
        }
    }

    /// spandrel's tags: feature width, blocks or convolutions, `unshuffle`.
    pub fn tags(&self) -> Vec<String> {
        match *self {
            Architecture::Rrdb {
                features,
                blocks,
                unshuffle,
                ..
            } => {
                let mut tags = vec![format!("{features}nf"), format!("{blocks}nb")];
                if unshuffle > 1 {
                    tags.push("unshuffle".into());
                }
                tags
            }
            Architecture::Compact {
                features, convs, ..
            } => vec![format!("{features}nf"), format!("{convs}nc")],
            Architecture::Span { features, .. } => vec![format!("{features}nf")],
            Architecture::Plksr {
                features,
                blocks,
                kernel,
                mixer,
                ..
            } => vec![
                format!("{features}dim"),
                format!("{blocks}nb"),
                format!("{kernel}ks"),
                mixer.name().to_string(),
            ],
            Architecture::RealPlksr {
                features,
                blocks,
                kernel,
                layer_norm,
                dysample,
                ..
            } => {
                let mut tags = vec![
                    format!("{features}dim"),
                    format!("{blocks}nb"),
                    format!("{kernel}ks"),
                    "Real".to_string(),
                ];
                if dysample {
                    tags.push("DySample".into());
                }
                if layer_norm {
                    tags.push("LayerNorm".into());
                }
                tags
            }
            Architecture::Safmn {
                features, blocks, ..
            } => vec![format!("{features}dim"), format!("{blocks}nb")],
            // spandrel gives MoSR and AuraSR no tags.
            Architecture::MoSr { .. } | Architecture::AuraSr(_) => Vec::new(),
            Architecture::SwinIr { .. } => self.swinir_tags(),
            Architecture::Swin2Sr { .. } => self.swin2sr_tags(),
            Architecture::Hat { .. } => self.hat_tags(),
            Architecture::Atd { .. } => self.atd_tags(),
            Architecture::Dctlsa { features, .. } => vec![
                format!("{features}nf"),
                format!("{}nm", super::dctlsa::MODULES),
                format!("{}nh", super::dctlsa::HEADS),
            ],
            Architecture::Craft { .. } => self.craft_tags(),
            Architecture::MmRealSr { .. } => self.mmrealsr_tags(),
            Architecture::Dat { .. } => self.dat_tags(),
            Architecture::Drct { .. } => self.drct_tags(),
            Architecture::RealCugan { fast, pro, .. } => [(pro, "pro"), (fast, "fast")]
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, tag)| tag.to_string())
                .collect(),
            Architecture::Rcan { .. } => self.rcan_tags(),
            Architecture::OmniSr { .. } => self.omnisr_tags(),
            Architecture::Fdat { .. } => self.fdat_tags(),
            // spandrel writes "60dim" whatever the width; the listing tells the width.
            Architecture::Ditn { features, .. } => vec![format!("{features}dim")],
            Architecture::SafmnBcie {
                features,
                groups,
                blocks,
                unshuffle,
                ..
            } => vec![
                format!("{features}dim"),
                format!("{blocks}nl"),
                format!("{groups}nb"),
                format!("{unshuffle}uf"),
            ],
            Architecture::MoEsr {
                features,
                groups,
                blocks,
                upsampler,
                ..
            } => vec![
                format!("{features}dim"),
                format!("{groups}nbs"),
                format!("{blocks}nb"),
                upsampler.name().to_string(),
            ],
            Architecture::SwiftSrgan {
                features, blocks, ..
            } => vec![format!("{features}nf"), format!("{blocks}nb")],
            Architecture::SeemoRe { .. } => self.seemore_tags(),
            Architecture::DnCnn {
                features,
                layers,
                noise_map,
                ..
            } => {
                let own = [format!("{features}nc"), format!("{layers}nb")];
                noise_map
                    .then(|| "FDnCNN".to_string())
                    .into_iter()
                    .chain(own)
                    .collect()
            }
            Architecture::DrUnet { unet, .. } => vec![format!("{}nb", unet.blocks)],
            Architecture::NafNet { features, .. } => vec![format!("{features}w")],
            // spandrel gives SCUNet, RGT and FBCNN no tags.
            Architecture::ScuNet { .. } | Architecture::Rgt { .. } | Architecture::Fbcnn { .. } => {
                Vec::new()
            }
        }
    }
}

/// SAFMN-BCIE's side multiple in spandrel's size requirements.
const BCIE_MULTIPLE: i64 = 16;

/// The least common multiple of two positive numbers.
fn lcm(a: i64, b: i64) -> i64 {
    let gcd = |mut x: i64, mut y: i64| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}
