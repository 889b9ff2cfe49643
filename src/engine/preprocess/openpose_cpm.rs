//! The single-branch network of controlnet_aux's OpenPose hand and face detectors
//! (`open_pose.model.handpose_model`, `open_pose.face.FaceNet`: the same layers, 22 or 71
//! output maps): VGG-19's first twelve convolutions and a CPM convolution, then six
//! stages, each after the first reading the previous stage's maps beside the shared
//! features. Every convolution is followed by a ReLU but each stage's last. Widths,
//! kernels and the stage count are read from the weights (`conv1_1.weight`, or the hand
//! module's `model1_0.conv1_1.weight`).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::openpose::{load_trunk, run_trunk, Conv, ConvFile, Trunk};
use crate::engine::checkpoint::Between;
use crate::engine::error::Result;

/// The layers of the shared trunk, in order (`None`: a 2×2 max pool).
const TRUNK: [Option<&str>; 18] = [
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
    Some("conv4_3"),
    Some("conv4_4"),
    Some("conv5_1"),
    Some("conv5_2"),
    Some("conv5_3_CPM"),
];

/// Whether tensors of these names are a hand or face network's.
pub fn is_cpm<'a>(names: impl Iterator<Item = &'a str>) -> bool {
    let (mut trunk, mut first_stage) = (false, false);
    for name in names {
        let flat = name.rsplit_once('.').map_or(name, |(head, _)| head);
        trunk |= flat.ends_with("conv5_3_CPM");
        first_stage |= flat.ends_with("conv6_2_CPM");
    }
    trunk && first_stage
}

/// How many maps the hand or face network of these tensor shapes gives (its first
/// stage's output width); `None` for tensors of another network.
pub fn cpm_maps(shapes: &[(String, Vec<i64>)]) -> Option<i64> {
    if !is_cpm(shapes.iter().map(|(name, _)| name.as_str())) {
        return None;
    }
    shapes
        .iter()
        .find(|(name, _)| name.ends_with("conv6_2_CPM.weight"))
        .and_then(|(_, shape)| shape.first().copied())
}

/// The face network's maps (70 landmarks and the background).
pub const FACE_MAPS: i64 = 71;
/// The hand network's maps (21 keypoints and the background).
pub const HAND_MAPS: i64 = 22;

/// The hand or face network.
pub struct CpmNetwork {
    trunk: Trunk,
    stages: Vec<Vec<Conv>>,
    maps: i64,
    device: Device,
    kind: Kind,
}

impl CpmNetwork {
    /// Loads the network from its state dict at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let file = ConvFile::open(path, device, kind)?;
        let trunk = load_trunk(&file, &TRUNK)?;
        let mut stages = vec![vec![
            file.conv("conv6_1_CPM", true)?,
            file.conv("conv6_2_CPM", false)?,
        ]];
        let maps = file.shape("conv6_2_CPM.weight").map_or(0, |s| s[0]);
        for stage in (2..).take_while(|s| file.shape(&format!("Mconv1_stage{s}.weight")).is_some())
        {
            let layers = (1..=7)
                .map(|i| file.conv(&format!("Mconv{i}_stage{stage}"), i != 7))
                .collect::<Result<Vec<_>>>()?;
            stages.push(layers);
        }
        file.check_all_used()?;
        Ok(Self {
            trunk,
            stages,
            maps,
            device,
            kind,
        })
    }

    /// How many maps it gives (22 for hands, 71 for faces).
    pub fn maps(&self) -> i64 {
        self.maps
    }

    /// The last stage's maps [N, maps, h/8, w/8] (float32) of pixels [N, 3, h, w] scaled
    /// as the reference scales them (value / 256 - 0.5); `between` is asked before each
    /// stage, and its error ends the pass.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let features = run_trunk(
            &self.trunk,
            pixels.to_device(self.device).to_kind(self.kind),
        );
        let mut input = features.shallow_clone();
        let mut out = features.shallow_clone();
        for stage in &self.stages {
            between()?;
            out = stage.iter().fold(input, |h, c| c.forward(&h));
            input = Tensor::cat(&[&out, &features], 1);
        }
        Ok(out.to_kind(Kind::Float))
    }
}
