//! The model cache: pipelines, VAEs, ControlNets, upscalers, detectors, IP-Adapters and
//! image encoders by path, their components shared by content hash,
//! and the bytes they hold at the placement kept under a budget by evicting the least
//! recently used models that the job at hand does not need.
//!
//! Components are reference-counted: a component lives while a resident pipeline (or a
//! running job) holds it, so evicting a model releases exactly the components no other
//! resident model shares. Those are parked on the host while the host budget allows
//! (their parameters moved in place, so bringing them back is a copy, not a load), and
//! dropped otherwise. A job that fits the budget only without its text encoders moves
//! them to the host once its prompts are encoded (offloaded: their models stay resident,
//! and the next use brings them back).

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::engine::codec::VaeCodec;
use crate::engine::components::{shared, ComponentFiles, ComponentStore};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::hashes::{hex, FileHashes};
use crate::engine::ip_adapter::IpAdapter;
use crate::engine::loading::control_lora;
use crate::engine::loading::lora::LoraWeights;
use crate::engine::models::clip_vision::ClipVisionModel;
use crate::engine::models::control_model::ControlModel;
use crate::engine::pipeline::SdxlPipeline;
use crate::engine::preprocess::detector::Detector;
use crate::engine::upscale::Upscaler;

mod budget;
mod offload;
mod paths;
mod sizes;

pub use budget::{Activations, Fit};
pub use paths::ModelPath;
use paths::{
    control_lora_files, controlnet_files, detector_files, ip_adapter_files, upscaler_files,
    CONTROL_LORA_ROLE,
};
pub use sizes::{
    activation_estimate, detector_activation_estimate, generation_estimate, text_encoding_estimate,
    GenerationEstimate,
};

/// A loaded component, known by its content.
struct Live {
    component: Weak<dyn Any>,
    /// What it is (`unet`, `text_encoder`, ...).
    role: &'static str,
    bytes: u64,
    /// Handles to its parameters, to move it between the device and the host.
    params: Vec<Tensor>,
}

/// A component parked on the host after the models using it were evicted.
struct Parked {
    component: Rc<dyn Any>,
    parked_at: u64,
}

/// A resident model, when it was last used, and the components it holds.
struct Resident<T> {
    model: Rc<T>,
    last_used: u64,
    components: Vec<String>,
}

/// A LoRA adapter at the placement.
struct ResidentLora {
    weights: Rc<LoraWeights>,
    last_used: u64,
    /// The files with this content it was asked for by.
    paths: Vec<PathBuf>,
}

/// What the cache holds and what loading costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of the components resident at the placement.
    pub resident_bytes: u64,
    /// Bytes of the components on the host: parked, or offloaded for a job.
    pub host_bytes: u64,
    /// Components loaded from disk since start.
    pub component_loads: u64,
    /// Components brought back from the host instead of from disk since start.
    pub host_reloads: u64,
    /// Models evicted since start.
    pub evictions: u64,
    /// Text encoders offloaded to the host to fit a job since start.
    pub text_encoder_offloads: u64,
}

/// Pipelines and VAEs by path, sharing components by content.
pub struct ModelCache {
    placement: Placement,
    /// Most bytes of components at the placement; `None` for no limit.
    budget: Option<u64>,
    /// Most bytes of evicted components kept on the host; 0 drops them.
    host_budget: u64,
    components: HashMap<String, Live>,
    parked: HashMap<String, Parked>,
    /// Components of resident models moved to the host for the job at hand.
    offloaded: HashSet<String>,
    pipelines: HashMap<PathBuf, Resident<SdxlPipeline>>,
    vaes: HashMap<PathBuf, Resident<VaeCodec>>,
    controlnets: HashMap<PathBuf, Resident<ControlModel>>,
    /// The base pipeline each resident Control-LoRA was built on.
    control_lora_bases: HashMap<PathBuf, PathBuf>,
    upscalers: HashMap<PathBuf, Resident<Upscaler>>,
    detectors: HashMap<PathBuf, Resident<Detector>>,
    ip_adapters: HashMap<PathBuf, Resident<IpAdapter>>,
    image_encoders: HashMap<PathBuf, Resident<ClipVisionModel>>,
    /// LoRA adapters by content hash.
    loras: HashMap<String, ResidentLora>,
    /// The process's file hashes (components are known by their files' content).
    hashes: Arc<FileHashes>,
    clock: u64,
    stats: CacheStats,
}

/// The store a model loads through: shares live components, brings parked ones back to
/// the device, counts new ones, and notes which it handed out.
struct Store<'a> {
    cache: &'a mut ModelCache,
    handed_out: Vec<String>,
}

impl ComponentStore for Store<'_> {
    fn get_or_load(
        &mut self,
        files: &ComponentFiles,
        load: &mut dyn FnMut() -> Result<Rc<dyn Any>>,
    ) -> Result<Rc<dyn Any>> {
        let (key, bytes) = self.cache.identify(files)?;
        self.handed_out.push(key.clone());
        if let Some(parked) = self.cache.parked.remove(&key) {
            if let Some(live) = self.cache.components.get_mut(&key) {
                move_params(&mut live.params, self.cache.placement.device);
            }
            self.cache.stats.host_reloads += 1;
            return Ok(parked.component);
        }
        if let Some(live) = self
            .cache
            .components
            .get(&key)
            .and_then(|l| l.component.upgrade())
        {
            self.cache.bring_back(std::slice::from_ref(&key));
            return Ok(live);
        }
        let (component, params) = crate::engine::weights::recording(load)?;
        self.cache.stats.component_loads += 1;
        self.cache.components.insert(
            key,
            Live {
                component: Rc::downgrade(&component),
                role: files.role,
                bytes,
                params,
            },
        );
        Ok(component)
    }
}

/// Moves parameters to `device` in place: every module holding them follows.
fn move_params(params: &mut [Tensor], device: Device) {
    let _no_grad = tch::no_grad_guard();
    for p in params.iter_mut() {
        if p.device() != device {
            let moved = p.to_device(device);
            p.set_data(&moved);
        }
    }
}

impl ModelCache {
    /// An empty cache for `placement` with at most `budget` bytes of components there,
    /// dropping what it evicts.
    pub fn new(placement: Placement, budget: Option<u64>) -> Self {
        Self::with_host_budget(placement, budget, 0)
    }

    /// An empty cache that parks up to `host_budget` bytes of evicted components on the
    /// host.
    pub fn with_host_budget(placement: Placement, budget: Option<u64>, host_budget: u64) -> Self {
        Self {
            placement,
            budget,
            host_budget,
            components: HashMap::new(),
            parked: HashMap::new(),
            offloaded: HashSet::new(),
            pipelines: HashMap::new(),
            vaes: HashMap::new(),
            controlnets: HashMap::new(),
            control_lora_bases: HashMap::new(),
            upscalers: HashMap::new(),
            detectors: HashMap::new(),
            ip_adapters: HashMap::new(),
            image_encoders: HashMap::new(),
            loras: HashMap::new(),
            hashes: FileHashes::new(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    /// This cache sharing the process's file hashes.
    pub fn with_hashes(self, hashes: Arc<FileHashes>) -> Self {
        Self { hashes, ..self }
    }

    /// The file hashes it computes and reads.
    pub fn hashes(&self) -> &Arc<FileHashes> {
        &self.hashes
    }

    /// Device and precision.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Counters and the bytes held now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            resident_bytes: self.resident_bytes(),
            host_bytes: self.parked_bytes() + self.offloaded_bytes(),
            ..self.stats
        }
    }

    /// Whether the model at `path` is loaded.
    pub fn is_resident(&self, path: &Path) -> bool {
        self.resident_components(path).is_some()
            || self
                .loras
                .values()
                .any(|l| l.paths.iter().any(|p| p == path))
    }

    /// The paths of the models loaded.
    pub fn resident_paths(&self) -> Vec<PathBuf> {
        self.pipelines
            .keys()
            .chain(self.vaes.keys())
            .chain(self.controlnets.keys())
            .chain(self.upscalers.keys())
            .chain(self.detectors.keys())
            .chain(self.ip_adapters.keys())
            .chain(self.image_encoders.keys())
            .chain(self.loras.values().flat_map(|l| l.paths.iter()))
            .cloned()
            .collect()
    }

    /// Bytes of the components and LoRA adapters on the device.
    fn resident_bytes(&self) -> u64 {
        let components: u64 = self
            .components
            .iter()
            .filter(|(k, _)| self.is_on_device(k))
            .map(|(_, l)| l.bytes)
            .sum();
        components + self.loras.values().map(|l| l.weights.bytes).sum::<u64>()
    }

    /// Whether the component `key` is loaded and at the placement (not parked or
    /// offloaded).
    fn is_on_device(&self, key: &str) -> bool {
        !self.parked.contains_key(key)
            && !self.offloaded.contains(key)
            && self
                .components
                .get(key)
                .is_some_and(|l| l.component.strong_count() > 0)
    }

    fn parked_bytes(&self) -> u64 {
        self.parked
            .keys()
            .filter_map(|k| self.components.get(k))
            .map(|l| l.bytes)
            .sum()
    }

    /// The components of the model loaded from `path`, if one is.
    fn resident_components(&self, path: &Path) -> Option<Vec<String>> {
        let pipeline = self.pipelines.get(path).map(|r| &r.components);
        pipeline
            .or_else(|| self.vaes.get(path).map(|r| &r.components))
            .or_else(|| self.controlnets.get(path).map(|r| &r.components))
            .or_else(|| self.upscalers.get(path).map(|r| &r.components))
            .or_else(|| self.detectors.get(path).map(|r| &r.components))
            .or_else(|| self.ip_adapters.get(path).map(|r| &r.components))
            .or_else(|| self.image_encoders.get(path).map(|r| &r.components))
            .cloned()
    }

    /// When each loaded model was last used, by path.
    fn last_uses(&self) -> Vec<(u64, PathBuf)> {
        fn uses<T>(
            models: &HashMap<PathBuf, Resident<T>>,
        ) -> impl Iterator<Item = (u64, PathBuf)> + '_ {
            models.iter().map(|(p, r)| (r.last_used, p.clone()))
        }
        uses(&self.pipelines)
            .chain(uses(&self.vaes))
            .chain(uses(&self.controlnets))
            .chain(uses(&self.upscalers))
            .chain(uses(&self.detectors))
            .chain(uses(&self.ip_adapters))
            .chain(uses(&self.image_encoders))
            .collect()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Evicts a model: the components no other resident model holds are parked on the
    /// host while the host budget allows (the longest parked dropped first), else dropped.
    fn evict(&mut self, path: &Path) {
        let Some(keys) = self.resident_components(path) else {
            return;
        };
        // Hold the components while the model goes, to see which nothing else holds.
        let held: Vec<(String, Rc<dyn Any>)> = keys
            .into_iter()
            .filter_map(|k| {
                let component = self.components.get(&k)?.component.upgrade()?;
                Some((k, component))
            })
            .collect();
        self.pipelines.remove(path);
        self.vaes.remove(path);
        self.controlnets.remove(path);
        self.control_lora_bases.remove(path);
        self.upscalers.remove(path);
        self.detectors.remove(path);
        self.ip_adapters.remove(path);
        self.image_encoders.remove(path);
        self.stats.evictions += 1;
        let now = self.tick();
        for (key, component) in held {
            let unused = Rc::strong_count(&component) == 1;
            if unused {
                // Parked below or dropped: no longer lent to a resident model.
                self.offloaded.remove(&key);
            }
            let Some(live) = self.components.get_mut(&key) else {
                continue;
            };
            if self.host_budget > 0
                && unused
                && live.bytes <= self.host_budget
                && !self.parked.contains_key(&key)
            {
                move_params(&mut live.params, Device::Cpu);
                self.parked.insert(
                    key,
                    Parked {
                        component,
                        parked_at: now,
                    },
                );
            }
        }
        while self.parked_bytes() > self.host_budget {
            let Some(oldest) = self
                .parked
                .iter()
                .min_by_key(|(_, p)| p.parked_at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.parked.remove(&oldest);
        }
        // Forget the parameter handles of components nothing holds any more, so that
        // their memory goes.
        self.components
            .retain(|_, l| l.component.strong_count() > 0);
    }

    /// SHA-256 of a file, computed once per version.
    fn file_hash(&mut self, path: &Path) -> Result<String> {
        self.hashes.file(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A component's identity (role, prefix and the content of its files) and the bytes
    /// it takes once loaded at the placement.
    fn identify(&mut self, files: &ComponentFiles) -> Result<(String, u64)> {
        let mut hasher = Sha256::new();
        hasher.update(files.role.as_bytes());
        hasher.update(files.prefix.unwrap_or("").as_bytes());
        let mut bytes = 0;
        for path in &files.paths {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            hasher.update(name.unwrap_or_default().as_bytes());
            hasher.update(self.file_hash(path)?.as_bytes());
            if path.extension().is_some_and(|e| e == "safetensors") {
                bytes +=
                    crate::engine::weights::loaded_bytes(path, files.prefix, self.placement.kind)?;
            }
        }
        if let (CONTROL_LORA_ROLE, Some((file, unet))) = (files.role, files.paths.split_first()) {
            bytes = control_lora::built_bytes(file, unet, files.prefix, self.placement.kind)?;
        }
        let key = hex(&hasher.finalize());
        Ok((key, bytes))
    }

    /// The model at `path` in the map `models` picks, loading it through a store on first
    /// use (its components shared with every other model that has them).
    fn resident_or_load<T>(
        &mut self,
        models: fn(&mut Self) -> &mut HashMap<PathBuf, Resident<T>>,
        path: &Path,
        load: impl FnOnce(&mut Store<'_>, Placement) -> Result<Rc<T>>,
    ) -> Result<Rc<T>> {
        let now = self.tick();
        if let Some(r) = models(self).get_mut(path) {
            r.last_used = now;
            let (model, components) = (r.model.clone(), r.components.clone());
            self.bring_back(&components);
            return Ok(model);
        }
        let placement = self.placement;
        let mut store = Store {
            cache: self,
            handed_out: Vec::new(),
        };
        let model = load(&mut store, placement)?;
        let components = store.handed_out;
        models(self).insert(
            path.to_path_buf(),
            Resident {
                model: model.clone(),
                last_used: now,
                components,
            },
        );
        Ok(model)
    }

    /// The pipeline at `path`, loading it (and sharing components) on first use.
    pub fn pipeline(&mut self, path: &Path) -> Result<Rc<SdxlPipeline>> {
        self.resident_or_load(
            |c| &mut c.pipelines,
            path,
            |store, placement| Ok(Rc::new(SdxlPipeline::load_with(path, placement, store)?)),
        )
    }

    /// The VAE folder at `path`, loading it on first use.
    pub fn vae(&mut self, path: &Path) -> Result<Rc<VaeCodec>> {
        let files = ComponentFiles::folder("vae", path);
        self.resident_or_load(
            |c| &mut c.vaes,
            path,
            |store, placement| shared(store, &files, || VaeCodec::load(path, placement)),
        )
    }

    /// The ControlNet folder or file at `path` for units controlling `base`, loading it on
    /// first use. A Control-LoRA is built on `base`'s UNet: one stays resident per file,
    /// built again when another base asks for it.
    pub fn controlnet(&mut self, path: &Path, base: &SdxlPipeline) -> Result<Rc<ControlModel>> {
        // A resident model's kind is known; the file's header is read only to load it.
        let is_control_lora = if self.controlnets.contains_key(path) {
            self.control_lora_bases.contains_key(path)
        } else {
            control_lora::is_control_lora_file(path)
        };
        if is_control_lora {
            return self.control_lora(path, base);
        }
        self.controlnet_alone(path)
    }

    /// The ControlNet folder or file at `path` that needs no base model (not a
    /// Control-LoRA), loading it on first use.
    pub fn controlnet_alone(&mut self, path: &Path) -> Result<Rc<ControlModel>> {
        let files = controlnet_files(path);
        self.resident_or_load(
            |c| &mut c.controlnets,
            path,
            |store, placement| shared(store, &files, || ControlModel::load_path(path, placement)),
        )
    }

    /// The ControlNet the Control-LoRA at `path` builds on `base`'s UNet.
    fn control_lora(&mut self, path: &Path, base: &SdxlPipeline) -> Result<Rc<ControlModel>> {
        if self
            .control_lora_bases
            .get(path)
            .is_some_and(|built_on| built_on != base.dir())
        {
            self.evict(path);
        }
        let files = control_lora_files(path, base.dir());
        let model = self.resident_or_load(
            |c| &mut c.controlnets,
            path,
            |store, placement| {
                shared(store, &files, || {
                    let unet = base.unet_weights(placement)?;
                    let model = control_lora::load(path, unet, base.unet().config(), placement)?;
                    Ok(ControlModel::ControlNet(Box::new(model)))
                })
            },
        )?;
        self.control_lora_bases
            .insert(path.to_path_buf(), base.dir().to_path_buf());
        Ok(model)
    }

    /// The upscaler file at `path`, loading it on first use.
    pub fn upscaler(&mut self, path: &Path) -> Result<Rc<Upscaler>> {
        let files = upscaler_files(path);
        self.resident_or_load(
            |c| &mut c.upscalers,
            path,
            |store, placement| {
                shared(store, &files, || {
                    Upscaler::load(path, placement.device, placement.kind)
                })
            },
        )
    }

    /// The preprocessor network at `path`, loading it on first use.
    pub fn detector(&mut self, path: &Path) -> Result<Rc<Detector>> {
        let files = detector_files(path);
        self.resident_or_load(
            |c| &mut c.detectors,
            path,
            |store, placement| {
                shared(store, &files, || {
                    Detector::load(path, placement.device, placement.kind)
                })
            },
        )
    }

    /// The IP-Adapter file at `path`, loading it on first use.
    pub fn ip_adapter(&mut self, path: &Path) -> Result<Rc<IpAdapter>> {
        let files = ip_adapter_files(path);
        self.resident_or_load(
            |c| &mut c.ip_adapters,
            path,
            |store, placement| {
                shared(store, &files, || {
                    IpAdapter::load(path, placement.device, placement.kind)
                })
            },
        )
    }

    /// The CLIP image encoder folder at `path`, loading it on first use.
    pub fn image_encoder(&mut self, path: &Path) -> Result<Rc<ClipVisionModel>> {
        let files = ComponentFiles::folder("image_encoder", path);
        self.resident_or_load(
            |c| &mut c.image_encoders,
            path,
            |store, placement| {
                shared(store, &files, || {
                    ClipVisionModel::load_dir(path, placement.device, placement.kind)
                })
            },
        )
    }

    /// The LoRA adapter at `path` (named `name` in errors), loading it on first use; files
    /// with the same content share one copy.
    pub fn lora(&mut self, path: &Path, name: &str) -> Result<Rc<LoraWeights>> {
        let now = self.tick();
        let hash = self.file_hash(path)?;
        if let Some(resident) = self.loras.get_mut(&hash) {
            resident.last_used = now;
            if !resident.paths.iter().any(|p| p == path) {
                resident.paths.push(path.to_path_buf());
            }
            return Ok(resident.weights.clone());
        }
        let placement = self.placement;
        let weights = Rc::new(LoraWeights::load(
            path,
            name,
            placement.device,
            placement.kind,
        )?);
        self.stats.component_loads += 1;
        self.loras.insert(
            hash,
            ResidentLora {
                weights: weights.clone(),
                last_used: now,
                paths: vec![path.to_path_buf()],
            },
        );
        Ok(weights)
    }

    /// Whether a LoRA with the content of the file at `path` is loaded.
    pub fn is_lora_resident(&mut self, path: &Path) -> bool {
        self.file_hash(path)
            .is_ok_and(|hash| self.loras.contains_key(&hash))
    }

    /// Evicts every model but those at `keep` (after the device ran out of memory).
    pub fn evict_all_except(&mut self, keep: &[PathBuf]) {
        let victims: Vec<PathBuf> = self
            .resident_paths()
            .into_iter()
            .filter(|p| !keep.contains(p))
            .collect();
        for path in victims {
            self.evict(&path);
        }
        // The kept pipelines' CUDA graphs hold activations of calls no longer running.
        for resident in self.pipelines.values() {
            resident.model.release_graphs();
        }
        // The running job holds its own adapters.
        self.loras.retain(|_, l| Rc::strong_count(&l.weights) > 1);
    }

    /// Evicts the model at `path` (its components go unless another resident model
    /// shares them, or the host keeps them). Whether it was resident.
    pub fn unload(&mut self, path: &Path) -> bool {
        let was = self.is_resident(path);
        self.evict(path);
        self.loras.retain(|_, l| !l.paths.iter().any(|p| p == path));
        was
    }
}
