//! Super-resolution upscalers (ESRGAN/Real-ESRGAN RRDBNet, SRVGGNetCompact, SPAN,
//! PLKSR, RealPLKSR, SAFMN, MoSR, MoESR, SwinIR, Swin2SR, HAT, ATD, DCTLSA, AuraSR, CRAFT, MMRealSR, DAT, DRCT,
//! Real-CUGAN, RCAN, OmniSR, RGT, FDAT, DITN, Swift-SRGAN, SeemoRe; SCUNet, SAFMN-BCIE, DnCNN, DRUNet,
//! FBCNN and NAFNet restoring at scale 1) loaded
//! from a weight file of any of their published layouts, run tiled on 8-bit RGB images
//! as Real-ESRGAN's `RealESRGANer` runs them (values in [0, 1], the output clamped and
//! rounded to 8 bits). AuraSR draws noise at every call, from a generator of its own
//! seeded per image.

pub mod activation;
pub mod atd;
pub mod aura_sr;
pub mod band_conv;
pub mod channel_attention;
pub mod channel_norm;
pub mod craft;
pub mod dat;
pub mod dctlsa;
pub mod deformable_upsample;
pub mod dense_block;
pub mod ditn;
pub mod dncnn;
pub mod drct;
pub mod drunet;
pub mod dysample;
pub mod fbcnn;
pub mod fdat;
pub mod gated_cnn;
pub mod gated_dconv;
pub mod hat;
pub mod kair;
pub mod layout;
pub mod mmrealsr;
pub mod moesr;
pub mod mosr;
pub mod nafnet;
pub mod nets;
pub mod omnisr;
pub mod patch_conv;
pub mod plksr;
pub mod rcan;
pub mod realcugan;
pub mod rgt;
pub mod rwin;
pub mod safmn;
pub mod safmn_bcie;
pub mod same_conv;
pub mod scunet;
pub mod seemore;
pub mod span;
pub mod swiftsrgan;
pub mod swin;
pub mod swin2sr;
pub mod swinir;
pub mod tiles;
pub mod uni_upsample;
pub mod unit_norm;

use std::path::Path;

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::noise::{NoiseStream, SideGenerator};
use crate::engine::pixels::unit_range;
use crate::engine::weights::{read_shapes, Transform, Weights};
use aura_sr::Draw;
use layout::Architecture;
use nets::Network;
use tiles::{Checkpoint, TilePlan, Tiling};

/// The ends of DAT's and RGT's stored buffers that are computed (index, offsets, masks) or
/// unused at inference (the batch norms' step counts).
const DAT_UNREAD: [&str; 5] = [
    ".relative_position_index",
    ".rpe_biases",
    ".attn_mask_0",
    ".attn_mask_1",
    ".num_batches_tracked",
];

/// A loaded upscaler.
pub struct Upscaler {
    architecture: Architecture,
    network: Network,
    device: Device,
    kind: Kind,
}

impl Upscaler {
    /// Loads the upscaler in `path` onto `device` in `kind`; a file of no known layout is
    /// refused naming the first tensor that did not fit.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let layout = layout::detect(path, &shapes)?;
        let channels = layout.architecture.channels();
        if channels != 3 {
            return Err(EngineError::WeightFile {
                path: path.to_path_buf(),
                message: format!("a {channels}-channel upscaler; only RGB upscalers are served"),
            });
        }
        let names = layout.names;
        let rename = move |stored: &str| match names.get(stored) {
            Some(name) => vec![(name.clone(), Transform::Identity)],
            None => Vec::new(),
        };
        let weights = Weights::open_renamed(&[path.to_path_buf()], device, kind, &rename)?;
        let network = Network::load(&weights.root(), layout.architecture)?;
        // SPAN's folded convolutions and its `no_norm` flag are not read (spandrel
        // folds the convolutions again at every call); the Swin networks' and DAT's index,
        // offset and mask buffers are computed; batch norms keep no step count at
        // inference.
        let architecture = layout.architecture;
        let unread = |name: &str| match architecture {
            Architecture::Span { .. } => name.contains(".eval_conv.") || name == "no_norm",
            Architecture::SwinIr { .. }
            | Architecture::Hat { .. }
            | Architecture::Drct { .. }
            | Architecture::Swin2Sr { .. } => {
                // Swin2SR's log-spaced offsets are computed too.
                name.contains("relative_position_index")
                    || name.ends_with(".attn_mask")
                    || name.ends_with(".relative_coords_table")
            }
            // The window index is computed; the `no_norm` flag is read from its presence.
            Architecture::Atd { .. } => name == "relative_position_index_SA" || name == "no_norm",
            Architecture::Dat { .. } | Architecture::Rgt { .. } => {
                DAT_UNREAD.iter().any(|s| name.ends_with(s))
            }
            // Real-CUGAN's `pro` flag is read from its presence.
            Architecture::RealCugan { .. } => name == layout::realcugan::PRO_KEY,
            // FDAT's upsampler record is read with the layout.
            Architecture::Fdat { .. } => name == layout::fdat::META_KEY,
            Architecture::MoEsr { .. } => name == layout::moesr::META_KEY,
            Architecture::SwiftSrgan { .. } => layout::swiftsrgan::is_unread(name),
            Architecture::Dctlsa { .. } => layout::dctlsa::is_unread(name),
            Architecture::Craft { .. } => layout::craft::is_unread(name),
            // AuraSR's attention keeps a scale its fused attention never reads.
            Architecture::AuraSr(_) => name.ends_with(".attend.scale"),
            Architecture::DnCnn { .. } => layout::kair::is_unread(name),
            _ => false,
        };
        weights.check_all_used(unread)?;
        Ok(Self {
            architecture: layout.architecture,
            network,
            device,
            kind,
        })
    }

    /// The architecture and its hyperparameters.
    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// The factor the network enlarges by.
    pub fn scale(&self) -> i64 {
        self.architecture.scale()
    }

    /// Bytes of activations per input pixel at the network's peak (for fitting tiles).
    fn bytes_per_pixel(&self) -> u64 {
        self.architecture.peak_floats_per_pixel() * self.kind.elt_size_in_bytes() as u64
    }

    /// The tiles `plan` gives this network on its device with `free` bytes of device
    /// memory left (`None`: no budget).
    pub fn tiling(&self, plan: TilePlan, free: Option<u64>) -> Tiling {
        plan.tiling(free, self.bytes_per_pixel(), self.device)
    }

    /// Whether the network draws noise at every call (AuraSR), so that its image depends
    /// on the seed of [`UpscaleNoise`].
    pub fn draws_noise(&self) -> bool {
        matches!(self.architecture, Architecture::AuraSr(_))
    }

    /// The network on an NCHW float batch in [0, 1], in float32 out (not clamped): as
    /// spandrel's descriptor calls it, the input padded to the architecture's size
    /// requirements and the output cropped back; a network that draws noise draws it
    /// from `draw`. `between` is asked between the network's blocks; its error ends the
    /// pass.
    pub fn forward(
        &self,
        image: &Tensor,
        draw: &mut Draw<'_>,
        between: &mut Between<'_>,
    ) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let input = image.to_device(self.device).to_kind(self.kind);
        let padded = pad_to(&input, self.architecture.size_requirements());
        let scale = self.scale();
        Ok(self
            .network
            .forward(&padded, draw, between)?
            .narrow(2, 0, height * scale)
            .narrow(3, 0, width * scale)
            .to_kind(Kind::Float))
    }

    /// `image` enlarged by the network's factor, tile by tile, a network that draws
    /// noise drawing it as `noise` says; `watch` runs before each tile, after the last
    /// and between the network's blocks, and stops the run with its error.
    pub fn upscale(
        &self,
        image: &RgbImage,
        tiling: Tiling,
        noise: UpscaleNoise<'_>,
        watch: &mut dyn FnMut(Checkpoint) -> Result<()>,
    ) -> Result<RgbImage> {
        let _no_grad = tch::no_grad_guard();
        let input = unit_range(image).to_device(self.device);
        let mut generator = SideGenerator::new(noise.seed);
        let mut held = noise.stream;
        // Each draw takes the generator only while it draws, unless the job holds it.
        let mut draw = |shape: &[i64]| match held.as_deref_mut() {
            Some(stream) => generator.randn(stream, shape),
            None => generator.randn(&mut NoiseStream::lock(), shape),
        };
        let mut network =
            |tile: &Tensor, between: &mut Between<'_>| self.forward(tile, &mut draw, between);
        let output = tiles::run(&input, self.scale(), tiling, &mut network, watch)?;
        to_image(&output)
    }
}

/// Where a network that draws noise at every call (AuraSR) draws it: a generator of its
/// own seeded with `seed`, as `torch.manual_seed(seed)` before spandrel's calls over the
/// tiles in order; taken for each draw, or through `stream` where the caller holds it.
pub struct UpscaleNoise<'a> {
    pub seed: u64,
    pub stream: Option<&'a mut NoiseStream>,
}

impl UpscaleNoise<'_> {
    /// Noise from `seed`, the generator taken for each draw.
    pub fn seeded(seed: u64) -> Self {
        Self { seed, stream: None }
    }
}

/// spandrel's `pad_tensor`: `image` padded on the bottom and right to the sides
/// `requirements` ask for, by reflection as far as the image reaches and by replication
/// beyond.
fn pad_to(image: &Tensor, requirements: layout::SizeRequirements) -> Tensor {
    let size = image.size();
    let (height, width) = (size[2], size[3]);
    let (ph, pw) = (
        requirements.padded(height) - height,
        requirements.padded(width) - width,
    );
    if ph == 0 && pw == 0 {
        return image.shallow_clone();
    }
    let (rh, rw) = (ph.min(height - 1), pw.min(width - 1));
    let reflected = match (rh, rw) {
        (0, 0) => image.shallow_clone(),
        _ => image.reflection_pad2d([0, rw, 0, rh]),
    };
    match (ph - rh, pw - rw) {
        (0, 0) => reflected,
        (h, w) => reflected.replication_pad2d([0, w, 0, h]),
    }
}

/// A 1×3×H×W tensor in [0, 1] as 8-bit RGB: clamped, times 255, rounded half to even.
pub fn to_image(output: &Tensor) -> Result<RgbImage> {
    let size = output.size();
    let (height, width) = (size[2], size[3]);
    let bytes = (output.clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .squeeze_dim(0)
        .permute([1, 2, 0])
        .contiguous()
        .to_device(Device::Cpu);
    let count = (width * height * 3) as usize;
    let mut pixels = vec![0u8; count];
    bytes.copy_data(&mut pixels, count);
    RgbImage::from_raw(width as u32, height as u32, pixels)
        .ok_or_else(|| EngineError::Internal(format!("an upscaled image of {width}x{height}")))
}
