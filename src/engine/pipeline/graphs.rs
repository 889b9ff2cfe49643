//! The UNet call of a denoising step replayed as a CUDA graph (`engine.cuda_graphs`): one
//! launch instead of a kernel launch per operation.
//!
//! Per shape bucket (the shapes of the latents, the text embeddings and the
//! micro-conditioning), the first call runs eagerly (the kernels' libraries set up their
//! handles and workspaces), the second captures the call over inputs held in place, and
//! every later call copies its inputs in and replays the graph. A graph keeps the memory
//! of one call's activations while its pipeline lives; at most two buckets hold one. Only plain calls are captured:
//! without ControlNet residuals, without LoRA adapters applied (they change the weights
//! the graph reads), and not while a profile is recorded (its timing events would be
//! captured too).

use std::cell::RefCell;
use std::collections::HashMap;

use tch::{Device, Tensor};

use crate::engine::device::CudaGraph;
use crate::engine::models::unet::{AddedCond, UNet2DConditionModel};

/// A UNet call captured for one bucket: its inputs, held in place, and its output.
struct Captured {
    graph: CudaGraph,
    /// sample, timestep, context, text_embeds, time_ids.
    inputs: [Tensor; 5],
    output: Tensor,
}

enum Bucket {
    /// Called once, eagerly.
    WarmedUp,
    Captured(Captured),
    /// Its capture or replay failed: eager from now on.
    Eager,
}

/// Most buckets holding a graph at once (each keeps one call's activations): capturing
/// another releases them.
const MOST_GRAPHS: usize = 2;

/// The captured UNet calls of one pipeline.
#[derive(Default)]
pub(super) struct UnetGraphs {
    buckets: RefCell<HashMap<Vec<Vec<i64>>, Bucket>>,
}

impl UnetGraphs {
    /// Frees every captured call (the buckets start over).
    pub(super) fn release(&self) {
        self.buckets.borrow_mut().clear();
    }

    /// `unet`'s prediction for the inputs, through the bucket's graph where it has one.
    pub(super) fn call(
        &self,
        unet: &UNet2DConditionModel,
        device: Device,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        added: &AddedCond,
    ) -> Tensor {
        let inputs = [sample, timestep, context, added.text_embeds, added.time_ids];
        let key: Vec<Vec<i64>> = inputs.iter().map(|t| t.size()).collect();
        let eager = || unet.forward(sample, timestep, context, Some(added));
        let mut buckets = self.buckets.borrow_mut();
        let output = match buckets.get(&key) {
            None => {
                buckets.insert(key, Bucket::WarmedUp);
                None
            }
            Some(Bucket::Eager) => None,
            Some(Bucket::Captured(captured)) => {
                let output = replay(captured, &inputs);
                if output.is_none() {
                    buckets.insert(key, Bucket::Eager);
                }
                output
            }
            Some(Bucket::WarmedUp) => {
                let held = buckets
                    .values()
                    .filter(|b| matches!(b, Bucket::Captured(_)))
                    .count();
                if held >= MOST_GRAPHS {
                    for bucket in buckets.values_mut() {
                        if matches!(bucket, Bucket::Captured(_)) {
                            *bucket = Bucket::WarmedUp;
                        }
                    }
                }
                let captured = capture(unet, device, &inputs)
                    .and_then(|c| replay(&c, &inputs).map(|output| (c, output)));
                match captured {
                    Some((captured, output)) => {
                        buckets.insert(key, Bucket::Captured(captured));
                        Some(output)
                    }
                    None => {
                        tracing::warn!(
                            "a UNet call could not be captured as a CUDA graph: it runs eagerly"
                        );
                        buckets.insert(key, Bucket::Eager);
                        None
                    }
                }
            }
        };
        drop(buckets);
        output.unwrap_or_else(eager)
    }
}

/// Captures `unet` called on copies of `inputs` (its inputs from now on).
fn capture(unet: &UNet2DConditionModel, device: Device, inputs: &[&Tensor; 5]) -> Option<Captured> {
    let held: [Tensor; 5] = std::array::from_fn(|i| inputs[i].copy());
    let (graph, output) = CudaGraph::capture(device, || {
        let added = AddedCond {
            text_embeds: &held[3],
            time_ids: &held[4],
            timestep_cond: None,
        };
        unet.forward(&held[0], &held[1], &held[2], Some(&added))
    })?;
    Some(Captured {
        graph,
        inputs: held,
        output,
    })
}

/// Copies `inputs` into the captured call's, replays it and returns a copy of its output
/// (the next replay overwrites it).
fn replay(captured: &Captured, inputs: &[&Tensor; 5]) -> Option<Tensor> {
    for (held, input) in captured.inputs.iter().zip(inputs) {
        held.shallow_clone().copy_(input);
    }
    captured.graph.replay().then(|| captured.output.copy())
}
