//! LoRA adapters put on a pipeline for one job and taken off after it.
//!
//! Two ways of applying them, chosen per engine ([`LoraMode`]):
//! - merge: each adapted layer's weight is replaced, for the job, by a new tensor holding
//!   `W + Σ weight·scale·(up @ down)` (computed in float32); the layer's pristine tensor is
//!   kept aside and put back when the job ends, so the weights are restored bit for bit
//!   without a copy and denoising steps cost what they cost without adapters;
//! - forward: the layers add `weight·scale·up(down(x))` to their output, as PEFT does;
//!   nothing is allocated but the adapters, and every step pays for the extra products.
//!
//! Every adapter is matched against the model before anything is changed, so an adapter
//! that does not fit leaves the model as it was.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::loading::lora::{LoraPair, LoraTarget, LoraWeights, ModuleName};
use crate::engine::loading::single_file::unet_sgm_names;
use crate::engine::models::nn::{AdaptableLayer, Geometry, LayerTable, LowRankPath, LowRankSlot};
use crate::engine::pipeline::SdxlPipeline;

/// How adapters are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraMode {
    /// Merged into the weights for the job (no cost per step).
    #[default]
    Merge,
    /// Extra low-rank products in the forward pass (no copy of any weight).
    Forward,
}

impl std::str::FromStr for LoraMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "merge" => Ok(LoraMode::Merge),
            "forward" => Ok(LoraMode::Forward),
            other => Err(format!("`{other}` is not a LoRA mode (merge, forward)")),
        }
    }
}

/// An adapter a job asks for.
pub struct JobLora {
    /// Its name (for errors).
    pub name: String,
    /// Its matrices.
    pub weights: Rc<LoraWeights>,
    /// The request's weight.
    pub strength: f64,
}

/// Adapters on a pipeline: dropping this takes them off.
#[derive(Default)]
pub struct AppliedLoras {
    /// Merged layers: the handle of the layer's weight and its pristine tensor.
    merged: Vec<(Tensor, Tensor)>,
    /// Layers given low-rank paths.
    slots: Vec<LowRankSlot>,
}

impl AppliedLoras {
    /// How many layers are adapted.
    pub fn layers(&self) -> usize {
        self.merged.len() + self.slots.len()
    }
}

impl Drop for AppliedLoras {
    fn drop(&mut self) {
        let _no_grad = tch::no_grad_guard();
        for (weight, pristine) in self.merged.drain(..).rev() {
            weight.shallow_clone().set_data(&pristine);
        }
        for slot in self.slots.drain(..) {
            slot.borrow_mut().clear();
        }
    }
}

/// One adapter pair matched to its layer.
struct Matched<'a> {
    target: LoraTarget,
    key: &'a str,
    layer: &'a AdaptableLayer,
    down: Tensor,
    up: Tensor,
    scale: f64,
}

/// A model's layers with the names adapter files may give them.
struct Names<'a> {
    table: &'a LayerTable,
    /// kohya-ss flattened names (diffusers and sgm layouts) to module keys.
    flat: HashMap<String, &'a str>,
}

impl<'a> Names<'a> {
    fn new(table: &'a LayerTable, unet_layers_per_block: Option<usize>) -> Self {
        let mut flat = HashMap::new();
        for (key, _) in table.iter() {
            flat.insert(key.replace('.', "_"), key.as_str());
            if let Some(lpb) = unet_layers_per_block {
                for sgm in unet_sgm_names(key, lpb) {
                    flat.insert(sgm.replace('.', "_"), key.as_str());
                }
            }
        }
        Self { table, flat }
    }

    fn find(&self, name: &ModuleName) -> Option<(&'a str, &'a AdaptableLayer)> {
        let key: &str = match name {
            ModuleName::Key(key) => key.strip_prefix("text_model.").unwrap_or(key),
            ModuleName::Flat(flat) => {
                let flat = flat.strip_prefix("text_model_").unwrap_or(flat);
                self.flat.get(flat)?
            }
        };
        let (key, layer) = self.table.entry(key)?;
        Some((key.as_str(), layer))
    }
}

/// The down and up matrices of `pair` shaped for `layer`, or why they do not fit.
fn fit(pair: &LoraPair, layer: &AdaptableLayer) -> std::result::Result<(Tensor, Tensor), String> {
    let weight = layer.weight.size();
    let (down, up) = (&pair.module.down_shape, &pair.module.up_shape);
    let rank = pair.module.rank();
    let (out, input) = (weight[0], weight[1]);
    let kernel: Vec<i64> = weight[2..].to_vec();
    let unit_kernel = kernel.iter().all(|&k| k == 1);
    let fits = match layer.geometry {
        Geometry::Linear => down[1] == input && up[0] == out && down[2..].iter().all(|&d| d == 1),
        Geometry::Conv { .. } => {
            down[1] == input
                && up[0] == out
                && (down[2..] == kernel[..] || (down.len() == 2 && unit_kernel))
        }
    };
    if !fits {
        return Err(format!(
            "has down {down:?} and up {up:?}, which do not fit a layer with weight {weight:?} (made for another architecture?)"
        ));
    }
    Ok(match layer.geometry {
        Geometry::Linear => (
            pair.down.reshape([rank, input]),
            pair.up.reshape([out, rank]),
        ),
        Geometry::Conv { .. } => {
            let mut down_shape = vec![rank, input];
            down_shape.extend(&kernel);
            (
                pair.down.reshape(down_shape),
                pair.up.reshape([out, rank, 1, 1]),
            )
        }
    })
}

/// Matches every pair of every adapter to a layer of `pipeline`; the first that does not
/// fit is an error naming its adapter and key.
fn match_all<'a>(pipeline: &'a SdxlPipeline, loras: &[JobLora]) -> Result<Vec<Matched<'a>>> {
    let unet = pipeline.unet();
    let lpb = usize::try_from(unet.config().layers_per_block).ok();
    let unet_names = Names::new(unet.adaptable_layers(), lpb);
    let te1_names = pipeline
        .text_encoder()
        .map(|te| Names::new(te.adaptable_layers(), None));
    let te2_names = Names::new(pipeline.text_encoder_2().adaptable_layers(), None);
    let mut matched = Vec::new();
    for lora in loras {
        for pair in &lora.weights.pairs {
            let error = |message: String| EngineError::Lora {
                lora: lora.name.clone(),
                key: pair.module.down_key.clone(),
                message,
            };
            let names = match pair.module.target {
                LoraTarget::Unet => &unet_names,
                LoraTarget::TextEncoder => te1_names.as_ref().ok_or_else(|| {
                    error("adapts the first text encoder, which this model does not have".into())
                })?,
                LoraTarget::TextEncoder2 => &te2_names,
            };
            let (key, layer) = names.find(&pair.module.module).ok_or_else(|| {
                error(format!(
                    "names no layer of the model's {} (made for another architecture?)",
                    pair.module.target.name()
                ))
            })?;
            let (down, up) = fit(pair, layer).map_err(error)?;
            matched.push(Matched {
                target: pair.module.target,
                key,
                layer,
                down,
                up,
                scale: pair.scale * lora.strength,
            });
        }
    }
    Ok(matched)
}

/// Puts `loras` on `pipeline` (shared components included) until the result is dropped.
pub fn apply(pipeline: &SdxlPipeline, loras: &[JobLora], mode: LoraMode) -> Result<AppliedLoras> {
    let _no_grad = tch::no_grad_guard();
    let mut applied = AppliedLoras::default();
    if loras.is_empty() {
        return Ok(applied);
    }
    let matched = match_all(pipeline, loras)?;
    match mode {
        LoraMode::Forward => {
            for m in matched {
                let mut paths = m.layer.paths.borrow_mut();
                if paths.is_empty() {
                    applied.slots.push(m.layer.paths.clone());
                }
                paths.push(LowRankPath {
                    down: m.down,
                    up: m.up,
                    scale: m.scale,
                });
            }
        }
        LoraMode::Merge => {
            // Several adapters on one layer: one merged tensor with all their deltas.
            let mut by_layer: BTreeMap<(LoraTarget, &str), Vec<Matched<'_>>> = BTreeMap::new();
            for m in matched {
                by_layer.entry((m.target, m.key)).or_default().push(m);
            }
            for deltas in by_layer.values() {
                let layer = deltas[0].layer;
                let weight = &layer.weight;
                let shape = weight.size();
                let delta = deltas
                    .iter()
                    .map(|d| {
                        let rank = d.down.size()[0];
                        d.up.to_kind(Kind::Float)
                            .reshape([shape[0], rank])
                            .matmul(&d.down.to_kind(Kind::Float).reshape([rank, -1]))
                            * d.scale
                    })
                    .reduce(|sum, d| sum + d);
                let Some(delta) = delta else {
                    continue;
                };
                // Out of place: `to_kind` of a float32 weight is the weight itself.
                let merged = (weight.to_kind(Kind::Float) + delta.reshape(shape.as_slice()))
                    .to_kind(weight.kind());
                let pristine = weight.detach();
                weight.shallow_clone().set_data(&merged);
                applied.merged.push((weight.shallow_clone(), pristine));
            }
        }
    }
    Ok(applied)
}
