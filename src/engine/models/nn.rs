//! The small layers every model is built from, loaded from diffusers keys.
//!
//! Linear and convolution layers are adaptable: a model built inside [`collect_layers`]
//! lists them by key, with a handle on their weight (to merge a LoRA into it) and a slot
//! of low-rank paths their forward pass adds (to apply one without touching the weight).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use tch::Tensor;

use crate::engine::error::Result;
use crate::engine::weights::VarPath;

/// A low-rank path added to a layer's output: `scale * up(down(x))`.
#[derive(Debug)]
pub struct LowRankPath {
    /// [rank, in] for a linear layer; [rank, in, k, k] for a convolution.
    pub down: Tensor,
    /// [out, rank] for a linear layer; [out, rank, 1, 1] for a convolution.
    pub up: Tensor,
    /// Strength (the adapter's alpha over its rank, times the request's weight).
    pub scale: f64,
}

/// The low-rank paths a layer adds in its forward pass, in order; shared between the
/// layer and its entry in the model's [`LayerTable`].
pub type LowRankSlot = Rc<RefCell<Vec<LowRankPath>>>;

/// How an adaptable layer applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    /// `torch.nn.Linear`: weight [out, in].
    Linear,
    /// `torch.nn.Conv2d`: weight [out, in, k, k].
    Conv {
        /// Stride.
        stride: i64,
        /// Padding.
        padding: i64,
    },
}

/// A layer a LoRA can adapt.
#[derive(Debug)]
pub struct AdaptableLayer {
    /// A handle on the layer's weight tensor (`set_data` on it changes the layer).
    pub weight: Tensor,
    /// Its kind.
    pub geometry: Geometry,
    /// Its low-rank paths.
    pub paths: LowRankSlot,
}

/// The adaptable layers of a model, by the key of their module (`down_blocks.1.
/// attentions.0.transformer_blocks.0.attn1.to_q`).
#[derive(Debug, Default)]
pub struct LayerTable {
    layers: BTreeMap<String, AdaptableLayer>,
    /// Other names of the layers (alias to key), built once by whoever needs them.
    aliases: std::cell::OnceCell<std::collections::HashMap<String, String>>,
}

impl LayerTable {
    /// The layer with module key `key`.
    pub fn get(&self, key: &str) -> Option<&AdaptableLayer> {
        self.layers.get(key)
    }

    /// The layer with module key `key`, with its key.
    pub fn entry(&self, key: &str) -> Option<(&String, &AdaptableLayer)> {
        self.layers.get_key_value(key)
    }

    /// Every layer, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &AdaptableLayer)> {
        self.layers.iter()
    }

    /// Other names of the layers, built by `build` on first use.
    pub fn aliases(
        &self,
        build: impl FnOnce(&Self) -> std::collections::HashMap<String, String>,
    ) -> &std::collections::HashMap<String, String> {
        self.aliases.get_or_init(|| build(self))
    }

    /// The table with `prefix` removed from the keys that start with it.
    pub fn without_prefix(self, prefix: &str) -> Self {
        Self {
            aliases: std::cell::OnceCell::new(),
            layers: self
                .layers
                .into_iter()
                .map(|(k, v)| match k.strip_prefix(prefix) {
                    Some(rest) => (rest.to_string(), v),
                    None => (k, v),
                })
                .collect(),
        }
    }
}

thread_local! {
    /// Layers built while [`collect_layers`] runs on this thread.
    static COLLECTED: RefCell<Option<LayerTable>> = const { RefCell::new(None) };
}

/// Runs `build` and returns, with its result, the adaptable layers it built.
pub fn collect_layers<T>(build: impl FnOnce() -> Result<T>) -> Result<(T, LayerTable)> {
    let outer = COLLECTED.with(|c| c.borrow_mut().replace(LayerTable::default()));
    let result = build();
    let collected = COLLECTED.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
    Ok((result?, collected.unwrap_or_default()))
}

/// A new slot for the layer at `vp`, listed when layers are being collected.
fn adaptable(vp: &VarPath, weight: &Tensor, geometry: Geometry) -> LowRankSlot {
    let paths = LowRankSlot::default();
    COLLECTED.with(|c| {
        if let Some(table) = c.borrow_mut().as_mut() {
            table.layers.insert(
                vp.prefix().to_string(),
                AdaptableLayer {
                    weight: weight.shallow_clone(),
                    geometry,
                    paths: paths.clone(),
                },
            );
        }
    });
    paths
}

/// `torch.nn.Linear`.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    low_rank: LowRankSlot,
}

impl Linear {
    /// Loads `weight` [out, in] and, when `bias`, `bias` [out].
    pub fn load(vp: &VarPath, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vp.get("weight", &[out_dim, in_dim])?;
        Ok(Self {
            low_rank: adaptable(vp, &weight, Geometry::Linear),
            weight,
            bias: if bias {
                Some(vp.get("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        self.low_rank.borrow().iter().fold(y, |y, p| {
            y + x
                .linear::<&Tensor>(&p.down, None)
                .linear::<&Tensor>(&p.up, None)
                * p.scale
        })
    }
}

/// `torch.nn.Conv2d` with a square kernel and bias.
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    low_rank: LowRankSlot,
}

impl Conv2d {
    /// Loads a `kernel`×`kernel` convolution.
    pub fn load(
        vp: &VarPath,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        let weight = vp.get("weight", &[out_channels, in_channels, kernel, kernel])?;
        Ok(Self {
            low_rank: adaptable(vp, &weight, Geometry::Conv { stride, padding }),
            weight,
            bias: vp.get("bias", &[out_channels])?,
            stride,
            padding,
        })
    }

    /// Applies the convolution to an NCHW tensor.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (stride, padding) = ([self.stride, self.stride], [self.padding, self.padding]);
        let y = x.conv2d(&self.weight, Some(&self.bias), stride, padding, [1, 1], 1);
        // LoCon: a k x k convolution to the rank, then a 1 x 1 one back up.
        self.low_rank.borrow().iter().fold(y, |y, p| {
            let down = x.conv2d::<&Tensor>(&p.down, None, stride, padding, [1, 1], 1);
            y + down.conv2d::<&Tensor>(&p.up, None, [1, 1], [0, 0], [1, 1], 1) * p.scale
        })
    }
}

/// `torch.nn.GroupNorm` with affine parameters.
#[derive(Debug)]
pub struct GroupNorm {
    groups: i64,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl GroupNorm {
    /// Loads a group norm over `channels` channels.
    pub fn load(vp: &VarPath, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        if groups <= 0 || channels % groups != 0 {
            return Err(crate::engine::error::EngineError::InvalidRequest(format!(
                "group norm: {channels} channels are not divisible into {groups} groups"
            )));
        }
        Ok(Self {
            groups,
            weight: vp.get("weight", &[channels])?,
            bias: vp.get("bias", &[channels])?,
            eps,
        })
    }

    /// Normalises an N, C, ... tensor.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    dim: i64,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads a layer norm over a last dimension of size `dim`.
    pub fn load(vp: &VarPath, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            dim,
            weight: vp.get("weight", &[dim])?,
            bias: vp.get("bias", &[dim])?,
            eps,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.Embedding`.
#[derive(Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Loads a [count, dim] table.
    pub fn load(vp: &VarPath, count: i64, dim: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[count, dim])?,
        })
    }

    /// Looks up `ids`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Multi-head scaled dot-product attention on [batch, tokens, heads * head_dim] inputs.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    causal: bool,
) -> Tensor {
    let size = q.size();
    let (batch, q_len, inner) = (size[0], size[1], size[2]);
    let head_dim = inner / heads;
    let split = |t: &Tensor| {
        let len = t.size()[1];
        t.view([batch, len, heads, head_dim]).transpose(1, 2)
    };
    let out = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    );
    out.transpose(1, 2).reshape([batch, q_len, inner])
}
