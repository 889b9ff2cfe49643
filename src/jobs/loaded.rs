//! The models of a job once loaded, with its adapters applied for as long as it runs.

use std::rc::Rc;

use crate::engine::ip_adapter::IpAdapter;
use crate::engine::models::clip_vision::ClipVisionModel;
use crate::engine::models::control_model::ControlModel;
use crate::engine::pipeline::SdxlPipeline;
use crate::engine::textual_inversion::Embedding;
use crate::engine::upscale::Upscaler;
use crate::jobs::detectors::LoadedNetworks;
use crate::jobs::lora_sets::LoraSets;

/// The models of a job, loaded, with its adapters applied for as long as it runs.
pub(crate) struct Loaded {
    pub base: Rc<SdxlPipeline>,
    /// The hires pass's own base model, when it runs another than `base`.
    pub hires_model: Option<HiresModel>,
    pub refiner: Option<Rc<SdxlPipeline>>,
    /// The ControlNet of each unit, in unit order.
    pub controlnets: Vec<Rc<ControlModel>>,
    /// The upscaler of each post-processing step, in step order.
    pub upscalers: Vec<Rc<Upscaler>>,
    /// The hires pass's upscaler model.
    pub hires_upscaler: Option<Rc<Upscaler>>,
    /// Each unit input's networks, by unit.
    pub detectors: Vec<Vec<LoadedNetworks>>,
    /// The job fits the memory budget only with its text encoders on the host once its
    /// prompts are encoded.
    pub offload_text_encoders: bool,
    /// The job fits the memory budget only with its images decoded tile by tile.
    pub tiled_decode: bool,
    /// The textual inversion embeddings, in request order.
    pub embeddings: Vec<Embedding>,
    /// Each image prompt's adapter and image encoder, in request order.
    pub ip_adapters: Vec<LoadedImagePrompt>,
    /// The LoRA sets, the first pass's on the pipeline until a pass switches.
    pub loras: LoraSets,
}

/// The hires pass's own base model (A1111's "Hires checkpoint") with the pass's LoRA set
/// on it for as long as the job runs.
pub(crate) struct HiresModel {
    pub pipeline: Rc<SdxlPipeline>,
    /// Held: dropping it takes the set off.
    pub _loras: LoraSets,
}

impl Loaded {
    /// The pipeline that runs the hires pass: its own model, else the base.
    pub fn hires_pipeline(&self) -> &Rc<SdxlPipeline> {
        self.hires_model
            .as_ref()
            .map_or(&self.base, |m| &m.pipeline)
    }

    /// The pipeline whose VAE decodes the job's final latents: the refiner's, else the
    /// hires pass's.
    pub fn decoder(&self) -> Rc<SdxlPipeline> {
        (self.refiner.clone()).unwrap_or_else(|| self.hires_pipeline().clone())
    }
}

/// An image prompt's IP-Adapter and image encoder, loaded.
pub(crate) struct LoadedImagePrompt {
    pub adapter: Rc<IpAdapter>,
    pub encoder: Rc<ClipVisionModel>,
}
