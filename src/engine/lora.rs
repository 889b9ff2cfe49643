//! LoRA adapters put on a pipeline for one job and taken off after it.
//!
//! Two ways of applying them, chosen per engine ([`LoraMode`]):
//! - merge: each adapted layer's weight is replaced, for the job, by a new tensor holding
//!   `W + Σ weight·scale·(up @ down)` (fused multiply-adds); the layer's pristine tensor is
//!   kept aside and put back when the job ends, so the weights are restored bit for bit
//!   without a copy and denoising steps cost what they cost without adapters;
//! - forward: the layers add `weight·scale·up(down(x))` to their output, as PEFT does;
//!   nothing is allocated but the adapters, and every step pays for the extra products.
//!
//! Every adapter is matched against the model before anything is changed, so an adapter
//! that does not fit leaves the model as it was.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::loading::lora::{LoraPair, LoraTarget, LoraWeights, ModuleName};
use crate::engine::loading::single_file::unet_sgm_names;
use crate::engine::models::nn::{
    is_channels_last, to_channels_last, AdaptableLayer, Geometry, LayerTable, LowRankPath,
    LowRankSlot,
};
use crate::engine::pipeline::SdxlPipeline;

/// How adapters are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraMode {
    /// Merge when the merged copies fit the memory budget, else forward.
    #[default]
    Auto,
    /// Merged into the weights for the job (no cost per step).
    Merge,
    /// Extra low-rank products in the forward pass (no copy of any weight).
    Forward,
}

impl std::str::FromStr for LoraMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(LoraMode::Auto),
            "merge" => Ok(LoraMode::Merge),
            "forward" => Ok(LoraMode::Forward),
            other => Err(format!(
                "`{other}` is not a LoRA mode (auto, merge, forward)"
            )),
        }
    }
}

/// Most weight elements merged in one stacked operation (the stack is a transient copy).
const MERGE_CHUNK_ELEMENTS: i64 = 64 << 20;

/// An adapter a job asks for.
#[derive(Clone)]
pub struct JobLora {
    /// Its name (for errors).
    pub name: String,
    /// Its matrices.
    pub weights: Rc<LoraWeights>,
    /// The UNet's weight.
    pub strength: f64,
    /// The text encoders' weight.
    pub text_encoder_strength: f64,
}

impl JobLora {
    /// Its weight in `target`.
    fn strength_in(&self, target: LoraTarget) -> f64 {
        match target {
            LoraTarget::Unet => self.strength,
            LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => self.text_encoder_strength,
        }
    }
}

/// A layer merged for a job, and how to put it back.
struct MergedLayer {
    /// The handle of the tensor holding the layer's weight.
    tensor: Tensor,
    /// Its rows of that tensor (a part of a fused layer): the merge wrote into them.
    /// Otherwise the handle was given a new tensor.
    rows: Option<(i64, i64)>,
    /// The weight before the merge: the tensor itself, or a copy of its rows.
    pristine: Tensor,
}

/// Adapters on a pipeline: dropping this takes them off.
#[derive(Default)]
pub struct AppliedLoras {
    /// The pipeline's count of adapter sets on it, this one included.
    adapted: Option<Rc<std::cell::Cell<usize>>>,
    /// Merged layers.
    merged: Vec<MergedLayer>,
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
        if let Some(adapted) = self.adapted.take() {
            adapted.set(adapted.get().saturating_sub(1));
        }
        for layer in self.merged.drain(..).rev() {
            match layer.rows {
                Some((start, count)) => {
                    layer.tensor.narrow(0, start, count).copy_(&layer.pristine);
                }
                // Where the layer is now: the cache may have moved it to the host while
                // the job ran (offloaded text encoders).
                None => layer
                    .tensor
                    .shallow_clone()
                    .set_data(&layer.pristine.to_device(layer.tensor.device())),
            }
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
    pair: &'a LoraPair,
    scale: f64,
}

/// A model's layers with the names adapter files may give them.
struct Names<'a> {
    table: &'a LayerTable,
    /// kohya-ss flattened names (diffusers and sgm layouts) to module keys.
    flat: &'a HashMap<String, String>,
}

impl<'a> Names<'a> {
    /// The names of `table`'s layers (kept with the table after the first use).
    fn new(table: &'a LayerTable, unet_layers_per_block: Option<usize>) -> Self {
        let flat = table.aliases(|table| {
            let mut flat = HashMap::new();
            for (key, _) in table.iter() {
                flat.insert(key.replace('.', "_"), key.clone());
                if let Some(lpb) = unet_layers_per_block {
                    for sgm in unet_sgm_names(key, lpb) {
                        flat.insert(sgm.replace('.', "_"), key.clone());
                    }
                }
            }
            flat
        });
        Self { table, flat }
    }

    fn find(&self, name: &ModuleName) -> Option<(&'a str, &'a AdaptableLayer)> {
        let key: &str = match name {
            ModuleName::Key(key) => key.strip_prefix("text_model.").unwrap_or(key),
            ModuleName::Flat(flat) => {
                let flat = flat.strip_prefix("text_model_").unwrap_or(flat);
                self.flat.get(flat)?.as_str()
            }
        };
        let (key, layer) = self.table.entry(key)?;
        Some((key.as_str(), layer))
    }
}

/// Why `pair` does not fit `layer`, if it does not.
fn check_fit(pair: &LoraPair, layer: &AdaptableLayer) -> std::result::Result<(), String> {
    let weight = layer.weight().size();
    let (down, up) = (&pair.module.down_shape, &pair.module.up_shape);
    let (out, input) = (weight[0], weight[1]);
    let kernel = &weight[2..];
    let unit_kernel = kernel.iter().all(|&k| k == 1);
    let fits = match layer.geometry {
        Geometry::Linear => down[1] == input && up[0] == out && down[2..].iter().all(|&d| d == 1),
        Geometry::Conv { .. } => {
            down[1] == input
                && up[0] == out
                && (down[2..] == *kernel || (down.len() == 2 && unit_kernel))
        }
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "has down {down:?} and up {up:?}, which do not fit a layer with weight {weight:?} (made for another architecture?)"
        ))
    }
}

/// The low-rank path of `pair` shaped for `layer`'s forward pass.
fn low_rank_path(pair: &LoraPair, layer: &AdaptableLayer, scale: f64) -> LowRankPath {
    let weight = layer.weight().size();
    let rank = pair.module.rank();
    let (out, input) = (weight[0], weight[1]);
    let (down, up) = match layer.geometry {
        Geometry::Linear => (
            pair.down.reshape([rank, input]),
            pair.up.reshape([out, rank]),
        ),
        Geometry::Conv { .. } => {
            let mut down_shape = vec![rank, input];
            down_shape.extend(&weight[2..]);
            (
                pair.down.reshape(down_shape),
                pair.up.reshape([out, rank, 1, 1]),
            )
        }
    };
    LowRankPath { down, up, scale }
}

/// Matches every pair of every adapter to a layer of `pipeline`; the first that does not
/// fit is an error naming its adapter and key.
fn match_all<'a>(pipeline: &'a SdxlPipeline, loras: &'a [JobLora]) -> Result<Vec<Matched<'a>>> {
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
            check_fit(pair, layer).map_err(error)?;
            matched.push(Matched {
                target: pair.module.target,
                key,
                layer,
                pair,
                scale: pair.scale * lora.strength_in(pair.module.target),
            });
        }
    }
    Ok(matched)
}

/// Bytes the merged copies of the layers the LoRA files at `paths` adapt take while a
/// job runs, at `element_bytes` per weight, with the transient stack of one merge chunk
/// (read from the files' headers; a layer adapted by several files counts once).
pub fn merged_bytes(paths: &[(&std::path::Path, &str)], element_bytes: u64) -> Result<u64> {
    let mut layers = std::collections::HashMap::new();
    for (path, name) in paths {
        let layout = crate::engine::loading::lora::LoraLayout::read(path, name)?;
        for module in layout.modules {
            let weight: i64 = module.up_shape[0] * module.down_shape[1..].iter().product::<i64>();
            layers.insert((module.target, module.module), weight.max(0) as u64);
        }
    }
    let total: u64 = layers.values().sum();
    let transient = (2 * MERGE_CHUNK_ELEMENTS as u64).min(2 * total);
    Ok((total + transient) * element_bytes)
}

/// The components of a pipeline adapters are put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraParts {
    /// The UNet and the text encoders.
    All,
    /// The text encoders alone.
    TextEncoders,
    /// The UNet alone.
    Unet,
}

impl LoraParts {
    fn has(self, target: LoraTarget) -> bool {
        match self {
            LoraParts::All => true,
            LoraParts::TextEncoders => target != LoraTarget::Unet,
            LoraParts::Unet => target == LoraTarget::Unet,
        }
    }
}

/// Whether every adapter of `loras` fits `pipeline` (the error names the first that
/// does not), without putting any on.
pub fn check_fit_all(pipeline: &SdxlPipeline, loras: &[JobLora]) -> Result<()> {
    match_all(pipeline, loras).map(drop)
}

/// Puts `loras` on `pipeline` (shared components included) until the result is dropped.
pub fn apply(pipeline: &SdxlPipeline, loras: &[JobLora], mode: LoraMode) -> Result<AppliedLoras> {
    apply_to(pipeline, loras, mode, LoraParts::All)
}

/// Puts `loras` on `parts` of `pipeline` until the result is dropped (every adapter is
/// matched against the whole model all the same, so one that does not fit is refused
/// whichever parts it goes on).
pub fn apply_to(
    pipeline: &SdxlPipeline,
    loras: &[JobLora],
    mode: LoraMode,
    parts: LoraParts,
) -> Result<AppliedLoras> {
    let _no_grad = tch::no_grad_guard();
    let mut applied = AppliedLoras::default();
    if loras.is_empty() {
        return Ok(applied);
    }
    let mut matched = match_all(pipeline, loras)?;
    matched.retain(|m| parts.has(m.target));
    if matched.is_empty() {
        return Ok(applied);
    }
    let adapted = pipeline.adapted();
    adapted.set(adapted.get() + 1);
    applied.adapted = Some(adapted);
    match mode {
        LoraMode::Forward => {
            for m in matched {
                let mut paths = m.layer.paths.borrow_mut();
                if paths.is_empty() {
                    applied.slots.push(m.layer.paths.clone());
                }
                paths.push(low_rank_path(m.pair, m.layer, m.scale));
            }
        }
        // Without a budget to decide by, merging is the faster way.
        LoraMode::Merge | LoraMode::Auto => merge(matched, &mut applied),
    }
    Ok(applied)
}

/// Gives `layer` the weight `merged`: rows of a fused layer are written in place (their
/// pristine contents copied aside), any other layer's handle takes the new tensor (in
/// the layer's memory format).
fn put_merged(layer: &AdaptableLayer, merged: &Tensor) -> MergedLayer {
    let tensor = layer.tensor.shallow_clone();
    match layer.rows {
        Some((start, count)) => {
            let mut rows = tensor.narrow(0, start, count);
            let pristine = rows.copy();
            rows.copy_(merged);
            MergedLayer {
                tensor,
                rows: layer.rows,
                pristine,
            }
        }
        None => {
            let pristine = tensor.detach();
            let merged = if is_channels_last(&pristine) {
                to_channels_last(merged)
            } else {
                merged.shallow_clone()
            };
            tensor.shallow_clone().set_data(&merged);
            MergedLayer {
                tensor,
                rows: None,
                pristine,
            }
        }
    }
}

/// Layers merged together: same weight shape, same adapter ranks and scales, in order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct MergeGroup {
    shape: Vec<i64>,
    /// (rank, scale bits) of each adapter.
    adapters: Vec<(i64, u64)>,
}

/// Merges the matched pairs into new weight tensors, recording what to restore.
///
/// Layers of one [`MergeGroup`] are merged a chunk at a time: one stacked fused
/// multiply-add per adapter, W + scale·(up @ down), accumulated by the BLAS and rounded
/// once to the weight's precision. That is a few hundred kernels for a whole SDXL UNet
/// rather than one per layer and adapter, so that switching sets costs less than a step.
/// Out of place: the pristine tensors are never written.
fn merge(matched: Vec<Matched<'_>>, applied: &mut AppliedLoras) {
    let mut by_layer: BTreeMap<(LoraTarget, &str), Vec<Matched<'_>>> = BTreeMap::new();
    for m in matched {
        by_layer.entry((m.target, m.key)).or_default().push(m);
    }
    let mut groups: BTreeMap<MergeGroup, Vec<&[Matched<'_>]>> = BTreeMap::new();
    for deltas in by_layer.values() {
        let group = MergeGroup {
            shape: deltas[0].layer.weight().size(),
            adapters: deltas
                .iter()
                .map(|d| (d.pair.module.rank(), d.scale.to_bits()))
                .collect(),
        };
        groups.entry(group).or_default().push(deltas.as_slice());
    }
    for (group, layers) in &groups {
        let shape = &group.shape;
        let elements: i64 = shape.iter().product();
        let per_chunk = (MERGE_CHUNK_ELEMENTS / elements.max(1)).max(1) as usize;
        for chunk in layers.chunks(per_chunk) {
            let weights: Vec<Tensor> = chunk.iter().map(|d| d[0].layer.weight()).collect();
            let mut sum = Tensor::stack(&weights, 0).reshape([chunk.len() as i64, shape[0], -1]);
            for (j, (_, scale)) in group.adapters.iter().enumerate() {
                let ups: Vec<&Tensor> = chunk.iter().map(|d| &d[j].pair.up_bmm).collect();
                let downs: Vec<&Tensor> = chunk.iter().map(|d| &d[j].pair.down_bmm).collect();
                sum = sum.baddbmm(
                    &Tensor::cat(&ups, 0),
                    &Tensor::cat(&downs, 0),
                    1.0,
                    f64::from_bits(*scale),
                );
            }
            for (i, deltas) in chunk.iter().enumerate() {
                let merged = sum.get(i as i64).reshape(shape.as_slice());
                applied.merged.push(put_merged(deltas[0].layer, &merged));
            }
        }
    }
}
