//! BEiT as transformers' `BeitBackbone` runs it under ZoeDepth (Intel/zoedepth-nyu's
//! BEiT-L/16 at 384): patches and a class token without absolute positions, pre-norm
//! layers (see `vit_layer`) whose attention adds a relative position bias of its own
//! (the stored table resized bilinearly from the config's window to the input's, then
//! looked up per token pair, the class token's three rows apart), layer scales where
//! stored, and the chosen layers' tokens, class token included, as the features.

use serde::Deserialize;
use tch::{Device, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Conv2d;
use crate::engine::preprocess::vit_layer::{VitLayer, VitSizes};
use crate::engine::weights::VarPath;

/// `image_size` as configs write it: one side for a square, or both.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Side {
    Square(i64),
    Sides([i64; 2]),
}

/// BeitConfig's values that shape the backbone, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BeitConfig {
    image_size: Side,
    patch_size: i64,
    num_channels: i64,
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    intermediate_size: i64,
    layer_norm_eps: f64,
    hidden_act: String,
    use_absolute_position_embeddings: bool,
    use_relative_position_bias: bool,
    use_shared_relative_position_bias: bool,
    reshape_hidden_states: bool,
    add_fpn: bool,
    out_indices: Option<Vec<i64>>,
    out_features: Option<Vec<String>>,
}

impl Default for BeitConfig {
    fn default() -> Self {
        Self {
            image_size: Side::Square(224),
            patch_size: 16,
            num_channels: 3,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            use_absolute_position_embeddings: false,
            use_relative_position_bias: false,
            use_shared_relative_position_bias: false,
            reshape_hidden_states: true,
            add_fpn: false,
            out_indices: None,
            out_features: None,
        }
    }
}

impl BeitConfig {
    /// The width of its tokens.
    pub fn hidden_size(&self) -> i64 {
        self.hidden_size
    }

    /// The side of its square patches.
    pub fn patch_size(&self) -> i64 {
        self.patch_size
    }

    /// Why sdxld cannot run it as ZoeDepth's backbone, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        let refused = [
            (
                self.use_absolute_position_embeddings,
                "use_absolute_position_embeddings",
            ),
            (
                self.use_shared_relative_position_bias,
                "use_shared_relative_position_bias",
            ),
            (self.reshape_hidden_states, "reshape_hidden_states"),
            (self.add_fpn, "add_fpn"),
        ];
        if let Some((_, key)) = refused.iter().find(|(set, _)| *set) {
            return Some(format!("a BEiT backbone with {key} set"));
        }
        if self.hidden_act != "gelu" {
            return Some(format!(
                "a BEiT backbone with hidden_act `{}`",
                self.hidden_act
            ));
        }
        let sizes = [self.patch_size, self.hidden_size, self.num_attention_heads];
        if sizes.iter().any(|&s| s < 1) || self.hidden_size % self.num_attention_heads != 0 {
            return Some("a BEiT backbone of impossible sizes".into());
        }
        None
    }

    /// The hidden states read (0: the embeddings; i: layer i's output), in order.
    pub fn out_indices(&self) -> Result<Vec<usize>> {
        let from_features = || -> Option<Vec<i64>> {
            let names = self.out_features.as_ref()?;
            names
                .iter()
                .map(|n| n.strip_prefix("stage")?.parse().ok())
                .collect()
        };
        let indices = self
            .out_indices
            .clone()
            .or_else(from_features)
            .unwrap_or_else(|| vec![self.num_hidden_layers]);
        indices
            .iter()
            .map(|&i| match usize::try_from(i) {
                Ok(index) if i <= self.num_hidden_layers => Ok(index),
                _ => Err(EngineError::InvalidRequest(format!(
                    "BEiT config: out index {i} of {} layers",
                    self.num_hidden_layers
                ))),
            })
            .collect()
    }

    /// The window (rows, columns of patches) the relative position tables were made for.
    fn window(&self) -> (i64, i64) {
        let (h, w) = match self.image_size {
            Side::Square(s) => (s, s),
            Side::Sides([h, w]) => (h, w),
        };
        (h / self.patch_size, w / self.patch_size)
    }
}

/// The BEiT backbone.
pub struct Beit {
    patches: Conv2d,
    class_token: Tensor,
    layers: Vec<VitLayer>,
    /// Each layer's relative position table [(2h-1)(2w-1) + 3, heads].
    tables: Vec<Option<Tensor>>,
    read: Vec<usize>,
    heads: i64,
    window: (i64, i64),
}

impl Beit {
    /// Loads the backbone under `vp` (`backbone.` in a ZoeDepth file).
    pub fn load(vp: &VarPath, c: &BeitConfig) -> Result<Self> {
        let (d, p) = (c.hidden_size, c.patch_size);
        let embeddings = vp.pp("embeddings");
        let patches = embeddings.pp("patch_embeddings.projection");
        let sizes = VitSizes {
            hidden: d,
            intermediate: c.intermediate_size,
            layer_norm_eps: c.layer_norm_eps,
            key_bias: false,
        };
        Ok(Self {
            patches: Conv2d::load(&patches, c.num_channels, d, p, p, 0)?,
            class_token: embeddings.get("cls_token", &[1, 1, d])?,
            layers: (0..c.num_hidden_layers)
                .map(|i| VitLayer::load(&vp.pp(format!("encoder.layer.{i}")), sizes))
                .collect::<Result<_>>()?,
            tables: (0..c.num_hidden_layers)
                .map(|i| relative_table(&vp.pp(format!("encoder.layer.{i}")), c))
                .collect::<Result<_>>()?,
            read: c.out_indices()?,
            heads: c.num_attention_heads,
            window: c.window(),
        })
    }

    /// The read hidden states [N, 1 + rows × columns, D] of normalised pixels, and the
    /// patch grid (rows, columns): the sides divided by the patch size, rounded down.
    /// `between` is asked before each layer; its error ends the pass.
    pub fn forward(
        &self,
        pixels: &Tensor,
        between: &mut Between<'_>,
    ) -> Result<(Vec<Tensor>, (i64, i64))> {
        let patches = self.patches.forward(pixels);
        let s = patches.size();
        let (n, d, rows, columns) = (s[0], s[1], s[2], s[3]);
        let tokens = patches.flatten(2, 3).transpose(1, 2);
        let class = self.class_token.expand([n, 1, d], false);
        let mut x = Tensor::cat(&[class, tokens], 1);
        let index = relative_index((rows, columns), x.device());
        let last = self.read.iter().copied().max().unwrap_or(0);
        // Only the read states are kept (out indices may come in any order).
        let mut read: Vec<Option<Tensor>> = self.read.iter().map(|_| None).collect();
        for depth in 0..=last {
            if depth > 0 {
                between()?;
                let bias = self.tables[depth - 1]
                    .as_ref()
                    .map(|t| relative_bias(t, self.window, (rows, columns), &index));
                x = self.layers[depth - 1].forward(&x, self.heads, bias.as_ref());
            }
            let wanted = read.iter_mut().zip(&self.read).filter(|(_, &i)| i == depth);
            for (slot, _) in wanted {
                *slot = Some(x.shallow_clone());
            }
        }
        Ok((read.into_iter().flatten().collect(), (rows, columns)))
    }
}

/// A layer's relative position table [(2h-1)(2w-1) + 3, heads] for the config's window,
/// if the config has them.
fn relative_table(layer: &VarPath, c: &BeitConfig) -> Result<Option<Tensor>> {
    if !c.use_relative_position_bias {
        return Ok(None);
    }
    let (h, w) = c.window();
    let rows = (2 * h - 1) * (2 * w - 1) + 3;
    let bias = layer.pp("attention.attention.relative_position_bias");
    let table = bias.get(
        "relative_position_bias_table",
        &[rows, c.num_attention_heads],
    )?;
    Ok(Some(table))
}

/// transformers' `generate_relative_position_index` for a window of (rows, columns): per
/// token pair (class token first) its row of the resized table, flattened.
fn relative_index((rows, columns): (i64, i64), device: Device) -> Tensor {
    let distances = (2 * rows - 1) * (2 * columns - 1);
    let patches = rows * columns;
    let tokens = patches + 1;
    let mut index = Vec::with_capacity((tokens * tokens) as usize);
    for p in -1..patches {
        for q in -1..patches {
            index.push(match (p, q) {
                (-1, -1) => distances + 2,
                (-1, _) => distances,
                (_, -1) => distances + 1,
                _ => {
                    let (dr, dc) = (p / columns - q / columns, p % columns - q % columns);
                    (dr + rows - 1) * (2 * columns - 1) + dc + columns - 1
                }
            });
        }
    }
    Tensor::from_slice(&index).to_device(device)
}

/// A layer's bias [1, heads, tokens, tokens] for a window of `window` patches: the table
/// made for `stored`'s resized bilinearly (corners not aligned; laid out as transformers
/// reshapes it) to the window's distances, the class token's rows kept, looked up.
fn relative_bias(table: &Tensor, stored: (i64, i64), window: (i64, i64), index: &Tensor) -> Tensor {
    let heads = table.size()[1];
    let (old_h, old_w) = (2 * stored.0 - 1, 2 * stored.1 - 1);
    let (new_h, new_w) = (2 * window.0 - 1, 2 * window.1 - 1);
    let distances = old_h * old_w;
    let resized = table
        .narrow(0, 0, distances)
        .reshape([1, old_w, old_h, heads])
        .permute([0, 3, 1, 2])
        .upsample_bilinear2d([new_h, new_w], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([new_h * new_w, heads]);
    let full = Tensor::cat(&[resized, table.narrow(0, distances, 3)], 0);
    let tokens = window.0 * window.1 + 1;
    full.index_select(0, index)
        .view([tokens, tokens, heads])
        .permute([2, 0, 1])
        .contiguous()
        .unsqueeze(0)
}
