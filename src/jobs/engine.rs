//! The engine as the jobs layer holds it: the model cache on the thread that owns the
//! device, mirrored into the set of resident paths the models RPC reads, and the way
//! LoRA adapters are applied.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use crate::engine::cache::{
    detector_activation_estimate, generation_estimate, text_encoding_estimate, Activations,
    CacheStats, Fit, GenerationEstimate, ModelCache, ModelPath,
};
use crate::engine::codec::VaeCodec;
use crate::engine::device::{self, Placement};
use crate::engine::error::EngineError;
use crate::engine::hashes::FileHashes;
use crate::engine::ip_adapter::IpAdapter;
use crate::engine::loading::lora::LoraWeights;
use crate::engine::lora::LoraMode;
use crate::engine::models::clip_vision::ClipVisionModel;
use crate::engine::models::control_model::ControlModel;
use crate::engine::pipeline::{GenerateParams, InitImage, SdxlPipeline};
use crate::engine::preprocess::detector::{Detector, DetectorNetwork};
use crate::engine::preprocess::Preprocessing;
use crate::engine::registry::{ModelEntry, ModelKind};
use crate::engine::textual_inversion::{default_token, Embedding};
use crate::engine::upscale::Upscaler;

/// The model cache, on the engine thread only (tensors are not shared across threads).
pub struct Engine {
    cache: ModelCache,
    /// The paths loaded, shared with the models RPC.
    resident: Arc<Mutex<HashSet<PathBuf>>>,
    /// How LoRA adapters are applied.
    lora_mode: LoraMode,
}

/// How a job fits the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// How its LoRA adapters are applied.
    pub lora_mode: LoraMode,
    /// Whether its text encoders must leave the device once its prompts are encoded.
    pub fit: Fit,
    /// Whether its images are decoded tile by tile (the budget holds one tile's
    /// activations, not a whole image's).
    pub tiled_decode: bool,
}

/// How a model loads into the cache.
pub fn model_path(model: &ModelEntry) -> ModelPath<'_> {
    match model.kind {
        ModelKind::Vae => ModelPath::Vae(&model.path),
        ModelKind::Lora => ModelPath::Lora(&model.path),
        ModelKind::ControlNet => ModelPath::ControlNet(&model.path),
        ModelKind::Upscaler => ModelPath::Upscaler(&model.path),
        ModelKind::Preprocessor => ModelPath::Detector(&model.path),
        ModelKind::IpAdapter => ModelPath::IpAdapter(&model.path),
        ModelKind::ImageEncoder => ModelPath::ImageEncoder(&model.path),
        _ => ModelPath::Pipeline(&model.path),
    }
}

/// How a model of a job on the base model `base` loads into the cache: a Control-LoRA is
/// built on the base's UNet.
pub fn model_path_on<'a>(model: &'a ModelEntry, base: &'a ModelEntry) -> ModelPath<'a> {
    if model.controlnet.as_ref().is_some_and(|f| f.control_lora) {
        ModelPath::ControlLora {
            file: &model.path,
            base: &base.path,
        }
    } else {
        model_path(model)
    }
}

impl Engine {
    /// An engine with nothing loaded, at most `budget` bytes of models and activations on
    /// the device and `host_budget` bytes of evicted components on the host, hashing
    /// files into `hashes`; `resident` mirrors what it holds.
    pub fn new(
        placement: Placement,
        budget: Option<u64>,
        host_budget: u64,
        hashes: Arc<FileHashes>,
        resident: Arc<Mutex<HashSet<PathBuf>>>,
    ) -> Self {
        Self {
            cache: ModelCache::with_host_budget(placement, budget, host_budget).with_hashes(hashes),
            resident,
            lora_mode: LoraMode::default(),
        }
    }

    /// An engine for one process's own use (the CLI): at most `budget` bytes on the
    /// device, nothing kept on the host, nothing shared.
    pub fn local(placement: Placement, budget: Option<u64>) -> Self {
        Self::new(
            placement,
            budget,
            0,
            FileHashes::new(),
            Arc::new(Mutex::new(HashSet::new())),
        )
    }

    /// This engine applying LoRA adapters the `mode` way.
    pub fn with_lora_mode(self, mode: LoraMode) -> Self {
        Self {
            lora_mode: mode,
            ..self
        }
    }

    /// Device and precision.
    pub fn placement(&self) -> Placement {
        self.cache.placement()
    }

    /// What the cache holds.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Device bytes the memory budget leaves beside the resident models (`None`: no
    /// budget).
    pub fn free_bytes(&self) -> Option<u64> {
        let resident = self.cache.stats().resident_bytes;
        self.cache.budget().map(|b| b.saturating_sub(resident))
    }

    /// The file hashes the cache computes.
    pub fn hashes(&self) -> &Arc<FileHashes> {
        self.cache.hashes()
    }

    fn publish(&self) {
        if let Ok(mut resident) = self.resident.lock() {
            *resident = self.cache.resident_paths().into_iter().collect();
        }
    }

    /// The bytes running a detector of `network` for `preprocessing` on a
    /// `width`×`height` image takes beyond its weights.
    pub fn detector_activations(
        &self,
        network: DetectorNetwork,
        preprocessing: Preprocessing,
        (width, height): (u32, u32),
    ) -> u64 {
        let element = self.placement().kind.elt_size_in_bytes() as u64;
        let size = preprocessing.detected_size(width, height);
        detector_activation_estimate(network, size, element)
    }

    /// Makes room for a job using `models` whose denoising passes run with `passes`, each
    /// on its pipeline (one after the other: the largest of each part of their estimates
    /// counts), evicting
    /// what it does not use,
    /// and says how its LoRA adapters are applied and its images decoded: merging the
    /// adapters takes `lora_copies` more bytes while the job runs, which the auto mode
    /// spends only if the budget has them; a job whose whole decode does not fit decodes
    /// tile by tile if that fits (preferred last: tiles are blended, so the image
    /// differs a little). Its detectors run before its prompts are encoded, so
    /// `detector_activations` (their largest need) counts until then; a job that fits
    /// only without its text encoders from the denoising on is told so. Refused, the
    /// error of the last (smallest) way tried.
    pub fn make_room(
        &mut self,
        models: &[ModelPath<'_>],
        passes: &[(&Path, GenerateParams)],
        detector_activations: u64,
        lora_copies: u64,
    ) -> Result<Room, EngineError> {
        let element = self.placement().kind.elt_size_in_bytes() as u64;
        let generation = passes
            .iter()
            .map(|(pipeline, pass)| generation_estimate(pipeline, pass, element))
            .fold(GenerationEstimate::default(), GenerationEstimate::max);
        // Each pipeline encodes the prompts in turn: the widest text encoders count.
        let encoding = models
            .iter()
            .filter_map(|m| match m {
                ModelPath::Pipeline(path) => Some(text_encoding_estimate(path, element)),
                ModelPath::Vae(_)
                | ModelPath::ControlNet(_)
                | ModelPath::ControlLora { .. }
                | ModelPath::Lora(_)
                | ModelPath::Upscaler(_)
                | ModelPath::Detector(_)
                | ModelPath::IpAdapter(_)
                | ModelPath::ImageEncoder(_) => None,
            })
            .max()
            .unwrap_or(0);
        let mut result = Err(EngineError::Internal("no way to fit the job".into()));
        for (lora_mode, tiled_decode) in self.ways_to_fit(lora_copies, generation) {
            let copies = if lora_mode == LoraMode::Merge {
                lora_copies
            } else {
                0
            };
            let decoding = if tiled_decode {
                generation.tiled()
            } else {
                generation.whole()
            };
            let needs = Activations {
                encoding: detector_activations.max(encoding) + copies,
                denoising: decoding + copies,
            };
            result = self.cache.make_room_for(models, needs).map(|fit| Room {
                lora_mode,
                fit,
                tiled_decode,
            });
            match &result {
                Err(EngineError::MemoryBudget(_)) => continue,
                _ => break,
            }
        }
        if let Ok(room) = &result {
            if room.lora_mode == LoraMode::Forward && self.lora_mode == LoraMode::Auto {
                tracing::info!(
                    lora_copies,
                    "merged LoRA weights would not fit the memory budget; applying them in the forward pass"
                );
            }
            if room.tiled_decode {
                tracing::info!(
                    "a whole decode would not fit the memory budget; decoding tile by tile"
                );
            }
        }
        self.publish();
        result
    }

    /// The ways a job may fit, in the order they are tried: (LoRA mode, tiled decode).
    fn ways_to_fit(
        &self,
        lora_copies: u64,
        generation: GenerationEstimate,
    ) -> Vec<(LoraMode, bool)> {
        let modes = match self.lora_mode {
            LoraMode::Auto if lora_copies > 0 => vec![LoraMode::Merge, LoraMode::Forward],
            LoraMode::Auto | LoraMode::Merge => vec![LoraMode::Merge],
            LoraMode::Forward => vec![LoraMode::Forward],
        };
        let decodes: &[bool] = if generation.tiled() < generation.whole() {
            &[false, true]
        } else {
            &[false]
        };
        decodes
            .iter()
            .flat_map(|&tiled| modes.iter().map(move |&mode| (mode, tiled)))
            .collect()
    }

    /// Moves the text encoders of the pipelines at `paths` to the host once a job that
    /// fits only without them has encoded its prompts.
    pub fn offload_text_encoders(&mut self, paths: &[&std::path::Path]) {
        let bytes = self.cache.offload_text_encoders(paths);
        tracing::info!(
            bytes,
            "text encoders moved to the host to keep the job within the memory budget"
        );
        self.publish();
    }

    /// The pipeline of `model`, loading it on first use.
    pub fn pipeline(&mut self, model: &ModelEntry) -> Result<Rc<SdxlPipeline>, EngineError> {
        let pipeline = self.cache.pipeline(&model.path);
        self.publish();
        pipeline
    }

    /// The VAE `model`, loading it on first use.
    pub fn vae(&mut self, model: &ModelEntry) -> Result<Rc<VaeCodec>, EngineError> {
        let vae = self.cache.vae(&model.path);
        self.publish();
        vae
    }

    /// The ControlNet `model` for units controlling `base`, loading it on first use (a
    /// Control-LoRA is built on `base`'s UNet).
    pub fn controlnet(
        &mut self,
        model: &ModelEntry,
        base: &SdxlPipeline,
    ) -> Result<Rc<ControlModel>, EngineError> {
        let controlnet = self.cache.controlnet(&model.path, base);
        self.publish();
        controlnet
    }

    /// The ControlNet `model` that needs no base model (not a Control-LoRA), loading it
    /// on first use.
    fn controlnet_alone(&mut self, model: &ModelEntry) -> Result<Rc<ControlModel>, EngineError> {
        let controlnet = self.cache.controlnet_alone(&model.path);
        self.publish();
        controlnet
    }

    /// The preprocessor network `model`, loading it on first use.
    pub fn detector(&mut self, model: &ModelEntry) -> Result<Rc<Detector>, EngineError> {
        let detector = self.cache.detector(&model.path);
        self.publish();
        detector
    }

    /// The upscaler `model`, loading it on first use.
    pub fn upscaler(&mut self, model: &ModelEntry) -> Result<Rc<Upscaler>, EngineError> {
        let upscaler = self.cache.upscaler(&model.path);
        self.publish();
        upscaler
    }

    /// The IP-Adapter `model`, loading it on first use.
    pub fn ip_adapter(&mut self, model: &ModelEntry) -> Result<Rc<IpAdapter>, EngineError> {
        let adapter = self.cache.ip_adapter(&model.path);
        self.publish();
        adapter
    }

    /// The CLIP image encoder `model`, loading it on first use.
    pub fn image_encoder(
        &mut self,
        model: &ModelEntry,
    ) -> Result<Rc<ClipVisionModel>, EngineError> {
        let encoder = self.cache.image_encoder(&model.path);
        self.publish();
        encoder
    }

    /// The LoRA adapter `model`, loading it on first use.
    pub fn lora(&mut self, model: &ModelEntry) -> Result<Rc<LoraWeights>, EngineError> {
        let lora = self.cache.lora(&model.path, &model.name);
        self.publish();
        lora
    }

    /// Whether `model` is loaded.
    pub fn is_resident(&self, model: &ModelEntry) -> bool {
        self.cache.is_resident(&model.path)
    }

    /// Loads `model` (an admin request), making room for it.
    pub fn load(&mut self, model: &ModelEntry) -> Result<(), EngineError> {
        // A Control-LoRA is built on the UNet of a job's base model: it has none here.
        if model.controlnet.as_ref().is_some_and(|f| f.control_lora) {
            return Err(EngineError::Incompatible(format!(
                "`{}` is a Control-LoRA: it is built on the UNet of the base model a request names, when that request runs",
                model.name
            )));
        }
        // An embedding (kilobytes, read by each job that uses it) is not cached: loading
        // it checks its file.
        if model.kind != ModelKind::Embedding {
            self.cache.make_room(&[model_path(model)], 0)?;
        }
        match model.kind {
            ModelKind::Vae => self.vae(model).map(|_| ()),
            ModelKind::Lora => self.lora(model).map(|_| ()),
            ModelKind::ControlNet => self.controlnet_alone(model).map(|_| ()),
            ModelKind::Upscaler => self.upscaler(model).map(|_| ()),
            ModelKind::Preprocessor => self.detector(model).map(|_| ()),
            ModelKind::IpAdapter => self.ip_adapter(model).map(|_| ()),
            ModelKind::ImageEncoder => self.image_encoder(model).map(|_| ()),
            ModelKind::Base | ModelKind::Refiner => self.pipeline(model).map(|_| ()),
            ModelKind::Embedding => {
                let token = default_token(&model.name);
                Embedding::read(&model.path, 0, &model.name, token).map(|_| ())
            }
        }?;
        // The cache hashed the files it loaded; the rest (configs, tokenizers) now.
        let _ = self.hashes().model(model);
        Ok(())
    }

    /// After the device ran out of memory: evicts every model the job does not use and
    /// returns the allocator's free blocks to the driver.
    pub fn free_memory(&mut self, keep: &[PathBuf]) {
        self.cache.evict_all_except(keep);
        device::empty_cache(self.placement().device);
        self.publish();
    }

    /// Unloads `model`; whether it was loaded.
    pub fn unload(&mut self, model: &ModelEntry) -> bool {
        let was = self.cache.unload(&model.path);
        self.publish();
        was
    }

    /// Loads `model` and runs one small denoising step, so the first request does not pay
    /// for lazy initialisation.
    pub fn warm_up(&mut self, model: &ModelEntry) -> Result<(), EngineError> {
        self.load(model)?;
        let pipeline = self.pipeline(model)?;
        // Inpainting models cannot run text to image: warm them up on a blank image.
        let init_image = pipeline.is_inpainting().then(|| InitImage {
            width: 64,
            height: 64,
            pixels: vec![127; 64 * 64 * 3],
            strength: 1.0,
            mask: Some(vec![255; 64 * 64]),
            denoising_start: None,
        });
        let params = GenerateParams {
            prompt: "warm-up".into(),
            width: 64,
            height: 64,
            steps: 1,
            init_image,
            ..GenerateParams::default()
        };
        let _latents = pipeline.denoise_all(&params, &mut |_| {})?;
        Ok(())
    }
}
