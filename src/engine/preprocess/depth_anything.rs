//! Depth Anything (V1 and V2), as transformers' `DepthAnythingForDepthEstimation` runs
//! it: a DINOv2 backbone (`dinov2.rs`), four of its layers reassembled into a feature
//! pyramid (1×1 projections, transposed or strided convolutions), fused from the
//! coarsest level up with pre-activation residual units and bilinear upsampling, and a
//! three-convolution head to one channel of relative (ReLU) or metric (sigmoid × max
//! depth) depth. The sizes come from the model folder's `config.json` as the published
//! checkpoints ship it.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Conv2d;
use crate::engine::preprocess::dinov2::{current_names, Backbone, BackboneConfig};
use crate::engine::preprocess::reassemble::{resized_like, ReassembleLevel};
use crate::engine::weights::{read_shapes, VarPath, Weights};

/// DepthAnythingConfig's values, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DepthAnythingConfig {
    pub backbone_config: BackboneConfig,
    pub patch_size: i64,
    pub reassemble_hidden_size: i64,
    pub reassemble_factors: Vec<f64>,
    pub neck_hidden_sizes: Vec<i64>,
    pub fusion_hidden_size: i64,
    pub head_in_index: i64,
    pub head_hidden_size: i64,
    pub depth_estimation_type: String,
    pub max_depth: Option<f64>,
}

impl Default for DepthAnythingConfig {
    fn default() -> Self {
        Self {
            backbone_config: BackboneConfig::default(),
            patch_size: 14,
            reassemble_hidden_size: 384,
            reassemble_factors: vec![4.0, 2.0, 1.0, 0.5],
            neck_hidden_sizes: vec![48, 96, 192, 384],
            fusion_hidden_size: 64,
            head_in_index: -1,
            head_hidden_size: 32,
            depth_estimation_type: "relative".into(),
            max_depth: None,
        }
    }
}

impl DepthAnythingConfig {
    /// The backbone layers (1-based, 0 the embeddings) the neck reads, checked.
    fn out_indices(&self) -> Result<Vec<i64>> {
        let layers = self.backbone_config.num_hidden_layers;
        let indices = self
            .backbone_config
            .out_indices
            .clone()
            .unwrap_or_else(|| vec![layers]);
        let valid = indices.len() == self.neck_hidden_sizes.len()
            && indices.len() == self.reassemble_factors.len()
            && indices.iter().all(|&i| (0..=layers).contains(&i));
        if !valid {
            return Err(EngineError::InvalidRequest(format!(
                "Depth Anything config: out_indices {indices:?} do not fit {layers} layers and {} neck levels",
                self.neck_hidden_sizes.len()
            )));
        }
        Ok(indices)
    }
}

/// Which Depth Anything a model folder holds. transformers' configs carry no version;
/// the versions differ in the backbone layers the neck reads: the first reads the last
/// four, the second spreads them over the depth (2, 5, 8, 11 of twelve), and metric heads
/// exist only for the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthAnythingVersion {
    First,
    Second,
}

impl DepthAnythingConfig {
    /// The version these sizes are of.
    pub fn version(&self) -> DepthAnythingVersion {
        let layers = self.backbone_config.num_hidden_layers;
        let last_four: Vec<i64> = (layers - 3..=layers).collect();
        let reads_last_four = self.backbone_config.out_indices.as_ref() == Some(&last_four);
        if reads_last_four && self.depth_estimation_type != "metric" {
            DepthAnythingVersion::First
        } else {
            DepthAnythingVersion::Second
        }
    }
}

/// The version of the Depth Anything model folder at `dir`.
pub fn version_of(dir: &Path) -> Result<DepthAnythingVersion> {
    let config: DepthAnythingConfig = crate::engine::files::read_json(&dir.join("config.json"))?;
    Ok(config.version())
}

/// A pre-activation residual unit.
struct Residual {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl Residual {
    fn load(vp: &VarPath, width: i64) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::load(&vp.pp("convolution1"), width, width, 3, 1, 1)?,
            conv2: Conv2d::load(&vp.pp("convolution2"), width, width, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv1.forward(&x.relu());
        let _ = h.relu_();
        let mut out = self.conv2.forward(&h);
        out += x;
        out
    }
}

struct Fusion {
    projection: Conv2d,
    residual1: Residual,
    residual2: Residual,
}

/// Depth Anything: backbone, neck and head.
pub struct DepthAnything {
    backbone: Backbone,
    levels: Vec<ReassembleLevel>,
    fusion: Vec<Fusion>,
    head: [Conv2d; 3],
    head_in: usize,
    /// Sigmoid (metric depth) rather than ReLU (relative) at the end.
    metric: bool,
    /// What the last activation is multiplied by (`max_depth`, 1 when unset or 0).
    max_depth: f64,
    device: Device,
    kind: Kind,
}

impl DepthAnything {
    /// Loads the model folder at `dir` (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: DepthAnythingConfig =
            crate::engine::files::read_json(&dir.join("config.json"))?;
        let file = dir.join("model.safetensors");
        let (shapes, _) = read_shapes(&file)?;
        let table = "backbone.embeddings.position_embeddings";
        let positions = shapes
            .iter()
            .find(|(name, _)| name == table)
            .and_then(|(_, shape)| shape.get(1).copied())
            .ok_or_else(|| EngineError::MissingTensor {
                path: file.clone(),
                name: table.into(),
            })?;
        let weights = Weights::open_renamed(&[file], device, kind, &current_names)?;
        let network = Self::build(&weights.root(), &config, positions, device, kind)?;
        weights.check_all_used(|name| name.ends_with("mask_token"))?;
        Ok(network)
    }

    fn build(
        vp: &VarPath,
        c: &DepthAnythingConfig,
        positions: i64,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let levels = c.neck_hidden_sizes.len();
        let fused = c.fusion_hidden_size;
        let neck = vp.pp("neck");
        let levels_loaded = c
            .neck_hidden_sizes
            .iter()
            .zip(&c.reassemble_factors)
            .enumerate()
            .map(|(i, (&width, &factor))| {
                ReassembleLevel::load(&neck, i, (c.reassemble_hidden_size, width, fused), factor)
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (0..levels)
            .map(|i| {
                let layer = vp.pp(format!("neck.fusion_stage.layers.{i}"));
                Ok(Fusion {
                    projection: Conv2d::load(&layer.pp("projection"), fused, fused, 1, 1, 0)?,
                    residual1: Residual::load(&layer.pp("residual_layer1"), fused)?,
                    residual2: Residual::load(&layer.pp("residual_layer2"), fused)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = vp.pp("head");
        let head_in = usize::try_from(c.head_in_index.rem_euclid(levels as i64)).unwrap_or(0);
        let metric = match c.depth_estimation_type.as_str() {
            "relative" => false,
            "metric" => true,
            other => {
                return Err(EngineError::InvalidRequest(format!(
                    "Depth Anything config: unknown depth_estimation_type `{other}`"
                )))
            }
        };
        Ok(Self {
            backbone: Backbone::load(
                &vp.pp("backbone"),
                &c.backbone_config,
                c.out_indices()?,
                positions,
            )?,
            levels: levels_loaded,
            fusion,
            head: [
                Conv2d::load(&head.pp("conv1"), fused, fused / 2, 3, 1, 1)?,
                Conv2d::load(&head.pp("conv2"), fused / 2, c.head_hidden_size, 3, 1, 1)?,
                Conv2d::load(&head.pp("conv3"), c.head_hidden_size, 1, 1, 1, 0)?,
            ],
            head_in,
            metric,
            max_depth: c.max_depth.filter(|&m| m != 0.0).unwrap_or(1.0),
            device,
            kind,
        })
    }

    /// The patch size: input sides must be multiples of it.
    pub fn patch_size(&self) -> i64 {
        self.backbone.patch_size
    }

    /// The predicted depth [N, H, W] (float32) of normalised pixels [N, 3, H, W] whose
    /// sides are multiples of the patch size; `between` is asked before each backbone
    /// block.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let pixels = pixels.to_device(self.device).to_kind(self.kind);
        let (tokens, (rows, columns)) = self.backbone.forward(&pixels, between)?;
        let features: Vec<Tensor> = tokens
            .iter()
            .zip(&self.levels)
            .map(|(t, level)| {
                let (n, d) = (t.size()[0], t.size()[2]);
                let grid = t
                    .narrow(1, 1, rows * columns)
                    .reshape([n, rows, columns, d])
                    .permute([0, 3, 1, 2]);
                level.forward(&grid.contiguous())
            })
            .collect();
        let fused = self.fuse(features);
        let x = self.head[0].forward(&fused[self.head_in]);
        let size = [
            rows * self.backbone.patch_size,
            columns * self.backbone.patch_size,
        ];
        let x = x.upsample_bilinear2d(size, true, None, None);
        let x = self.head[2].forward(&self.head[1].forward(&x).relu());
        let depth = if self.metric { x.sigmoid() } else { x.relu() } * self.max_depth;
        Ok(depth.squeeze_dim(1).to_kind(Kind::Float))
    }

    /// The fusion stage: from the coarsest level up, each fused with the next finer
    /// level's features and brought to its size (the last doubled).
    fn fuse(&self, features: Vec<Tensor>) -> Vec<Tensor> {
        let reversed: Vec<Tensor> = features.into_iter().rev().collect();
        let mut fused: Vec<Tensor> = Vec::with_capacity(reversed.len());
        for (i, (hidden, layer)) in reversed.iter().zip(&self.fusion).enumerate() {
            let mut x = match fused.last() {
                None => hidden.shallow_clone(),
                Some(previous) => {
                    previous + layer.residual1.forward(&resized_like(hidden, previous))
                }
            };
            x = layer.residual2.forward(&x);
            let size = match reversed.get(i + 1) {
                Some(next) => [next.size()[2], next.size()[3]],
                None => [x.size()[2] * 2, x.size()[3] * 2],
            };
            let x = x.upsample_bilinear2d(size, true, None, None);
            fused.push(layer.projection.forward(&x));
        }
        fused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: i64, out_indices: &[i64], kind: &str) -> DepthAnythingConfig {
        serde_json::from_value(serde_json::json!({
            "backbone_config": {"num_hidden_layers": layers, "out_indices": out_indices},
            "depth_estimation_type": kind,
        }))
        .expect("a config")
    }

    #[test]
    fn the_published_configs_tell_their_version() {
        use DepthAnythingVersion::{First, Second};
        // LiheYoung/depth-anything-{small,base,large}-hf and depth-anything/
        // Depth-Anything-V2-{Small,Base,Large,Metric-Indoor-Small}-hf.
        for (layers, indices, kind, version) in [
            (12, [9, 10, 11, 12], "relative", First),
            (24, [21, 22, 23, 24], "relative", First),
            (12, [3, 6, 9, 12], "relative", Second),
            (24, [5, 12, 18, 24], "relative", Second),
            (40, [10, 20, 30, 40], "relative", Second),
            (12, [3, 6, 9, 12], "metric", Second),
        ] {
            let c = config(layers, &indices, kind);
            assert_eq!(c.version(), version, "{layers} layers reading {indices:?}");
        }
        // No layers named: the last only, as transformers defaults it.
        let none: DepthAnythingConfig = serde_json::from_value(serde_json::json!({})).expect("");
        assert_eq!(none.version(), Second);
    }
}
