//! ZoeDepth metric depth as transformers' `ZoeDepthForDepthEstimation` runs it
//! (Intel/zoedepth-nyu, Intel/zoedepth-kitti, Intel/zoedepth-nyu-kitti): a BEiT
//! backbone's chosen layers reassembled into DPT's pyramid and fused, a relative depth
//! head on the finest level, and the metric bins (see `zoe_bins`) on the bottleneck, the
//! fused levels and the relative head's features.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Conv2d;
use crate::engine::preprocess::beit::{Beit, BeitConfig};
use crate::engine::preprocess::dpt::{read_out, readout, Readout};
use crate::engine::preprocess::dpt_fusion::{double, FusionStage};
use crate::engine::preprocess::efficientnet::ShapeMap;
use crate::engine::preprocess::reassemble::ReassembleLevel;
use crate::engine::preprocess::zoe_bins::{BinsConfig, HeadInputs, MetricHead};
use crate::engine::weights::{read_shapes, VarPath, Weights};

/// ZoeDepthConfig's values for the backbone, neck and relative head, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ZoeConfig {
    backbone_config: Option<serde_json::Value>,
    readout_type: String,
    reassemble_factors: Vec<f64>,
    neck_hidden_sizes: Vec<i64>,
    fusion_hidden_size: i64,
    head_in_index: i64,
    use_batch_norm_in_fusion_residual: bool,
    num_relative_features: i64,
    add_projection: bool,
}

impl Default for ZoeConfig {
    fn default() -> Self {
        Self {
            backbone_config: None,
            readout_type: "project".into(),
            reassemble_factors: vec![4.0, 2.0, 1.0, 0.5],
            neck_hidden_sizes: vec![96, 192, 384, 768],
            fusion_hidden_size: 256,
            head_in_index: -1,
            use_batch_norm_in_fusion_residual: false,
            num_relative_features: 32,
            add_projection: false,
        }
    }
}

/// The relative depth head on the finest fused level.
struct RelativeHead {
    projection: Option<Conv2d>,
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
}

impl RelativeHead {
    fn load(vp: &VarPath, c: &ZoeConfig) -> Result<Self> {
        let (fused, features) = (c.fusion_hidden_size, c.num_relative_features);
        // transformers builds the projection 256 channels wide, whatever the fusion's.
        let projection = match c.add_projection {
            true => Some(Conv2d::load(&vp.pp("projection"), 256, 256, 3, 1, 1)?),
            false => None,
        };
        Ok(Self {
            projection,
            conv1: Conv2d::load(&vp.pp("conv1"), fused, fused / 2, 3, 1, 1)?,
            conv2: Conv2d::load(&vp.pp("conv2"), fused / 2, features, 3, 1, 1)?,
            conv3: Conv2d::load(&vp.pp("conv3"), features, 1, 1, 1, 0)?,
        })
    }

    /// Its features (after the second convolution's ReLU) and the relative depth [N, H, W].
    fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let x = match &self.projection {
            Some(projection) => projection.forward(x).relu(),
            None => x.shallow_clone(),
        };
        let features = self.conv2.forward(&double(&self.conv1.forward(&x))).relu();
        let depth = self.conv3.forward(&features).relu().squeeze_dim(1);
        (features, depth)
    }
}

/// ZoeDepth: backbone, neck, relative head and metric head.
pub struct ZoeDepth {
    backbone: Beit,
    readouts: Vec<Readout>,
    levels: Vec<ReassembleLevel>,
    fusion: FusionStage,
    head_in: usize,
    relative: RelativeHead,
    metric: MetricHead,
    patch_size: i64,
    device: Device,
    kind: Kind,
}

impl ZoeDepth {
    /// Loads the model folder at `dir` (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let value: serde_json::Value = crate::engine::files::read_json(&config_path)?;
        let refuse = |why: String| EngineError::WeightFile {
            path: config_path.clone(),
            message: format!(
                "{why}; sdxld serves ZoeDepth models with a BEiT backbone (as Intel/zoedepth-nyu)"
            ),
        };
        let config: ZoeConfig = parse(value.clone()).map_err(&refuse)?;
        let bins: BinsConfig = parse(value).map_err(&refuse)?;
        let backbone_value = config.backbone_config.clone().unwrap_or_default();
        let backbone_type = backbone_value.get("model_type").and_then(|t| t.as_str());
        if backbone_type.is_some_and(|t| t != "beit") {
            return Err(refuse(format!(
                "a `{}` backbone",
                backbone_type.unwrap_or_default()
            )));
        }
        let backbone: BeitConfig = match config.backbone_config.as_ref() {
            Some(v) => parse(v.clone()).map_err(&refuse)?,
            None => serde_json::from_value(serde_json::json!({
                "image_size": 384, "num_hidden_layers": 24, "hidden_size": 1024,
                "intermediate_size": 4096, "num_attention_heads": 16,
                "use_relative_position_bias": true, "reshape_hidden_states": false,
                "out_features": ["stage6", "stage12", "stage18", "stage24"]
            }))
            .map_err(|e| refuse(e.to_string()))?,
        };
        let why = backbone
            .unsupported()
            .or_else(|| bins.unsupported())
            .or_else(|| neck_unsupported(&config, &backbone));
        if let Some(why) = why {
            return Err(refuse(why));
        }
        let file = dir.join("model.safetensors");
        let (stored, _) = read_shapes(&file)?;
        let shapes: ShapeMap = stored.into_iter().collect();
        let weights = Weights::open(&[file], device, kind)?;
        let network = Self::build(&weights.root(), (&config, &backbone, &bins), &shapes)?;
        // BEiT's final norm and pooler serve classification; its features precede them.
        weights.check_all_used(|name| {
            name.ends_with("relative_position_index")
                || name.starts_with("backbone.layernorm.")
                || name.starts_with("backbone.pooler.")
        })?;
        Ok(network)
    }

    fn build(
        vp: &VarPath,
        (c, backbone, bins): (&ZoeConfig, &BeitConfig, &BinsConfig),
        shapes: &ShapeMap,
    ) -> Result<Self> {
        let (d, fused) = (backbone.hidden_size(), c.fusion_hidden_size);
        let neck = vp.pp("neck");
        let levels = c.neck_hidden_sizes.len();
        Ok(Self {
            backbone: Beit::load(&vp.pp("backbone"), backbone)?,
            readouts: (0..levels)
                .map(|i| readout(&neck, &c.readout_type, i, d))
                .collect::<Result<_>>()?,
            levels: c
                .neck_hidden_sizes
                .iter()
                .zip(&c.reassemble_factors)
                .enumerate()
                .map(|(i, (&width, &factor))| {
                    ReassembleLevel::load(&neck, i, (d, width, fused), factor)
                })
                .collect::<Result<_>>()?,
            fusion: FusionStage::load(
                &neck,
                levels,
                (fused, c.use_batch_norm_in_fusion_residual),
                shapes,
            )?,
            head_in: usize::try_from(c.head_in_index.rem_euclid(levels as i64)).unwrap_or(0),
            relative: RelativeHead::load(&vp.pp("relative_head"), c)?,
            metric: MetricHead::load(
                &vp.pp("metric_head"),
                bins,
                shapes,
                HeadInputs {
                    fused,
                    relative: c.num_relative_features,
                },
            )?,
            patch_size: backbone.patch_size(),
            device: vp.device(),
            kind: vp.kind(),
        })
    }

    /// The patch size: the input's sides are divided by it, rounded down.
    pub fn patch_size(&self) -> i64 {
        self.patch_size
    }

    /// The predicted metric depth [N, H', W'] (float32) of normalised pixels [N, 3, H, W]
    /// whose sides are at least a patch; `between` is asked before each backbone layer.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let pixels = pixels.to_device(self.device).to_kind(self.kind);
        let (states, (rows, columns)) = self.backbone.forward(&pixels, between)?;
        let features: Vec<Tensor> = states
            .iter()
            .zip(&self.readouts)
            .zip(&self.levels)
            .map(|((t, readout), level)| level.forward(&read_out(t, readout, rows, columns)))
            .collect();
        let fused = self.fusion.forward(&features);
        let (relative_features, relative) = self.relative.forward(&fused[self.head_in]);
        let bottleneck = &features[features.len() - 1];
        Ok(self
            .metric
            .forward((&relative_features, &relative), bottleneck, &fused)
            .squeeze_dim(1)
            .to_kind(Kind::Float))
    }
}

/// A config value read, or why it does not read.
fn parse<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> std::result::Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Why the neck's settings are not ones sdxld runs as transformers does, if they are not.
fn neck_unsupported(c: &ZoeConfig, backbone: &BeitConfig) -> Option<String> {
    let levels = c.neck_hidden_sizes.len();
    let indices = backbone.out_indices().unwrap_or_default();
    if levels == 0 || c.reassemble_factors.len() != levels || indices.len() != levels {
        return Some(format!(
            "{levels} neck levels, {} reassemble factors and {} backbone outputs",
            c.reassemble_factors.len(),
            indices.len()
        ));
    }
    // transformers' ZoeDepth adds the class token with a broadcast that fits no grid.
    if !["project", "ignore"].contains(&c.readout_type.as_str()) {
        return Some(format!("readout_type `{}`", c.readout_type));
    }
    if c.add_projection && c.fusion_hidden_size != 256 {
        return Some("add_projection with a fusion width other than 256".into());
    }
    None
}
