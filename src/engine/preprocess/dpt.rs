//! DPT depth estimation as transformers' `DPTForDepthEstimation` runs it (Intel/dpt-large,
//! Intel/dpt-hybrid-midas and models shaped like them): patches and a class token with
//! position embeddings resized to the grid, pre-norm ViT layers whose chosen outputs are
//! reassembled into a pyramid (the class token ignored, added or projected in, 1×1
//! projections, transposed or strided convolutions), fused from the coarsest level up
//! (each doubled; a finer level that does not match is resized to it), and a head that
//! doubles once more to one channel of ReLU depth. DPT-Hybrid's tokens come from a BiT
//! backbone's last stage instead of patches, and its first two stages are the pyramid's
//! two finest levels; it takes inputs of its `image_size` only. Backbone-config models
//! (BEiT, Swin) are refused by name. transformers' ViT DPT takes square grids only, as
//! must inputs here.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::{Conv2d, Linear};
use crate::engine::preprocess::bit::{Bit, BitConfig};
use crate::engine::preprocess::dpt_fusion::{double, FusionStage};
use crate::engine::preprocess::efficientnet::ShapeMap;
use crate::engine::preprocess::reassemble::ReassembleLevel;
use crate::engine::preprocess::vit_layer::{VitLayer, VitSizes};
use crate::engine::weights::{read_shapes, VarPath, Weights};

/// DPTConfig's values, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DptConfig {
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    intermediate_size: i64,
    layer_norm_eps: f64,
    patch_size: i64,
    image_size: i64,
    is_hybrid: bool,
    backbone_config: Option<serde_json::Value>,
    neck_ignore_stages: Vec<i64>,
    backbone_out_indices: Vec<i64>,
    readout_type: String,
    reassemble_factors: Vec<f64>,
    neck_hidden_sizes: Vec<i64>,
    fusion_hidden_size: i64,
    head_in_index: i64,
    use_batch_norm_in_fusion_residual: bool,
}

impl Default for DptConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            layer_norm_eps: 1e-12,
            patch_size: 16,
            image_size: 384,
            is_hybrid: false,
            backbone_config: None,
            neck_ignore_stages: vec![0, 1],
            backbone_out_indices: vec![2, 5, 8, 11],
            readout_type: "project".into(),
            reassemble_factors: vec![4.0, 2.0, 1.0, 0.5],
            neck_hidden_sizes: vec![96, 192, 384, 768],
            fusion_hidden_size: 256,
            head_in_index: -1,
            use_batch_norm_in_fusion_residual: false,
        }
    }
}

/// How the class token reaches the patch tokens.
pub enum Readout {
    Ignore,
    Add,
    Project(Linear),
}

/// Where the tokens come from.
enum Embedding {
    /// ViT patches.
    Patches(Conv2d),
    /// DPT-Hybrid: BiT's last stage projected to tokens, its inputs `side` square.
    Hybrid {
        backbone: Bit,
        projection: Conv2d,
        side: i64,
    },
}

/// DPT-Hybrid's levels taken from its backbone's first two stages.
const HYBRID_DIRECT_LEVELS: usize = 2;

/// DPT: embeddings, layers, neck and head.
pub struct Dpt {
    embedding: Embedding,
    class_token: Tensor,
    positions: Tensor,
    layers: Vec<VitLayer>,
    read: Vec<usize>,
    heads: i64,
    readouts: Vec<Readout>,
    levels: Vec<ReassembleLevel>,
    fusion: FusionStage,
    head: Vec<Conv2d>,
    head_projection: Option<Conv2d>,
    head_in: usize,
    patch_size: i64,
    device: Device,
    kind: Kind,
}

impl Dpt {
    /// Loads the model folder at `dir` (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: DptConfig = crate::engine::files::read_json(&dir.join("config.json"))?;
        let refuse = |why: String| EngineError::WeightFile {
            path: dir.join("config.json"),
            message: format!(
                "{why}; sdxld serves DPT models with a ViT or BiT-hybrid backbone \
                 (as Intel/dpt-large, Intel/dpt-hybrid-midas)"
            ),
        };
        let backbone = config.backbone_config.as_ref().filter(|b| !b.is_null());
        let bit = match (config.is_hybrid, backbone) {
            (false, Some(_)) => {
                return Err(refuse(
                    "a DPT model on another backbone (backbone_config)".into(),
                ))
            }
            (false, None) => None,
            (true, backbone) => {
                let bit: BitConfig = match backbone {
                    Some(value) => serde_json::from_value(value.clone()).map_err(|e| {
                        refuse(format!("a backbone_config that does not read: {e}"))
                    })?,
                    None => BitConfig::default(),
                };
                if let Some(why) = hybrid_unsupported(&config, &bit) {
                    return Err(refuse(format!("a DPT-Hybrid model with {why}")));
                }
                Some(bit)
            }
        };
        let file = dir.join("model.safetensors");
        let (stored, _) = read_shapes(&file)?;
        let shapes: ShapeMap = stored.into_iter().collect();
        let weights = Weights::open(&[file], device, kind)?;
        let network = Self::build(&weights.root(), &config, bit.as_ref(), &shapes)?;
        // The final layer norm and pooler serve classification, not depth.
        weights.check_all_used(|name| {
            name.starts_with("dpt.layernorm.")
                || name.starts_with("dpt.pooler.")
                || name.ends_with("num_batches_tracked")
        })?;
        Ok(network)
    }

    fn build(
        vp: &VarPath,
        c: &DptConfig,
        bit: Option<&BitConfig>,
        shapes: &ShapeMap,
    ) -> Result<Self> {
        let d = c.hidden_size;
        let levels = c.neck_hidden_sizes.len();
        let direct = if bit.is_some() {
            HYBRID_DIRECT_LEVELS
        } else {
            0
        };
        // DPT-Hybrid reads the layers its indices name after the first two.
        let indices = c.backbone_out_indices.get(direct..).unwrap_or_default();
        let mut read: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
        read.sort_unstable();
        read.dedup();
        let valid = levels >= direct
            && read.len() == levels - direct
            && c.reassemble_factors.len() == levels
            && read.iter().all(|&i| (i as i64) < c.num_hidden_layers);
        if !valid {
            return Err(EngineError::InvalidRequest(format!(
                "DPT config: backbone_out_indices {:?} do not fit {} layers and {levels} neck levels",
                c.backbone_out_indices, c.num_hidden_layers
            )));
        }
        let embedding = Self::embedding(vp, c, bit, shapes)?;
        let sizes = VitSizes {
            hidden: d,
            intermediate: c.intermediate_size,
            layer_norm_eps: c.layer_norm_eps,
            key_bias: true,
        };
        let embeddings = vp.pp("dpt.embeddings");
        let table = shapes
            .get("dpt.embeddings.position_embeddings")
            .cloned()
            .unwrap_or_default();
        let neck = vp.pp("neck");
        let readouts = (direct..levels)
            .map(|i| readout(&neck, &c.readout_type, i, d))
            .collect::<Result<Vec<_>>>()?;
        let fused = c.fusion_hidden_size;
        let head = vp.pp("head");
        let head_projection = if shapes.contains_key("head.projection.weight") {
            Some(Conv2d::load(&head.pp("projection"), fused, fused, 3, 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            embedding,
            class_token: embeddings.get("cls_token", &[1, 1, d])?,
            positions: embeddings.get("position_embeddings", &table)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| VitLayer::load(&vp.pp(format!("dpt.encoder.layer.{i}")), sizes))
                .collect::<Result<_>>()?,
            read,
            heads: c.num_attention_heads,
            readouts,
            levels: c
                .neck_hidden_sizes
                .iter()
                .zip(&c.reassemble_factors)
                .enumerate()
                .map(|(i, (&width, &factor))| match i < direct {
                    true => ReassembleLevel::direct(&neck, i, width, fused),
                    false => ReassembleLevel::load(&neck, i, (d, width, fused), factor),
                })
                .collect::<Result<_>>()?,
            fusion: FusionStage::load(
                &neck,
                levels,
                (fused, c.use_batch_norm_in_fusion_residual),
                shapes,
            )?,
            head: vec![
                Conv2d::load(&head.pp("head.0"), fused, fused / 2, 3, 1, 1)?,
                Conv2d::load(&head.pp("head.2"), fused / 2, 32, 3, 1, 1)?,
                Conv2d::load(&head.pp("head.4"), 32, 1, 1, 1, 0)?,
            ],
            head_projection,
            head_in: usize::try_from(c.head_in_index.rem_euclid(levels as i64)).unwrap_or(0),
            patch_size: c.patch_size,
            device: vp.device(),
            kind: vp.kind(),
        })
    }

    /// The patch embedding, or DPT-Hybrid's backbone (its first two stages as wide as
    /// the first two neck levels) and the projection of its last stage.
    fn embedding(
        vp: &VarPath,
        c: &DptConfig,
        bit: Option<&BitConfig>,
        shapes: &ShapeMap,
    ) -> Result<Embedding> {
        let (d, p) = (c.hidden_size, c.patch_size);
        let embeddings = vp.pp("dpt.embeddings");
        let Some(bit) = bit else {
            let patches = embeddings.pp("patch_embeddings.projection");
            return Ok(Embedding::Patches(Conv2d::load(&patches, 3, d, p, p, 0)?));
        };
        let backbone = Bit::load(&embeddings.pp("backbone.bit"), shapes, bit)?;
        let stages = backbone.stage_channels();
        let neck = c.neck_hidden_sizes.get(..HYBRID_DIRECT_LEVELS);
        if stages.get(..HYBRID_DIRECT_LEVELS) != neck {
            return Err(EngineError::InvalidRequest(format!(
                "DPT-Hybrid: the backbone's stages are {stages:?} channels wide; neck_hidden_sizes {:?} begin otherwise",
                c.neck_hidden_sizes
            )));
        }
        let projection = Conv2d::load(
            &embeddings.pp("projection"),
            backbone.out_channels(),
            d,
            1,
            1,
            0,
        )?;
        Ok(Embedding::Hybrid {
            backbone,
            projection,
            side: c.image_size,
        })
    }

    /// The patch size: input sides must be multiples of it.
    pub fn patch_size(&self) -> i64 {
        self.patch_size
    }

    /// The side DPT-Hybrid's inputs must have (its `image_size`); `None` for ViT DPT.
    pub fn fixed_side(&self) -> Option<i64> {
        match &self.embedding {
            Embedding::Patches(_) => None,
            Embedding::Hybrid { side, .. } => Some(*side),
        }
    }

    /// The tokens [N, 1 + rows × columns, D] of pixels, with the position table's grid
    /// resized to the input's (bilinear, corners not aligned), and DPT-Hybrid's
    /// backbone levels.
    fn embed(&self, pixels: &Tensor) -> (Tensor, (i64, i64), Vec<Tensor>) {
        let (patches, backbone_levels) = match &self.embedding {
            Embedding::Patches(conv) => (conv.forward(pixels), Vec::new()),
            Embedding::Hybrid {
                backbone,
                projection,
                ..
            } => {
                let (earlier, last) = backbone.forward(pixels);
                (projection.forward(&last), earlier)
            }
        };
        let (n, d, rows, columns) = {
            let s = patches.size();
            (s[0], s[1], s[2], s[3])
        };
        let tokens = patches.flatten(2, 3).transpose(1, 2);
        let table = self.positions.size()[1] - 1;
        let side = (table as f64).sqrt() as i64;
        let grid = self
            .positions
            .narrow(1, 1, table)
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2])
            .upsample_bilinear2d([rows, columns], false, None, None)
            .permute([0, 2, 3, 1])
            .reshape([1, rows * columns, d]);
        let positions = Tensor::cat(&[self.positions.narrow(1, 0, 1), grid], 1);
        let class = self.class_token.expand([n, 1, d], false);
        let tokens = Tensor::cat(&[class, tokens], 1) + positions;
        (tokens, (rows, columns), backbone_levels)
    }

    /// The predicted depth [N, H, W] (float32) of normalised pixels [N, 3, H, W] with
    /// square sides that are multiples of the patch size (DPT-Hybrid's: its side);
    /// `between` is asked before each layer.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let pixels = pixels.to_device(self.device).to_kind(self.kind);
        let (mut x, (rows, columns), backbone_levels) = self.embed(&pixels);
        let mut kept = Vec::with_capacity(self.read.len());
        for (i, layer) in self.layers.iter().enumerate() {
            if kept.len() == self.read.len() {
                break;
            }
            between()?;
            x = layer.forward(&x, self.heads, None);
            if self.read.contains(&i) {
                kept.push(x.shallow_clone());
            }
        }
        let layer_levels = kept
            .iter()
            .zip(&self.readouts)
            .map(|(t, readout)| read_out(t, readout, rows, columns));
        let features: Vec<Tensor> = backbone_levels
            .into_iter()
            .chain(layer_levels)
            .zip(&self.levels)
            .map(|(t, level)| level.forward(&t))
            .collect();
        let fused = self.fusion.forward(&features);
        let mut x = fused[self.head_in].shallow_clone();
        if let Some(projection) = &self.head_projection {
            x = projection.forward(&x).relu();
        }
        let x = double(&self.head[0].forward(&x));
        let x = self.head[1].forward(&x).relu();
        Ok(self.head[2]
            .forward(&x)
            .relu()
            .squeeze_dim(1)
            .to_kind(Kind::Float))
    }
}

/// Why DPT-Hybrid's settings are not ones transformers runs, if they are not.
fn hybrid_unsupported(c: &DptConfig, bit: &BitConfig) -> Option<String> {
    if let Some(why) = bit.unsupported() {
        return Some(why);
    }
    // BiT's three stages reduce 16-fold; the tokens' grid must be the patches'.
    if c.patch_size != 16 || c.image_size % 16 != 0 || c.image_size < 16 {
        return Some(format!(
            "patch_size {} and image_size {} (its backbone reduces 16-fold)",
            c.patch_size, c.image_size
        ));
    }
    if c.neck_ignore_stages != [0, 1] {
        return Some(format!("neck_ignore_stages {:?}", c.neck_ignore_stages));
    }
    if c.readout_type != "project" {
        return Some(format!("readout_type `{}`", c.readout_type));
    }
    None
}

/// How level `index`'s layer reads its class token.
pub fn readout(neck: &VarPath, readout_type: &str, index: usize, d: i64) -> Result<Readout> {
    match readout_type {
        "ignore" => Ok(Readout::Ignore),
        "add" => Ok(Readout::Add),
        "project" => Ok(Readout::Project(Linear::load(
            &neck.pp(format!("reassemble_stage.readout_projects.{index}.0")),
            2 * d,
            d,
            true,
        )?)),
        other => Err(EngineError::InvalidRequest(format!(
            "DPT config: unknown readout_type `{other}`"
        ))),
    }
}

/// A layer's patch tokens as a [N, D, rows, columns] map, the class token ignored, added
/// or projected in.
pub fn read_out(tokens: &Tensor, readout: &Readout, rows: i64, columns: i64) -> Tensor {
    let s = tokens.size();
    let (n, d) = (s[0], s[2]);
    let class = tokens.narrow(1, 0, 1);
    let patches = tokens.narrow(1, 1, rows * columns);
    let patches = match readout {
        Readout::Ignore => patches,
        Readout::Add => patches + &class,
        Readout::Project(linear) => {
            let expanded = class.expand([n, rows * columns, d], false);
            linear
                .forward(&Tensor::cat(&[&patches, &expanded], 2))
                .gelu("none")
        }
    };
    patches
        .reshape([n, rows, columns, d])
        .permute([0, 3, 1, 2])
        .contiguous()
}
