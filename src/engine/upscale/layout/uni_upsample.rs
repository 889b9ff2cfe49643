//! The upsamplers spandrel's `UniUpsample` family builds (MoESR's and FDAT's), named by
//! the index of a stored record, and the record itself.

use std::path::Path;

use super::{refusal, Unwrapped};
use crate::engine::error::{EngineError, Result};
use crate::engine::weights::read_tensor;

/// The groups DySample samples in (FDAT's and MoESR's constructors').
pub const DYSAMPLE_GROUPS: i64 = 4;

/// How the features become the image (`UniUpsample`, MoESR's first five; FDAT's
/// `UniUpsampleV3`, all eight), in the order of the record's index (`SampleMods3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniUpsampler {
    /// A 3×3 convolution to the image (every network at scale 1).
    Conv,
    /// A 3×3 convolution to the image's sub-pixels, a pixel shuffle.
    PixelShuffleDirect,
    /// A convolution to the inner width, LeakyReLU, ×2 or ×3 pixel-shuffle rounds, a
    /// convolution to the image.
    PixelShuffle,
    /// ×2 or ×3 nearest rounds between convolutions, LeakyReLU(0.2).
    NearestConv,
    /// DySample's learned sampling (FDAT's after a convolution to the inner width where
    /// it differs).
    DySample,
    /// Transposed convolutions, then a 3×3 convolution.
    TransposeConv,
    /// Local deformable attention upsampling (`LDA_AQU`), then a convolution.
    Lda,
    /// ×2 or ×3 nearest rounds of a convolution with pixel attention, LeakyReLU(0.2)
    /// and a second convolution, then a convolution to the image.
    PixelAttention,
}

impl UniUpsampler {
    pub(super) const ALL: [UniUpsampler; 8] = [
        UniUpsampler::Conv,
        UniUpsampler::PixelShuffleDirect,
        UniUpsampler::PixelShuffle,
        UniUpsampler::NearestConv,
        UniUpsampler::DySample,
        UniUpsampler::TransposeConv,
        UniUpsampler::Lda,
        UniUpsampler::PixelAttention,
    ];

    /// The name the constructor takes (and spandrel's tag).
    pub fn name(&self) -> &'static str {
        match self {
            UniUpsampler::Conv => "conv",
            UniUpsampler::PixelShuffleDirect => "pixelshuffledirect",
            UniUpsampler::PixelShuffle => "pixelshuffle",
            UniUpsampler::NearestConv => "nearest+conv",
            UniUpsampler::DySample => "dysample",
            UniUpsampler::TransposeConv => "transpose+conv",
            UniUpsampler::Lda => "lda",
            UniUpsampler::PixelAttention => "pa_up",
        }
    }

    /// Whether the upsampler can enlarge by `scale` (the constructor raises otherwise;
    /// at scale 1 every upsampler is the plain convolution).
    pub(super) fn takes(&self, scale: i64) -> bool {
        let rounds = scale == 3 || (scale >= 2 && scale.count_ones() == 1);
        match self {
            _ if scale == 1 => true,
            UniUpsampler::Conv => false,
            UniUpsampler::PixelShuffle
            | UniUpsampler::NearestConv
            | UniUpsampler::PixelAttention => rounds,
            UniUpsampler::TransposeConv => (2..=4).contains(&scale),
            UniUpsampler::PixelShuffleDirect | UniUpsampler::DySample | UniUpsampler::Lda => {
                scale > 1
            }
        }
    }
}

/// The seven values of the upsampler's record `key`: a version, the upsampler's index,
/// the scale, widths and channels (FDAT's: input width, image channels, inner width;
/// MoESR's: input width, output channels, inner width), DySample's groups; in bytes.
pub(super) fn meta_record(path: &Path, unwrapped: &Unwrapped, key: &str) -> Result<[u8; 7]> {
    let Some((stored, _, shape)) = unwrapped.iter().find(|(_, n, _)| *n == key) else {
        return Err(refusal(path, key));
    };
    if *shape != [7] {
        return Err(refusal(path, key));
    }
    let values = read_tensor(path, stored, shape)?;
    if values.kind() != tch::Kind::Uint8 {
        return Err(refusal(path, key));
    }
    let mut record = [0u8; 7];
    values
        .f_copy_data(&mut record, 7)
        .map_err(|e| EngineError::Internal(format!("reading `{stored}`: {e}")))?;
    Ok(record)
}
