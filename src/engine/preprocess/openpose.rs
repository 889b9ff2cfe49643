//! controlnet_aux's OpenPose body network (`open_pose.model.bodypose_model`, the network
//! of its `body_pose_model.pth`): VGG-19's first ten convolutions and two CPM
//! convolutions, then six stages of two branches (part affinity fields and part
//! heatmaps), each stage after the first reading both branches' previous outputs beside
//! the shared features. Every convolution is followed by a ReLU but each branch's last
//! one, except the last stage's heatmap branch, which the reference's list of layers
//! without ReLU misses and so rectifies. Widths, kernels and stage count are read from
//! the weights, stored under the published flat names (`conv1_1.weight`) or the module's
//! (`model0.conv1_1.weight`).

use std::path::{Path, PathBuf};

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::cv_plane::{resize_plane_area, resize_plane_lanczos4};
use crate::engine::preprocess::cv_resize::{resize, Interpolation};
use crate::engine::weights::{read_shapes, Shapes, Transform, Weights};

/// The layers of the shared trunk, in order (`None`: a 2×2 max pool).
const TRUNK: [Option<&str>; 15] = [
    Some("conv1_1"),
    Some("conv1_2"),
    None,
    Some("conv2_1"),
    Some("conv2_2"),
    None,
    Some("conv3_1"),
    Some("conv3_2"),
    Some("conv3_3"),
    Some("conv3_4"),
    None,
    Some("conv4_1"),
    Some("conv4_2"),
    Some("conv4_3_CPM"),
    Some("conv4_4_CPM"),
];

/// A convolution with "same" padding and whether a ReLU follows it.
pub(super) struct Conv {
    weight: Tensor,
    bias: Tensor,
    relu: bool,
}

impl Conv {
    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let pad = self.weight.size()[2] / 2;
        let mut y = x.conv2d(
            &self.weight,
            Some(&self.bias),
            [1, 1],
            [pad, pad],
            [1, 1],
            1,
        );
        if self.relu {
            let _ = y.relu_();
        }
        y
    }
}

/// `smart_resize_k`/`smart_resize`'s choice: area averaging where the sides' sum
/// shrinks, Lanczos4 otherwise.
pub(super) fn shrinks(from: (usize, usize), to: (usize, usize)) -> bool {
    ((to.0 + to.1) as f64) / ((from.0 + from.1) as f64) < 1.0
}

/// One channel of an OpenPose network's output brought back as the reference brings it:
/// enlarged from its `grid` to the `padded` input with Lanczos4 (`smart_resize_k` by the
/// stride), the padding cut to the `scaled` image, then resized to `to` (`smart_resize`'s
/// filter [`shrinks`] picks).
pub(super) fn plane_back(
    plane: &[f32],
    grid: (usize, usize),
    padded: (usize, usize),
    scaled: (usize, usize),
    to: (usize, usize),
) -> Vec<f32> {
    let enlarged = resize_plane_lanczos4(plane, grid, padded.0, padded.1);
    let cut: Vec<f32> = enlarged
        .chunks_exact(padded.0)
        .take(scaled.1)
        .flat_map(|row| row[..scaled.0].iter().copied())
        .collect();
    if shrinks(scaled, to) {
        resize_plane_area(&cut, scaled, to.0, to.1)
    } else {
        resize_plane_lanczos4(&cut, scaled, to.0, to.1)
    }
}

/// controlnet_aux's `smart_resize` of an 8-bit image to `to` (the filter [`shrinks`]
/// picks), the image itself at its own size (as `cv2.resize` copies it).
pub(super) fn smart_resize(image: &RgbImage, to: (usize, usize)) -> RgbImage {
    let from = (image.width() as usize, image.height() as usize);
    if from == to {
        return image.clone();
    }
    let interpolation = if shrinks(from, to) {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    };
    resize(image, to.0 as u32, to.1 as u32, interpolation)
}

/// An OpenPose network's input [1, 3, h, w] for the `(w, h)` plane: the image's BGR
/// values / 256 - 0.5 at its top left, `pad` beyond it.
pub(super) fn bgr_input(image: &RgbImage, (pw, ph): (usize, usize), pad: u8) -> Tensor {
    let mut values = vec![f32::from(pad) / 256.0 - 0.5; 3 * pw * ph];
    for (x, y, pixel) in image.enumerate_pixels() {
        for (c, value) in pixel.0.iter().rev().enumerate() {
            values[(c * ph + y as usize) * pw + x as usize] = f32::from(*value) / 256.0 - 0.5;
        }
    }
    Tensor::from_slice(&values).view([1, 3, ph as i64, pw as i64])
}

/// A VGG trunk's layers in order (`None`: a 2×2 max pool), as both OpenPose networks
/// read them.
pub(super) type Trunk = Vec<Option<Conv>>;

/// Loads the trunk of `layers` (`None`: a pool), every convolution rectified.
pub(super) fn load_trunk(file: &ConvFile, layers: &[Option<&str>]) -> Result<Trunk> {
    layers
        .iter()
        .map(|layer| layer.map(|name| file.conv(name, true)).transpose())
        .collect()
}

/// Runs `trunk` on `x`.
pub(super) fn run_trunk(trunk: &Trunk, x: Tensor) -> Tensor {
    trunk.iter().fold(x, |features, layer| match layer {
        Some(conv) => conv.forward(&features),
        None => features.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
    })
}

/// The convolutions of an OpenPose state dict, by flat name (the published files' and
/// the modules' names alike), with their shapes read from the file.
pub(super) struct ConvFile {
    path: PathBuf,
    shapes: Shapes,
    weights: Weights,
}

impl ConvFile {
    pub(super) fn open(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let weights = Weights::open_renamed(&[path.to_path_buf()], device, kind, &|name| {
            vec![(flat_name(name), Transform::Identity)]
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            shapes,
            weights,
        })
    }

    /// The shape of the tensor of flat name `name`, if stored.
    pub(super) fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.shapes
            .iter()
            .find(|(stored, _)| flat_name(stored) == name)
            .map(|(_, s)| s.clone())
    }

    /// The convolution `name` (its `.weight` and `.bias`), rectified or not.
    pub(super) fn conv(&self, name: &str, relu: bool) -> Result<Conv> {
        let weight = format!("{name}.weight");
        let s = self
            .shape(&weight)
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.path.clone(),
                name: weight.clone(),
            })?;
        let vp = self.weights.root();
        Ok(Conv {
            weight: vp.get(&weight, &s)?,
            bias: vp.get(&format!("{name}.bias"), &s[..1])?,
            relu,
        })
    }

    /// Refuses a file with tensors no layer took.
    pub(super) fn check_all_used(&self) -> Result<()> {
        self.weights.check_all_used(|_| false)
    }
}

/// The flat name of a stored tensor (the module's `modelN_M.` prefix dropped).
fn flat_name(stored: &str) -> String {
    match stored.split_once('.') {
        Some((head, rest))
            if head.starts_with("model")
                && head[5..].chars().all(|c| c.is_ascii_digit() || c == '_') =>
        {
            rest.to_string()
        }
        _ => stored.to_string(),
    }
}

/// Whether tensors of these names are the body network's (flat or module names).
pub fn is_body_pose<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    let (mut first, mut last) = (false, false);
    names.all(|name| {
        let flat = flat_name(name.trim_start_matches("module."));
        first |= flat == "conv1_1.weight";
        last |= flat == "conv5_5_CPM_L1.weight";
        !(first && last)
    });
    first && last
}

/// The body pose network.
pub struct BodyPose {
    trunk: Trunk,
    /// Per stage: (affinity branch, heatmap branch).
    stages: Vec<(Vec<Conv>, Vec<Conv>)>,
    device: Device,
    kind: Kind,
}

impl BodyPose {
    /// Loads the network from its state dict at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let file = ConvFile::open(path, device, kind)?;
        let trunk = load_trunk(&file, &TRUNK)?;
        let stage_count = (2..)
            .take_while(|s| file.shape(&format!("Mconv1_stage{s}_L1.weight")).is_some())
            .count()
            + 1;
        let mut stages = Vec::with_capacity(stage_count);
        for stage in 1..=stage_count {
            let branch = |l: u8| -> Result<Vec<Conv>> {
                let names: Vec<String> = if stage == 1 {
                    (1..=5).map(|i| format!("conv5_{i}_CPM_L{l}")).collect()
                } else {
                    (1..=7)
                        .map(|i| format!("Mconv{i}_stage{stage}_L{l}"))
                        .collect()
                };
                let last = names.len() - 1;
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        // The reference rectifies every output but the branches' last, and
                        // lists the final stage's affinity layer twice instead of its heatmap.
                        let final_heatmap = stage == stage_count && l == 2;
                        file.conv(name, i != last || final_heatmap)
                    })
                    .collect()
            };
            stages.push((branch(1)?, branch(2)?));
        }
        let network = Self {
            trunk,
            stages,
            device,
            kind,
        };
        file.check_all_used()?;
        Ok(network)
    }

    /// The last stage's part affinity fields [N, 38, h/8, w/8] and heatmaps [N, 19, h/8,
    /// w/8] (float32) of pixels [N, 3, h, w] scaled as the reference scales them
    /// (value / 256 - 0.5); `between` is asked before each stage, and its error ends the
    /// pass.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<(Tensor, Tensor)> {
        let _no_grad = tch::no_grad_guard();
        let features = run_trunk(
            &self.trunk,
            pixels.to_device(self.device).to_kind(self.kind),
        );
        let run = |branch: &[Conv], x: &Tensor| {
            branch.iter().fold(x.shallow_clone(), |h, c| c.forward(&h))
        };
        let mut input = features.shallow_clone();
        let mut out = (features.shallow_clone(), features.shallow_clone());
        for (affinity, heatmap) in &self.stages {
            between()?;
            out = (run(affinity, &input), run(heatmap, &input));
            input = Tensor::cat(&[&out.0, &out.1, &features], 1);
        }
        Ok((out.0.to_kind(Kind::Float), out.1.to_kind(Kind::Float)))
    }
}
