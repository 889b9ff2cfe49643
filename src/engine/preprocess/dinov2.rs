//! The DINOv2 ViT backbone as transformers' `Dinov2Backbone` runs it: patch embedding,
//! class token, position embeddings resized with bicubic to the image's patch grid,
//! pre-norm blocks with layer scale and GELU MLPs or SwiGLU, the read layers normalised.
//! Tensors load under transformers' current names or the published checkpoints' older
//! ones.

use tch::{Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{multi_head_attention, Conv2d, LayerNorm, Linear};
use crate::engine::weights::{Transform, VarPath};
use serde::Deserialize;

/// Dinov2Config's values, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BackboneConfig {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub mlp_ratio: f64,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub use_swiglu_ffn: bool,
    pub qkv_bias: bool,
    pub patch_size: i64,
    pub num_channels: i64,
    pub out_indices: Option<Vec<i64>>,
    pub apply_layernorm: bool,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            hidden_act: "gelu".into(),
            use_swiglu_ffn: false,
            qkv_bias: true,
            patch_size: 14,
            num_channels: 3,
            out_indices: None,
            apply_layernorm: true,
        }
    }
}

/// The names (and parts) a tensor of the published checkpoints has under transformers'
/// current names: renamed attention projections, the fused SwiGLU input split in two.
pub fn current_names(stored: &str) -> Vec<(String, Transform)> {
    if let Some(prefix) = stored
        .strip_suffix("mlp.weights_in.weight")
        .map(|p| (p, "weight"))
        .or_else(|| {
            stored
                .strip_suffix("mlp.weights_in.bias")
                .map(|p| (p, "bias"))
        })
    {
        let (prefix, what) = prefix;
        return ["gate_proj", "up_proj"]
            .iter()
            .enumerate()
            .map(|(index, part)| {
                let transform = Transform::Chunk {
                    index: index as i64,
                    count: 2,
                };
                (format!("{prefix}mlp.{part}.{what}"), transform)
            })
            .collect();
    }
    let renamed = [
        ("attention.attention.query.", "attention.q_proj."),
        ("attention.attention.key.", "attention.k_proj."),
        ("attention.attention.value.", "attention.v_proj."),
        ("attention.output.dense.", "attention.o_proj."),
        ("mlp.weights_out.", "mlp.down_proj."),
    ]
    .iter()
    .fold(stored.to_string(), |name, (old, new)| {
        name.replace(old, new)
    });
    vec![(renamed, Transform::Identity)]
}

/// One pre-norm transformer block.
struct Block {
    norm1: LayerNorm,
    /// The query, key and value projections as one [3D, D] matrix (one matmul, not three).
    qkv: (Tensor, Option<Tensor>),
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    scale2: Tensor,
    heads: i64,
}

enum Mlp {
    Gelu(Linear, Linear),
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Block {
    fn load(vp: &VarPath, c: &BackboneConfig) -> Result<Self> {
        let d = c.hidden_size;
        let hidden = (d as f64 * c.mlp_ratio) as i64;
        let attention = vp.pp("attention");
        let parts = ["q_proj", "k_proj", "v_proj"];
        let weights = parts
            .iter()
            .map(|p| attention.pp(p).get("weight", &[d, d]))
            .collect::<Result<Vec<_>>>()?;
        let biases = if c.qkv_bias {
            let biases = parts
                .iter()
                .map(|p| attention.pp(p).get("bias", &[d]))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0))
        } else {
            None
        };
        let mlp = if c.use_swiglu_ffn {
            let inner = (hidden * 2 / 3 + 7) / 8 * 8;
            let mlp = vp.pp("mlp");
            Mlp::SwiGlu {
                gate: Linear::load(&mlp.pp("gate_proj"), d, inner, true)?,
                up: Linear::load(&mlp.pp("up_proj"), d, inner, true)?,
                down: Linear::load(&mlp.pp("down_proj"), inner, d, true)?,
            }
        } else {
            Mlp::Gelu(
                Linear::load(&vp.pp("mlp.fc1"), d, hidden, true)?,
                Linear::load(&vp.pp("mlp.fc2"), hidden, d, true)?,
            )
        };
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("norm1"), d, c.layer_norm_eps)?,
            qkv: (Tensor::cat(&weights, 0), biases),
            out: Linear::load(&attention.pp("o_proj"), d, d, true)?,
            scale1: vp.get("layer_scale1.lambda1", &[d])?,
            norm2: LayerNorm::load(&vp.pp("norm2"), d, c.layer_norm_eps)?,
            mlp,
            scale2: vp.get("layer_scale2.lambda1", &[d])?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.norm1.forward(x);
        let (weight, bias) = &self.qkv;
        let qkv = h.linear(weight, bias.as_ref()).chunk(3, -1);
        let attended = multi_head_attention(&qkv[0], &qkv[1], &qkv[2], self.heads, false);
        // Residual sums and activations in place: fewer full-size temporaries per block.
        let mut x = self.out.forward(&attended) * &self.scale1 + x;
        let h = self.norm2.forward(&x);
        let mut h = match &self.mlp {
            Mlp::Gelu(fc1, fc2) => {
                let mut inner = fc1.forward(&h);
                let _ = inner.gelu_("none");
                fc2.forward(&inner)
            }
            Mlp::SwiGlu { gate, up, down } => {
                let mut gated = gate.forward(&h);
                let _ = gated.silu_();
                down.forward(&(gated * up.forward(&h)))
            }
        };
        h *= &self.scale2;
        x += h;
        x
    }
}

/// The DINOv2 backbone: embeddings, blocks and the final norm of the read layers.
pub struct Backbone {
    patch: Conv2d,
    cls: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    read: Vec<i64>,
    /// The patch side in pixels.
    pub patch_size: i64,
    dim: i64,
}

impl Backbone {
    /// Loads the backbone reading layers `read` (1-based, 0 the embeddings);
    /// `positions` is the stored position table's token count.
    pub fn load(vp: &VarPath, b: &BackboneConfig, read: Vec<i64>, positions: i64) -> Result<Self> {
        let d = b.hidden_size;
        let e = vp.pp("embeddings");
        let positions = e.get("position_embeddings", &[1, positions, d])?;
        let blocks = (0..b.num_hidden_layers)
            .map(|i| Block::load(&vp.pp(format!("encoder.layer.{i}")), b))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch: Conv2d::load(
                &e.pp("patch_embeddings.projection"),
                b.num_channels,
                d,
                b.patch_size,
                b.patch_size,
                0,
            )?,
            cls: e.get("cls_token", &[1, 1, d])?,
            positions,
            blocks,
            norm: if b.apply_layernorm {
                Some(LayerNorm::load(&vp.pp("layernorm"), d, b.layer_norm_eps)?)
            } else {
                None
            },
            read,
            patch_size: b.patch_size,
            dim: d,
        })
    }

    /// The position embeddings for a `rows`×`columns` patch grid: the stored grid resized
    /// with bicubic (align_corners off) unless it is that grid and square.
    fn positions(&self, rows: i64, columns: i64) -> Tensor {
        let stored = self.positions.size()[1] - 1;
        if stored == rows * columns && rows == columns {
            return self.positions.shallow_clone();
        }
        let side = (stored as f64).sqrt() as i64;
        let grid = self
            .positions
            .narrow(1, 1, stored)
            .reshape([1, side, side, self.dim])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            .upsample_bicubic2d([rows, columns], false, None, None)
            .to_kind(self.positions.kind())
            .permute([0, 2, 3, 1])
            .reshape([1, rows * columns, self.dim]);
        Tensor::cat(&[self.positions.narrow(1, 0, 1), grid], 1)
    }

    /// The read layers' tokens (class token first), normalised, and the patch grid;
    /// `between` is asked before each block, and its error ends the pass.
    pub fn forward(
        &self,
        pixels: &Tensor,
        between: &mut Between<'_>,
    ) -> Result<(Vec<Tensor>, (i64, i64))> {
        let (height, width) = (pixels.size()[2], pixels.size()[3]);
        let (rows, columns) = (height / self.patch_size, width / self.patch_size);
        let patches = self.patch.forward(pixels).flatten(2, 3).transpose(1, 2);
        let mut x =
            Tensor::cat(&[self.cls.shallow_clone(), patches], 1) + self.positions(rows, columns);
        let mut read = Vec::with_capacity(self.read.len());
        let keep = |x: &Tensor| {
            self.norm
                .as_ref()
                .map_or_else(|| x.shallow_clone(), |n| n.forward(x))
        };
        if self.read.contains(&0) {
            read.push((0, keep(&x)));
        }
        for (i, block) in self.blocks.iter().enumerate() {
            between()?;
            x = block.forward(&x);
            let layer = i as i64 + 1;
            if self.read.contains(&layer) {
                read.push((layer, keep(&x)));
            }
        }
        let ordered = self
            .read
            .iter()
            .filter_map(|l| {
                read.iter()
                    .find(|(layer, _)| layer == l)
                    .map(|(_, t)| t.shallow_clone())
            })
            .collect();
        Ok((ordered, (rows, columns)))
    }
}
