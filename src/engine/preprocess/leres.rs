//! LeReS depth (A1111's `depth_leres`), as controlnet_aux's `LeresDetector` computes it
//! without boost: the image as BGR values of 0–255 normalised by ImageNet's mean and
//! standard deviation, the ResNeXt encoder and LeReS's decoder (feature transfer blocks
//! fused coarse to fine, an adaptive output at the image's size), the depth min-max
//! scaled to 16 bits in float32, OpenCV's `convertScaleAbs` to 8, the near values
//! removed, inverted, the background removed.

use std::path::Path;

use image::{GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::efficientnet::{fold_batch_norm, shape_of, ShapeMap};
use crate::engine::preprocess::image_filters::Param;
use crate::engine::preprocess::resnext::ResNeXt;
use crate::engine::weights::{read_shapes, VarPath, Weights};

/// BatchNorm2d's epsilon.
const BN_EPS: f64 = 1e-5;
/// The side every image side must be a multiple of: the encoder's five halvings meet the
/// decoder's five doublings again.
pub const SIDE_MULTIPLE: u32 = 32;
/// The tensor whose name (after a prefix) marks a LeReS file.
const MARK: &str = "depth_model.decoder_modules.outconv.adapt_conv.0.weight";
/// The encoder's features the decoder reads, as the published decoder hard-codes them.
const FEATURES: [i64; 4] = [256, 512, 1024, 2048];
/// torchvision's `Normalize` of the ImageNet statistics.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// A1111's "Remove Near %" and "Remove Background %": the share of the 8-bit range cut
/// before and after the inversion (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthCuts {
    pub near: Param,
    pub background: Param,
}

impl DepthCuts {
    /// No cut.
    pub const NONE: DepthCuts = DepthCuts {
        near: Param(0.0),
        background: Param(0.0),
    };
}

impl Default for DepthCuts {
    fn default() -> Self {
        Self::NONE
    }
}

/// The prefix a file's LeReS tensors carry (`depth_model.module.` in one `sdxld convert`
/// makes of the published `res101.pth`, none in the model's own state dict), if it holds
/// LeReS.
pub fn network_prefix<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter_map(|name| name.strip_suffix(MARK))
        .find(|prefix| prefix.is_empty() || prefix.ends_with('.'))
        .map(str::to_string)
}

/// A 3×3 convolution with bias (a following batch norm folded in), padded by one.
struct Conv3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3 {
    /// `{name}` taking `input` channels, as many out as stored, `norm` folded in.
    fn load(
        vp: &VarPath,
        shapes: &ShapeMap,
        name: &str,
        input: i64,
        norm: Option<&str>,
    ) -> Result<Self> {
        let out = shape_of(vp, shapes, &format!("{name}.weight"))?[0];
        let weight = vp.get(&format!("{name}.weight"), &[out, input, 3, 3])?;
        let bias = vp.get(&format!("{name}.bias"), &[out])?;
        let (weight, bias) = match norm {
            Some(norm) => fold_batch_norm(&vp.pp(norm), weight, Some(bias), BN_EPS)?,
            None => (weight, bias),
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, Some(&self.bias), [1, 1], [1, 1], [1, 1], 1)
    }

    fn outputs(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// Bilinear ×2 with the corners aligned (`nn.Upsample(scale_factor=2, align_corners=True)`).
fn doubled(x: &Tensor) -> Tensor {
    let s = x.size();
    x.upsample_bilinear2d([s[2] * 2, s[3] * 2], true, None, None)
}

/// A feature transfer block: a convolution, then a residual branch of two. The branch's
/// in-place ReLU also rectifies what it is added to, as the reference's does.
struct TransferBlock {
    conv: Conv3,
    first: Conv3,
    second: Conv3,
}

impl TransferBlock {
    fn load(vp: &VarPath, shapes: &ShapeMap, input: i64) -> Result<Self> {
        let conv = Conv3::load(vp, shapes, "conv1", input, None)?;
        let mid = conv.outputs();
        let first = Conv3::load(vp, shapes, "conv_branch.1", mid, Some("conv_branch.2"))?;
        let second = Conv3::load(vp, shapes, "conv_branch.4", first.outputs(), None)?;
        if second.outputs() != mid {
            return Err(EngineError::InvalidRequest(format!(
                "`{}.conv_branch.4.weight` gives {} channels to add to {mid}",
                vp.prefix(),
                second.outputs()
            )));
        }
        Ok(Self {
            conv,
            first,
            second,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.conv.forward(x).relu();
        let branch = self.second.forward(&self.first.forward(&x).relu());
        (x + branch).relu()
    }
}

/// A feature fusion module: the finer features transferred, the coarser added, transferred
/// again and doubled.
struct FusionModule {
    lateral: TransferBlock,
    fused: TransferBlock,
}

impl FusionModule {
    fn load(vp: &VarPath, shapes: &ShapeMap, input: i64, coarser: i64) -> Result<Self> {
        let lateral = TransferBlock::load(&vp.pp("ftb1"), shapes, input)?;
        let width = lateral.conv.outputs();
        if width != coarser {
            return Err(EngineError::InvalidRequest(format!(
                "`{}.ftb1.conv1.weight` gives {width} channels to add to {coarser}",
                vp.prefix()
            )));
        }
        Ok(Self {
            lateral,
            fused: TransferBlock::load(&vp.pp("ftb2"), shapes, width)?,
        })
    }

    fn forward(&self, finer: &Tensor, coarser: &Tensor) -> Tensor {
        doubled(&self.fused.forward(&(self.lateral.forward(finer) + coarser)))
    }

    fn outputs(&self) -> i64 {
        self.fused.conv.outputs()
    }
}

/// The decoder: the coarsest features transferred and doubled, three fusions, the
/// adaptive output.
struct Decoder {
    top: TransferBlock,
    narrow: Conv3,
    fusions: [FusionModule; 3],
    output: (Conv3, Conv3),
}

impl Decoder {
    fn load(vp: &VarPath, shapes: &ShapeMap) -> Result<Self> {
        let top = TransferBlock::load(&vp.pp("conv"), shapes, FEATURES[3])?;
        let narrow = Conv3::load(vp, shapes, "conv1", top.conv.outputs(), None)?;
        let ffm2 = FusionModule::load(&vp.pp("ffm2"), shapes, FEATURES[2], narrow.outputs())?;
        let ffm1 = FusionModule::load(&vp.pp("ffm1"), shapes, FEATURES[1], ffm2.outputs())?;
        let ffm0 = FusionModule::load(&vp.pp("ffm0"), shapes, FEATURES[0], ffm1.outputs())?;
        let out = vp.pp("outconv.adapt_conv");
        let first = Conv3::load(&out, shapes, "0", ffm0.outputs(), Some("1"))?;
        let last = Conv3::load(&out, shapes, "3", first.outputs(), None)?;
        Ok(Self {
            top,
            narrow,
            fusions: [ffm2, ffm1, ffm0],
            output: (first, last),
        })
    }

    /// The depth [N, 1, H, W] of the four features (finest first).
    fn forward(&self, features: &[Tensor], between: &mut Between<'_>) -> Result<Tensor> {
        let mut x = doubled(&self.narrow.forward(&self.top.forward(&features[3])));
        for (fusion, finer) in self.fusions.iter().zip(features[..3].iter().rev()) {
            between()?;
            x = fusion.forward(finer, &x);
        }
        let (first, last) = &self.output;
        Ok(doubled(&last.forward(&first.forward(&x).relu())))
    }
}

/// LeReS's depth network with its input and output handling.
pub struct LeresDetector {
    encoder: ResNeXt,
    decoder: Decoder,
    device: Device,
    kind: Kind,
}

impl LeresDetector {
    /// Loads the LeReS network in the file at `path` onto `device` in `kind`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (stored, _) = read_shapes(path)?;
        let names = stored.iter().map(|(name, _)| name.as_str());
        let prefix = network_prefix(names).ok_or_else(|| EngineError::WeightFile {
            path: path.to_path_buf(),
            message: format!("holds no `{MARK}`: not a LeReS network"),
        })?;
        let shapes: ShapeMap = stored.into_iter().collect();
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let model = weights.root().pp(format!("{prefix}depth_model"));
        let encoder = ResNeXt::load(&model.pp("encoder_modules.encoder"), &shapes)?;
        if encoder.widths() != FEATURES {
            return Err(EngineError::WeightFile {
                path: path.to_path_buf(),
                message: format!(
                    "its encoder gives {:?} channels; LeReS's decoder reads {FEATURES:?}",
                    encoder.widths()
                ),
            });
        }
        let decoder = Decoder::load(&model.pp("decoder_modules"), &shapes)?;
        // Batch norms' step counters, and whatever else a checkpoint keeps beside the
        // network (an optimiser's state), feed nothing.
        let network = format!("{prefix}depth_model.");
        weights.check_all_used(|name| {
            name.ends_with("num_batches_tracked") || !name.starts_with(&network)
        })?;
        Ok(Self {
            encoder,
            decoder,
            device,
            kind,
        })
    }

    /// The network's depth [N, 1, H, W] (float32) of normalised input `x` [N, 3, H, W]
    /// (sides multiples of [`SIDE_MULTIPLE`]); `between` is asked before each encoder
    /// block and decoder fusion, and its error ends the pass.
    pub fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let x = x.to_device(self.device).to_kind(self.kind);
        let features = self.encoder.forward(&x, between)?;
        let depth = self.decoder.forward(&features, between)?;
        Ok(depth.to_kind(Kind::Float).to_device(Device::Cpu))
    }

    /// `estimateleres`' input of an RGB image: BGR, 0–255 in float32, less ImageNet's
    /// mean, over its standard deviation, [1, 3, H, W].
    pub fn input(image: &RgbImage) -> Tensor {
        let (width, height) = image.dimensions();
        let pixels = Tensor::from_slice(image.as_raw())
            .view([i64::from(height), i64::from(width), 3])
            .to_kind(Kind::Float)
            .flip([2])
            .permute([2, 0, 1]);
        let mean = Tensor::from_slice(&MEAN.map(|m| m as f32)).view([3, 1, 1]);
        let std = Tensor::from_slice(&STD.map(|s| s as f32)).view([3, 1, 1]);
        ((pixels - mean) / std).unsqueeze(0)
    }

    /// The 8-bit depth map of `image` (sides multiples of [`SIDE_MULTIPLE`]) with `cuts`;
    /// `between` is asked between the network's blocks.
    pub fn detect(
        &self,
        image: &RgbImage,
        cuts: DepthCuts,
        between: &mut Between<'_>,
    ) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        if !(width.is_multiple_of(SIDE_MULTIPLE) && height.is_multiple_of(SIDE_MULTIPLE)) {
            return Err(EngineError::InvalidRequest(format!(
                "LeReS needs sides that are multiples of {SIDE_MULTIPLE}; the image is {width}x{height}"
            )));
        }
        let depth = self
            .forward(&Self::input(image), between)?
            .contiguous()
            .view(-1);
        let depth = Vec::<f32>::try_from(depth)?;
        let map = depth_map(&depth, cuts);
        GrayImage::from_raw(width, height, map)
            .ok_or_else(|| EngineError::Internal("a depth map of another size".into()))
    }
}

/// LeresDetector's map of a depth: min-max scaled to 16 bits in float32 and truncated,
/// `cv2.convertScaleAbs` by 255/65535 (float32, rounded half to even), values not above
/// the near cut zeroed, inverted, values not above the background cut zeroed.
pub fn depth_map(depth: &[f32], cuts: DepthCuts) -> Vec<u8> {
    let (min, max) = depth
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &d| {
            (lo.min(d), hi.max(d))
        });
    let range = max - min;
    let spread = f64::from(range) > f64::EPSILON;
    let alpha = (255.0f64 / 65535.0) as f32;
    // cv2.threshold on 8 bits compares with the floor of the threshold.
    let cut = |share: Param| (f64::from(share.0) / 100.0 * 255.0).floor();
    let (near, background) = (cut(cuts.near), cut(cuts.background));
    depth
        .iter()
        .map(|&d| {
            let sixteen = if spread {
                (65535.0f32 * (d - min) / range) as u16
            } else {
                0
            };
            let mut v = (f32::from(sixteen) * alpha)
                .abs()
                .round_ties_even()
                .min(255.0) as u8;
            if f64::from(v) <= near {
                v = 0;
            }
            v = 255 - v;
            if f64::from(v) <= background {
                v = 0;
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_found_whole_or_not_at_all() {
        let own = ["depth_model.decoder_modules.outconv.adapt_conv.0.weight"];
        assert_eq!(network_prefix(own.into_iter()), Some(String::new()));
        let converted =
            ["depth_model.module.depth_model.decoder_modules.outconv.adapt_conv.0.weight"];
        assert_eq!(
            network_prefix(converted.into_iter()).as_deref(),
            Some("depth_model.module.")
        );
        let other = ["xdepth_model.decoder_modules.outconv.adapt_conv.0.weight"];
        assert_eq!(network_prefix(other.into_iter()), None);
    }

    #[test]
    fn the_map_scales_inverts_and_cuts_as_the_detector_does() {
        let depth = [0.0, 0.25, 0.5, 1.0];
        // 0, 16383.75 → 16383, 32767.5 → 32767, 65535; × 255/65535 rounded.
        assert_eq!(depth_map(&depth, DepthCuts::NONE), [255, 191, 128, 0]);
        let near = DepthCuts {
            near: Param(30.0),
            background: Param(0.0),
        };
        // 76.5 floors to 76: 64 is cut before the inversion, then 255.
        assert_eq!(depth_map(&depth, near), [255, 255, 128, 0]);
        let background = DepthCuts {
            near: Param(0.0),
            background: Param(60.0),
        };
        // 153: 128 and 0 are cut after it.
        assert_eq!(depth_map(&depth, background), [255, 191, 0, 0]);
        // A flat depth is all zeros, inverted to white.
        assert_eq!(depth_map(&[2.0; 3], DepthCuts::NONE), [255; 3]);
    }
}
