//! controlnet_aux's NormalBAE surface-normal network (`normalbae.NNET`, its
//! `scannet.pt`): the EfficientNet encoder, a decoder of four bilinear-upsampling blocks
//! (align_corners, concatenated with the encoder's features, two 3×3 convolutions with
//! batch norm and LeakyReLU each), a coarse 1/8-resolution prediction refined at 1/4,
//! 1/2 and full resolution by per-pixel MLPs, each prediction normalised to unit normals
//! and a concentration. Run as `NormalBaeDetector` runs it: ImageNet-normalised input,
//! the finest normals mapped from [-1, 1] to 8 bits.

use std::path::Path;

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::pixels::unit_range;
use crate::engine::preprocess::efficientnet::{shape_of, EfficientNet, FoldedConv, ShapeMap};
use crate::engine::weights::{read_shapes, Transform, VarPath, Weights};

/// The decoder's batch norm epsilon (PyTorch's default).
const BN_EPS: f64 = 1e-5;
/// ImageNet's mean and standard deviation.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];
/// The encoder stages whose outputs the decoder takes, finest first.
const SKIP_STAGES: [usize; 4] = [0, 1, 2, 4];
/// The side the input's sides must be multiples of: the refinements double the 1/8
/// prediction three times onto the encoder's 1/4 and 1/2 features.
pub const SIDE_MULTIPLE: u32 = 8;

/// The stored name without a checkpoint's `model.` or DataParallel's `module.` prefix.
fn own_name(stored: &str) -> String {
    let name = stored.strip_prefix("model.").unwrap_or(stored);
    name.strip_prefix("module.").unwrap_or(name).to_string()
}

/// Whether tensors of these names are NormalBAE's.
pub fn is_normal_bae<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|name| own_name(name) == "decoder.out_conv_res1.6.weight")
}

/// Upsample to the skip's size, concatenate, two convolution + norm + LeakyReLU.
struct UpBlock {
    first: FoldedConv,
    second: FoldedConv,
}

impl UpBlock {
    fn load(vp: &VarPath, shapes: &ShapeMap) -> Result<Self> {
        Ok(Self {
            first: FoldedConv::load(vp, shapes, "_net.0", "_net.1", 1, BN_EPS)?,
            second: FoldedConv::load(vp, shapes, "_net.3", "_net.4", 1, BN_EPS)?,
        })
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        let size = skip.size();
        let up = x.upsample_bilinear2d([size[2], size[3]], true, None, None);
        let h = self
            .first
            .forward(&Tensor::cat(&[&up, skip], 1))
            .leaky_relu();
        self.second.forward(&h).leaky_relu()
    }
}

/// A per-pixel MLP (1×1 Conv1d layers with ReLUs between) over flattened pixels.
struct Refinement {
    layers: Vec<(Tensor, Tensor)>,
}

impl Refinement {
    fn load(vp: &VarPath, shapes: &ShapeMap) -> Result<Self> {
        let layers = [0, 2, 4, 6]
            .iter()
            .map(|i| {
                let shape = shape_of(vp, shapes, &format!("{i}.weight"))?;
                Ok((
                    vp.get(&format!("{i}.weight"), &shape)?,
                    vp.get(&format!("{i}.bias"), &shape[..1])?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// The refined prediction at `features`' size, from the features and the coarser
    /// prediction, both doubled.
    fn forward(&self, features: &Tensor, coarse: &Tensor) -> Tensor {
        let double = |t: &Tensor| {
            let s = t.size();
            t.upsample_bilinear2d([s[2] * 2, s[3] * 2], true, None, None)
        };
        let map = Tensor::cat(&[double(features), double(coarse)], 1);
        let s = map.size();
        let mut h = map.view([s[0], s[1], -1]);
        let last = self.layers.len() - 1;
        for (i, (weight, bias)) in self.layers.iter().enumerate() {
            h = h.conv1d(weight, Some(bias), [1], [0], [1], 1);
            if i < last {
                h = h.relu();
            }
        }
        normalise(&h).view([s[0], 4, s[2], s[3]])
    }
}

/// `norm_normalize`: the first three channels to unit length, the fourth an ELU + 1.01
/// concentration.
fn normalise(x: &Tensor) -> Tensor {
    let parts = x.split(1, 1);
    let square = |t: &Tensor| t.pow_tensor_scalar(2.0);
    let norm = (square(&parts[0]) + square(&parts[1]) + square(&parts[2])).sqrt() + 1e-10;
    let kappa = parts[3].elu() + 1.0 + 0.01;
    Tensor::cat(
        &[
            &parts[0] / &norm,
            &parts[1] / &norm,
            &parts[2] / &norm,
            kappa,
        ],
        1,
    )
}

/// The NormalBAE network.
pub struct NormalBae {
    encoder: EfficientNet,
    bottleneck: (Tensor, Tensor),
    ups: Vec<UpBlock>,
    coarse: (Tensor, Tensor),
    refinements: Vec<Refinement>,
    device: Device,
    kind: Kind,
}

impl NormalBae {
    /// Loads the network from its state dict at `path` (names as `NNET`'s, with or
    /// without `model.`/`module.` prefixes).
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (stored, _) = read_shapes(path)?;
        let shapes: ShapeMap = stored.into_iter().map(|(n, s)| (own_name(&n), s)).collect();
        let weights = Weights::open_renamed(&[path.to_path_buf()], device, kind, &|name| {
            vec![(own_name(name), Transform::Identity)]
        })?;
        let root = weights.root();
        let decoder = root.pp("decoder");
        let conv = |vp: &VarPath, name: &str| -> Result<(Tensor, Tensor)> {
            let shape = shape_of(vp, &shapes, &format!("{name}.weight"))?;
            Ok((
                vp.get(&format!("{name}.weight"), &shape)?,
                vp.get(&format!("{name}.bias"), &shape[..1])?,
            ))
        };
        let network = Self {
            encoder: EfficientNet::load(&root.pp("encoder.original_model"), &shapes)?,
            bottleneck: conv(&decoder, "conv2")?,
            ups: (1..=4)
                .map(|i| UpBlock::load(&decoder.pp(format!("up{i}")), &shapes))
                .collect::<Result<_>>()?,
            coarse: conv(&decoder, "out_conv_res8")?,
            refinements: [4, 2, 1]
                .iter()
                .map(|r| Refinement::load(&decoder.pp(format!("out_conv_res{r}")), &shapes))
                .collect::<Result<_>>()?,
            device,
            kind,
        };
        // The classifier's batch norm after the head is not part of this network, and
        // the norms' step counters are training state.
        weights.check_all_used(|name| {
            name.starts_with("encoder.original_model.bn2.") || name.ends_with("num_batches_tracked")
        })?;
        Ok(network)
    }

    /// The coarse (1/8) and finest predictions [N, 4, h, w] (float32) of ImageNet-
    /// normalised pixels [N, 3, H, W]: unit normals and their concentration. `between`
    /// is asked before each encoder block, decoder stage and refinement, and its error
    /// ends the pass.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<(Tensor, Tensor)> {
        let _no_grad = tch::no_grad_guard();
        let x = pixels.to_device(self.device).to_kind(self.kind);
        let (stages, head) = self.encoder.forward(&x, between)?;
        let skips: Vec<&Tensor> = SKIP_STAGES.iter().map(|&s| &stages[s]).collect();
        let (weight, bias) = &self.bottleneck;
        let mut d = head.conv2d(weight, Some(bias), [1, 1], [0, 0], [1, 1], 1);
        let mut decoded = Vec::with_capacity(4);
        for (up, skip) in self.ups.iter().zip(skips.iter().rev()) {
            between()?;
            d = up.forward(&d, skip);
            decoded.push(d.shallow_clone());
        }
        let (weight, bias) = &self.coarse;
        let coarse = normalise(&decoded[1].conv2d(weight, Some(bias), [1, 1], [1, 1], [1, 1], 1));
        let mut prediction = coarse.shallow_clone();
        for (refinement, features) in self.refinements.iter().zip(&decoded[1..]) {
            between()?;
            prediction = refinement.forward(features, &prediction);
        }
        Ok((coarse.to_kind(Kind::Float), prediction.to_kind(Kind::Float)))
    }
}

/// `NormalBaeDetector` with its network: the normal map of an RGB image whose sides are
/// multiples of 8, at its size.
pub struct NormalDetector {
    network: NormalBae,
}

impl NormalDetector {
    /// Loads the network at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        Ok(Self {
            network: NormalBae::load(path, device, kind)?,
        })
    }

    /// The map: each pixel's normal (x, y, z) from [-1, 1] to [0, 255] as R, G, B.
    pub fn detect(&self, image: &RgbImage) -> Result<RgbImage> {
        self.detect_between(image, &mut || Ok(()))
    }

    /// [`NormalDetector::detect`] with `between` asked between the network's blocks.
    pub fn detect_between(&self, image: &RgbImage, between: &mut Between<'_>) -> Result<RgbImage> {
        let (width, height) = image.dimensions();
        if width % SIDE_MULTIPLE != 0 || height % SIDE_MULTIPLE != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "normal maps need sides that are multiples of {SIDE_MULTIPLE}, not {width}x{height}"
            )));
        }
        let pixels = unit_range(image);
        let mean = Tensor::from_slice(&MEAN)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&STD)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1]);
        let (_, normals) = self.network.forward(&((pixels - mean) / std), between)?;
        let scaled = ((normals.narrow(1, 0, 3) + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0;
        let bytes = scaled
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .squeeze_dim(0)
            .permute([1, 2, 0])
            .contiguous()
            .to_device(Device::Cpu);
        let data = Vec::<u8>::try_from(bytes.view(-1))?;
        RgbImage::from_raw(width, height, data)
            .ok_or_else(|| EngineError::Internal("a normal map of another size".into()))
    }
}
