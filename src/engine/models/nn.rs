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
use crate::engine::models::seamless;
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
    /// A handle on the tensor holding the layer's weight (`set_data` on it changes the
    /// layer, unless the layer is `rows` of it).
    pub tensor: Tensor,
    /// Where the layer is part of a fused one: its rows of `tensor` (start, count), which
    /// a change must write into.
    pub rows: Option<(i64, i64)>,
    /// Its kind.
    pub geometry: Geometry,
    /// Its low-rank paths.
    pub paths: LowRankSlot,
}

impl AdaptableLayer {
    /// The layer's weight: the tensor, or a view of its rows.
    pub fn weight(&self) -> Tensor {
        match self.rows {
            Some((start, count)) => self.tensor.narrow(0, start, count),
            None => self.tensor.shallow_clone(),
        }
    }
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

/// A new slot for the layer at `vp` (`rows` of `tensor` when it is part of a fused
/// layer), listed when layers are being collected.
fn adaptable(
    vp: &VarPath,
    tensor: &Tensor,
    rows: Option<(i64, i64)>,
    geometry: Geometry,
) -> LowRankSlot {
    let paths = LowRankSlot::default();
    COLLECTED.with(|c| {
        if let Some(table) = c.borrow_mut().as_mut() {
            table.layers.insert(
                vp.prefix().to_string(),
                AdaptableLayer {
                    tensor: tensor.shallow_clone(),
                    rows,
                    geometry,
                    paths: paths.clone(),
                },
            );
        }
    });
    paths
}

/// `y` plus the low-rank paths of `slot` applied to the linear layer's input `x`.
fn add_low_rank(y: Tensor, x: &Tensor, slot: &LowRankSlot) -> Tensor {
    slot.borrow().iter().fold(y, |y, p| {
        y + x
            .linear::<&Tensor>(&p.down, None)
            .linear::<&Tensor>(&p.up, None)
            * p.scale
    })
}

/// Gives `loaded` (a tensor the weights returned) the contents of `replacement`, in place:
/// whoever holds the loaded tensors (moving a model between device and host) then holds
/// the replacement, and the loaded contents are freed.
fn replace_loaded(loaded: &Tensor, replacement: &Tensor) {
    let _no_grad = tch::no_grad_guard();
    loaded.shallow_clone().set_data(replacement);
}

/// `t` (NCHW) with its elements stored in channels-last order (NHWC in memory), as
/// `t.to(memory_format=torch.channels_last)` makes it.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-D tensor is stored channels-last (and not also plain NCHW).
pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 4 && size[1] > 1 && stride[1] == 1 && !t.is_contiguous()
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
            low_rank: adaptable(vp, &weight, None, Geometry::Linear),
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
        add_low_rank(
            x.linear(&self.weight, self.bias.as_ref()),
            x,
            &self.low_rank,
        )
    }
}

/// Linear layers of the same input and width fused into one: their weights stacked into
/// one matrix, so that one product replaces several. Each part stays adaptable under its
/// own key, as rows of the fused weight.
#[derive(Debug)]
pub struct FusedLinear<const N: usize> {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Each part's width of the output.
    width: i64,
    /// Each part's low-rank paths.
    parts: [LowRankSlot; N],
}

impl<const N: usize> FusedLinear<N> {
    /// Loads the layers at `paths`, each `weight` [out_dim, in_dim] (and `bias` [out_dim]
    /// when `bias`), fused.
    pub fn load(paths: &[VarPath; N], in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weights = paths
            .iter()
            .map(|vp| vp.get("weight", &[out_dim, in_dim]))
            .collect::<Result<Vec<_>>>()?;
        let weight = fuse(&weights, in_dim);
        let bias = if bias {
            let biases = paths
                .iter()
                .map(|vp| vp.get("bias", &[out_dim]))
                .collect::<Result<Vec<_>>>()?;
            Some(fuse(&biases, 0))
        } else {
            None
        };
        let parts = std::array::from_fn(|i| {
            let rows = Some((i as i64 * out_dim, out_dim));
            adaptable(&paths[i], &weight, rows, Geometry::Linear)
        });
        Ok(Self {
            weight,
            bias,
            width: out_dim,
            parts,
        })
    }

    /// Applies every part to the last dimension of `x`: their outputs, in order.
    pub fn forward(&self, x: &Tensor) -> [Tensor; N] {
        let y = x.linear(&self.weight, self.bias.as_ref());
        std::array::from_fn(|i| {
            let part = y.narrow(-1, i as i64 * self.width, self.width);
            add_low_rank(part, x, &self.parts[i])
        })
    }

    /// Applies part `index` alone to the last dimension of `x`.
    pub fn forward_part(&self, index: usize, x: &Tensor) -> Tensor {
        let rows = |t: &Tensor| t.narrow(0, index as i64 * self.width, self.width);
        let bias = self.bias.as_ref().map(rows);
        add_low_rank(
            x.linear(&rows(&self.weight), bias.as_ref()),
            x,
            &self.parts[index],
        )
    }
}

/// The loaded tensors `parts` concatenated along their first dimension, held by the first
/// one (the others emptied to [0, `width`] or [0]).
fn fuse(parts: &[Tensor], width: i64) -> Tensor {
    let fused = Tensor::cat(parts, 0);
    replace_loaded(&parts[0], &fused);
    for part in &parts[1..] {
        let empty: &[i64] = if width > 0 { &[0, width] } else { &[0] };
        replace_loaded(part, &Tensor::empty(empty, (part.kind(), part.device())));
    }
    parts[0].shallow_clone()
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
        if vp.layout().channels_last {
            replace_loaded(&weight, &to_channels_last(&weight));
        }
        Ok(Self {
            low_rank: adaptable(vp, &weight, None, Geometry::Conv { stride, padding }),
            weight,
            bias: vp.get("bias", &[out_channels])?,
            stride,
            padding,
        })
    }

    /// Its weight [out, in, k, k].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the convolution to an NCHW tensor.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.apply(x, [self.padding, self.padding])
    }

    /// Applies the convolution with its columns padded but not its rows: to a band of
    /// rows that carries its own halo (see [`crate::engine::models::bands`]).
    pub fn forward_unpadded_rows(&self, x: &Tensor) -> Tensor {
        self.apply(x, [0, self.padding])
    }

    fn apply(&self, x: &Tensor, padding: [i64; 2]) -> Tensor {
        let stride = [self.stride, self.stride];
        let (x, padding) = seamless::padded(x, padding);
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

    /// Its number of groups.
    pub fn groups(&self) -> i64 {
        self.groups
    }

    /// Its epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Its per-channel scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Its per-channel shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
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

    /// The [count, dim] table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
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
    attention(q, k, v, heads, None, causal)
}

/// [`multi_head_attention`] with an explicit boolean mask ([batch or 1, 1, q, k], true
/// where attention is allowed).
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    allowed: &Tensor,
) -> Tensor {
    attention(q, k, v, heads, Some(allowed), false)
}

/// [`multi_head_attention`] with an additive bias on the scores ([batch or 1, heads, q, k];
/// BEiT's relative positions).
pub fn biased_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, bias: &Tensor) -> Tensor {
    attention(q, k, v, heads, Some(bias), false)
}

fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    mask: Option<&Tensor>,
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
        mask,
        0.0,
        causal,
        None,
        false,
    );
    out.transpose(1, 2).reshape([batch, q_len, inner])
}
