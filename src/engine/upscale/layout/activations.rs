//! What a tile of each architecture holds at the network's peak, for fitting tiles into
//! a memory budget.

use super::uni_upsample::DYSAMPLE_GROUPS;
use super::{dysample_groups, mosr, Architecture, MoSrUpsampler, SwinUpsampler, UniUpsampler};

impl Architecture {
    /// Floats alive at the network's peak per input pixel (a rough bound for choosing
    /// tiles): the images in and out, and the widest stage, the body at the input's
    /// resolution (RRDBNet's dense block holds its input and four growths) or the
    /// upsampled features at the output's.
    pub fn peak_floats_per_pixel(&self) -> u64 {
        let out = (self.scale() * self.scale()) as u64;
        let (body, upsampled) = self.stage_floats(out);
        3 + 3 * out + body.max(upsampled)
    }

    /// Floats per input pixel of the body and of the upsampled stage, `out` output
    /// pixels per input pixel: the convolutional networks here, the attention networks
    /// in [`Self::attention_stage_floats`].
    fn stage_floats(&self, out: u64) -> (u64, u64) {
        match *self {
            Architecture::Rrdb { .. } | Architecture::MmRealSr { .. } => {
                self.dense_stage_floats(out)
            }
            Architecture::Compact { features, .. } => (2 * features as u64, 9 * out),
            // The block outputs kept for the concatenation and the concatenation itself.
            Architecture::Span { features, .. } => (10 * features as u64, 6 * out),
            // The block's input, the mixer's doubled width and the attention's product.
            Architecture::Plksr { features, .. } => (6 * features as u64, 6 * out),
            // As PLKSR; DySample adds the offsets, their scope and coordinates, and the
            // sampled sub-pixel channels before the last convolution.
            Architecture::RealPlksr {
                features,
                dysample,
                scale,
                ..
            } => {
                let upsampled = match dysample {
                    true => (8 * dysample_groups(scale) + 3 * scale * scale + 3) as u64 * out,
                    false => 6 * out,
                };
                (6 * features as u64, upsampled)
            }
            // The block's input, its norm, the levels, their concatenation and the
            // modulated product, the mixer's width twice.
            Architecture::Safmn {
                features,
                ffn_hidden,
                ..
            } => ((5 * features + 2 * ffn_hidden) as u64, 6 * out),
            // A gated block's input and norm, the doubled projection, the gate's product
            // and its concatenation, the groups' input; the upsampler's.
            Architecture::MoEsr {
                features,
                hidden,
                upsampler,
                upsample_features,
                ..
            } => (
                (4 * features + 4 * hidden) as u64,
                uni_upsampled(upsampler, [features, upsample_features]) * out,
            ),
            // As SAFMN, on the unshuffled image; the features shuffled back.
            Architecture::SafmnBcie {
                features,
                ffn_hidden,
                unshuffle,
                ..
            } => (
                ((5 * features + 2 * ffn_hidden) as u64).div_ceil((unshuffle * unshuffle) as u64),
                2 * features as u64,
            ),
            // The first layer's output kept, a block's input and its two layers' outputs;
            // the last round's convolution and its shuffled copy, the image's sub-pixels.
            // A group's input and norm, the doubled projection, the features, key and its
            // calibration, the expert's output, the feed-forward's doubled width; the
            // shuffle's input and output.
            Architecture::SeemoRe { features, .. } => (12 * features as u64, 6 * out),
            // A layer's input and output and the image kept for the residual.
            Architecture::DnCnn { features, .. } => (3 * features as u64, 0),
            // At each level (a quarter of the pixels of the one above): its skip, a
            // block's input, its two convolutions' outputs and the sum.
            Architecture::DrUnet { unet, .. } | Architecture::Fbcnn { unet, .. } => {
                let levels = unet.widths.iter().zip([1u64, 4, 16, 64]);
                let floats = levels.map(|(width, area)| (5 * *width as u64).div_ceil(area));
                (floats.sum(), 0)
            }
            // A block's input, its norm, the doubled expansion and its depthwise output,
            // the gated half and the attention's product; the skips of the levels below
            // (a quarter of the pixels and twice the width each) about as much again.
            Architecture::NafNet { features, .. } => (12 * features as u64, 0),
            Architecture::SwiftSrgan { features, .. } => {
                (5 * features as u64, (2 * features + 3) as u64 * out)
            }
            // The block's input and norm, the doubled projection, the gate's product and
            // its concatenation, the shortcut; the ensemble's eight predictions.
            Architecture::MoSr {
                features,
                hidden,
                channels,
                upsampler,
                ..
            } => {
                let upsampled = match upsampler {
                    MoSrUpsampler::PixelShuffle => channels + 3,
                    MoSrUpsampler::GeometricEnsemble => mosr::ENSEMBLE * channels + 3,
                    MoSrUpsampler::DySample => 8 * mosr::DYSAMPLE_GROUPS + features + 3,
                };
                ((4 * features + 4 * hidden) as u64, upsampled as u64 * out)
            }
            // A block's input, its activation, the projection in and its convolution (the
            // gated feed-forward's doubled width), the product; the shuffle's input.
            Architecture::Ditn {
                features,
                ffn_hidden,
                ..
            } => ((4 * features + 5 * ffn_hidden) as u64, 2 * out),
            // AuraSR's U-Net: every down level's six block outputs kept for the up path, and a block's
            // input, its two convolutions' outputs and the residual at the first level;
            // the same at the output's resolution.
            Architecture::AuraSr(shape) => {
                let down = shape.down_widths();
                let kept: i64 = (0..shape.downs).map(|i| (6 * down[i]) >> (2 * i)).sum();
                ((kept + 4 * 2 * down[0]) as u64, 4 * shape.dim as u64 * out)
            }
            // Fixed widths: the U-Nets' 64-channel maps at twice the input's resolution
            // (a few alive at once), their 128- and 256-channel ones below.
            Architecture::RealCugan { .. } => (1024, 6 * out),
            // A block's input, its two convolutions' outputs and the group's input (at the
            // unshuffled resolution); a round's convolution and its shuffled copy.
            Architecture::Rcan {
                features,
                unshuffle,
                ..
            } => (
                (4 * features as u64).div_ceil((unshuffle * unshuffle) as u64),
                2 * features as u64 * out,
            ),
            Architecture::SwinIr { .. }
            | Architecture::Swin2Sr { .. }
            | Architecture::Hat { .. }
            | Architecture::Atd { .. }
            | Architecture::Dctlsa { .. }
            | Architecture::Craft { .. }
            | Architecture::Dat { .. }
            | Architecture::Drct { .. }
            | Architecture::OmniSr { .. }
            | Architecture::Rgt { .. }
            | Architecture::Fdat { .. }
            | Architecture::ScuNet { .. } => self.attention_stage_floats(out),
        }
    }

    /// [`Self::stage_floats`] of the attention networks.
    fn attention_stage_floats(&self, out: u64) -> (u64, u64) {
        match *self {
            // The tokens, their norm, q/k/v and the attention's product, the MLP, and
            // each window's scores with their softmax.
            Architecture::SwinIr {
                features,
                heads,
                window,
                mlp_hidden,
                upsample_features,
                ..
            } => (
                (10 * features + 2 * mlp_hidden + 2 * heads * window * window) as u64,
                3 * upsample_features.max(3) as u64 * out,
            ),
            // As SwinIR, and the bicubic branch's features at the output's resolution.
            Architecture::Swin2Sr {
                features,
                heads,
                window,
                mlp_hidden,
                upsample_features,
                auxiliary,
                ..
            } => (
                (10 * features + 2 * mlp_hidden + 2 * heads * window * window) as u64,
                (3 + u64::from(auxiliary)) * upsample_features.max(3) as u64 * out,
            ),
            // As SwinIR, and the unfolded keys and values of the overlapping windows
            // with their scores.
            Architecture::Hat {
                features,
                heads,
                window,
                overlap_window,
                mlp_hidden,
                upsample_features,
                ..
            } => {
                let overlap = overlap_window * overlap_window;
                let unfolded = 2 * features * overlap / (window * window).max(1);
                (
                    (10 * features + 2 * mlp_hidden + 2 * heads * overlap + unfolded) as u64,
                    3 * upsample_features as u64 * out,
                )
            }
            // The tokens, their norm, q/k/v and its sorted copy, the three attentions'
            // outputs, the feed-forward's width twice, the scores of each window and of
            // each category group with their softmax, the dictionary similarities.
            Architecture::Atd {
                features,
                heads,
                window,
                mlp_hidden,
                tokens,
                category,
                upsampler,
                ..
            } => {
                let scores = 2 * heads * (window * window + category) + 3 * tokens;
                let upsampled = match upsampler {
                    SwinUpsampler::PixelShuffleDirect | SwinUpsampler::Residual => 6,
                    _ => 3 * super::atd::UPSAMPLE_FEATURES,
                };
                (
                    (14 * features + 3 * mlp_hidden + scores) as u64,
                    upsampled as u64 * out,
                )
            }
            // The dense concatenation (up to six widths), a block's input, its local
            // module's three maps, q/k/v, the attention's output and the MLP's doubled
            // width; the upsampler's convolution and its shuffled copy.
            Architecture::Dctlsa { features, .. } => ((17 * features) as u64, 6 * out),
            Architecture::Craft { .. } | Architecture::Dat { .. } | Architecture::Rgt { .. } => {
                self.rectangle_window_stage_floats(out)
            }
            // As SwinIR at the dense group's widest, the group's input and growths kept
            // for the concatenation.
            Architecture::Drct {
                features,
                heads,
                window,
                growth,
                mlp_hidden,
                upsample_features,
                ..
            } => {
                let widest = features + 4 * growth;
                (
                    (12 * widest + 2 * mlp_hidden + 2 * heads * window * window) as u64,
                    3 * upsample_features.max(3) as u64 * out,
                )
            }
            // The block's input and norm, q/k/v before and after their depthwise
            // convolution, the attention's output, the gated feed-forward's doubled
            // width twice; each window's scores (four heads) with their softmax.
            Architecture::OmniSr {
                features, window, ..
            } => ((12 * features + 2 * 4 * window * window) as u64, 6 * out),
            // As DAT, at the unshuffled resolution; at the output's, the upsampler's
            // inner width a few times over, DySample's offsets and sampled groups, the
            // deformable attention's nine sampled keys and values.
            Architecture::Fdat {
                features,
                heads,
                window,
                ffn_hidden,
                upsampler,
                upsample_features,
                unshuffle,
                ..
            } => {
                let body = 12 * features + 2 * ffn_hidden + 2 * heads * window * window;
                (
                    (body / (unshuffle * unshuffle)) as u64,
                    uni_upsampled(upsampler, [features, upsample_features]) * out,
                )
            }
            // At the full resolution: the skip kept, a block's split, branches, q/k/v,
            // MLP and scores (a head per 64 channels), about 14 per channel, twice over
            // for the padding to 64 pixels (which can double a tile's area).
            Architecture::ScuNet { features, .. } => ((28 * features) as u64, 0),
            // The convolutional networks are sized by `stage_floats`, which sends only
            // the attention networks here.
            _ => (0, 0),
        }
    }
}

impl Architecture {
    /// [`Self::stage_floats`] of RRDBNet and MMRealSR: a dense block's input and four
    /// growths at the input's (or unshuffled) resolution, three feature maps at the
    /// output's.
    fn dense_stage_floats(&self, out: u64) -> (u64, u64) {
        match *self {
            Architecture::Rrdb {
                features,
                growth,
                unshuffle,
                ..
            } => {
                let dense = (4 * features + 4 * growth) as u64;
                (
                    dense.div_ceil((unshuffle * unshuffle) as u64),
                    3 * features as u64 * out,
                )
            }
            // As RRDBNet; the estimator's first stage (its block's input, its two
            // convolutions) beside the trunk at the input's resolution.
            Architecture::MmRealSr {
                features,
                growth,
                estimator_width,
                ..
            } => (
                (4 * features + 4 * growth + 3 * estimator_width) as u64,
                3 * features as u64 * out,
            ),
            _ => (0, 0),
        }
    }

    /// [`Self::attention_stage_floats`] of the rectangle-window networks.
    fn rectangle_window_stage_floats(&self, out: u64) -> (u64, u64) {
        match *self {
            // The feature map, its tokens, their norm, q/k/v rolled, both orientations'
            // scores with their softmax, the depthwise branch and the MLP; the
            // enhancement block's halves; the fusion block's norm, q and k/v before and
            // after their depthwise convolutions, its gated feed-forward's doubled width
            // twice (2.66 times the width); the upsampler's convolution and its shuffled
            // copy.
            Architecture::Craft {
                features,
                heads,
                split,
                mlp_hidden,
                ..
            } => (
                (28 * features + mlp_hidden + 2 * heads * split[0] * split[1]) as u64,
                6 * out,
            ),
            // The tokens, their norm, q/k/v padded and rolled, both orientations'
            // scores with their softmax, the convolution branch and the FFN.
            Architecture::Dat {
                features,
                heads,
                split,
                ffn_hidden,
                upsample_features,
                ..
            } => (
                (12 * features + 2 * ffn_hidden + 2 * heads * split[0] * split[1]) as u64,
                3 * upsample_features.max(3) as u64 * out,
            ),
            // As DAT, the recursive attention's reduced map being small.
            Architecture::Rgt {
                features,
                heads,
                split,
                mlp_hidden,
                ..
            } => (
                (12 * features + 2 * mlp_hidden + 2 * heads * split[0] * split[1]) as u64,
                3 * 64 * out,
            ),
            _ => (0, 0),
        }
    }
}

/// Floats per output pixel of one of `UniUpsample`'s upsamplers on `features` with the
/// inner width `inner`: a few copies of the inner width, DySample's offsets and sampled
/// groups, the deformable attention's nine sampled keys and values.
fn uni_upsampled(upsampler: UniUpsampler, [features, inner]: [i64; 2]) -> u64 {
    let inner = inner.max(features);
    let floats = match upsampler {
        UniUpsampler::Lda => 25 * inner,
        UniUpsampler::DySample => 8 * DYSAMPLE_GROUPS + inner + 3,
        UniUpsampler::Conv | UniUpsampler::PixelShuffleDirect => 6,
        _ => 3 * inner,
    };
    floats as u64
}
