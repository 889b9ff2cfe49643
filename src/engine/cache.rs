//! The model cache: pipelines and VAEs by path, their components shared by content hash,
//! and the bytes they hold at the placement kept under a budget by evicting the least
//! recently used models that the job at hand does not need.
//!
//! Components are reference-counted: a component lives while a resident pipeline (or a
//! running job) holds it, so evicting a model frees exactly the components no other
//! resident model shares. Evicted components are dropped; loading them again maps their
//! files again (from the page cache when the host has room).

use std::any::Any;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::engine::codec::VaeCodec;
use crate::engine::components::{shared, ComponentFiles, ComponentStore};
use crate::engine::error::{read_json, EngineError, Result};
use crate::engine::pipeline::{GenerateParams, Placement, SdxlPipeline};

/// A loaded component, known by its content.
struct Live {
    component: Weak<dyn Any>,
    bytes: u64,
}

/// A resident model and when it was last used.
struct Resident<T> {
    model: Rc<T>,
    last_used: u64,
}

/// A file's content hash, valid while its size and modification time hold.
type FileHash = (u64, Option<SystemTime>, String);

/// What the cache holds and what loading costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of the components resident at the placement.
    pub resident_bytes: u64,
    /// Components loaded from disk since start.
    pub component_loads: u64,
    /// Models evicted since start.
    pub evictions: u64,
}

/// Pipelines and VAEs by path, sharing components by content.
pub struct ModelCache {
    placement: Placement,
    /// Most bytes of components at the placement; `None` for no limit.
    budget: Option<u64>,
    components: HashMap<String, Live>,
    pipelines: HashMap<PathBuf, Resident<SdxlPipeline>>,
    vaes: HashMap<PathBuf, Resident<VaeCodec>>,
    file_hashes: HashMap<PathBuf, FileHash>,
    clock: u64,
    stats: CacheStats,
}

/// The store a model loads through: shares live components and counts new ones.
struct Store<'a> {
    cache: &'a mut ModelCache,
}

impl ComponentStore for Store<'_> {
    fn get_or_load(
        &mut self,
        files: &ComponentFiles,
        load: &mut dyn FnMut() -> Result<Rc<dyn Any>>,
    ) -> Result<Rc<dyn Any>> {
        let (key, bytes) = self.cache.identify(files)?;
        if let Some(live) = self
            .cache
            .components
            .get(&key)
            .and_then(|l| l.component.upgrade())
        {
            return Ok(live);
        }
        let component = load()?;
        self.cache.stats.component_loads += 1;
        self.cache.components.insert(
            key,
            Live {
                component: Rc::downgrade(&component),
                bytes,
            },
        );
        Ok(component)
    }
}

impl ModelCache {
    /// An empty cache for `placement` with at most `budget` bytes of components there.
    pub fn new(placement: Placement, budget: Option<u64>) -> Self {
        Self {
            placement,
            budget,
            components: HashMap::new(),
            pipelines: HashMap::new(),
            vaes: HashMap::new(),
            file_hashes: HashMap::new(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    /// Device and precision.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Counters and the bytes resident now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            resident_bytes: self.resident_bytes(),
            ..self.stats
        }
    }

    /// Whether the model at `path` is loaded.
    pub fn is_resident(&self, path: &Path) -> bool {
        self.pipelines.contains_key(path) || self.vaes.contains_key(path)
    }

    /// The paths of the models loaded.
    pub fn resident_paths(&self) -> Vec<PathBuf> {
        self.pipelines
            .keys()
            .chain(self.vaes.keys())
            .cloned()
            .collect()
    }

    fn resident_bytes(&self) -> u64 {
        self.components
            .values()
            .filter(|l| l.component.strong_count() > 0)
            .map(|l| l.bytes)
            .sum()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// SHA-256 of a file, computed once per size and modification time.
    fn file_hash(&mut self, path: &Path) -> Result<String> {
        let meta = path.metadata().map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (size, modified) = (meta.len(), meta.modified().ok());
        if let Some((s, m, hash)) = self.file_hashes.get(path) {
            if *s == size && *m == modified {
                return Ok(hash.clone());
            }
        }
        let mut file = std::fs::File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(|source| EngineError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let hash: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.file_hashes
            .insert(path.to_path_buf(), (size, modified, hash.clone()));
        Ok(hash)
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
                bytes += crate::engine::loading::weights::loaded_bytes(
                    path,
                    files.prefix,
                    self.placement.kind,
                )?;
            }
        }
        let key = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((key, bytes))
    }

    /// Bytes of the components of `paths` (pipelines or VAE folders) that are not loaded.
    fn missing_bytes(&mut self, models: &[ModelPath<'_>]) -> Result<(u64, u64)> {
        let mut missing = 0;
        let mut total = 0;
        let mut seen = std::collections::HashSet::new();
        for model in models {
            let files = match model {
                ModelPath::Pipeline(path) => SdxlPipeline::component_files(path),
                ModelPath::Vae(path) => vec![ComponentFiles::folder("vae", path)],
            };
            for f in files {
                let (key, bytes) = self.identify(&f)?;
                if !seen.insert(key.clone()) {
                    continue;
                }
                total += bytes;
                let live = self
                    .components
                    .get(&key)
                    .is_some_and(|l| l.component.strong_count() > 0);
                if !live {
                    missing += bytes;
                }
            }
        }
        Ok((missing, total))
    }

    /// Makes room for a job that uses `models` and needs `activations` bytes while it
    /// runs: evicts the least recently used models it does not use until the missing
    /// components fit. A job that cannot fit even in an empty cache is refused.
    pub fn make_room(&mut self, models: &[ModelPath<'_>], activations: u64) -> Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let (missing, total) = self.missing_bytes(models)?;
        if total + activations > budget {
            return Err(EngineError::MemoryBudget(format!(
                "the job needs {} bytes ({total} of weights, about {activations} while it runs) but the budget is {budget}",
                total + activations
            )));
        }
        let keep: Vec<PathBuf> = models.iter().map(|m| m.path().to_path_buf()).collect();
        while self.resident_bytes() + missing + activations > budget {
            let victim = self
                .pipelines
                .iter()
                .map(|(p, r)| (r.last_used, p.clone(), true))
                .chain(
                    self.vaes
                        .iter()
                        .map(|(p, r)| (r.last_used, p.clone(), false)),
                )
                .filter(|(_, p, _)| !keep.contains(p))
                .min();
            let Some((_, path, is_pipeline)) = victim else {
                break;
            };
            tracing::info!(model = %path.display(), "evicting a model to stay within the memory budget");
            if is_pipeline {
                self.pipelines.remove(&path);
            } else {
                self.vaes.remove(&path);
            }
            self.stats.evictions += 1;
        }
        Ok(())
    }

    /// The pipeline at `path`, loading it (and sharing components) on first use.
    pub fn pipeline(&mut self, path: &Path) -> Result<Rc<SdxlPipeline>> {
        let now = self.tick();
        if let Some(r) = self.pipelines.get_mut(path) {
            r.last_used = now;
            return Ok(r.model.clone());
        }
        let placement = self.placement;
        let pipeline = Rc::new(SdxlPipeline::load_with(
            path,
            placement,
            &mut Store { cache: self },
        )?);
        self.pipelines.insert(
            path.to_path_buf(),
            Resident {
                model: pipeline.clone(),
                last_used: now,
            },
        );
        Ok(pipeline)
    }

    /// The VAE folder at `path`, loading it on first use.
    pub fn vae(&mut self, path: &Path) -> Result<Rc<VaeCodec>> {
        let now = self.tick();
        if let Some(r) = self.vaes.get_mut(path) {
            r.last_used = now;
            return Ok(r.model.clone());
        }
        let placement = self.placement;
        let files = ComponentFiles::folder("vae", path);
        let vae = shared(&mut Store { cache: self }, &files, || {
            VaeCodec::load(path, placement)
        })?;
        self.vaes.insert(
            path.to_path_buf(),
            Resident {
                model: vae.clone(),
                last_used: now,
            },
        );
        Ok(vae)
    }

    /// Evicts every model but those at `keep` (after the device ran out of memory).
    pub fn evict_all_except(&mut self, keep: &[PathBuf]) {
        let before = self.pipelines.len() + self.vaes.len();
        self.pipelines.retain(|p, _| keep.contains(p));
        self.vaes.retain(|p, _| keep.contains(p));
        self.stats.evictions += (before - self.pipelines.len() - self.vaes.len()) as u64;
    }

    /// Drops the model at `path` from the cache (its components go unless another
    /// resident model shares them). Whether it was resident.
    pub fn unload(&mut self, path: &Path) -> bool {
        self.pipelines.remove(path).is_some() | self.vaes.remove(path).is_some()
    }
}

/// A model a job uses, by kind of loading.
#[derive(Debug, Clone, Copy)]
pub enum ModelPath<'a> {
    /// A pipeline (folder or single file).
    Pipeline(&'a Path),
    /// A VAE folder.
    Vae(&'a Path),
}

impl ModelPath<'_> {
    fn path(&self) -> &Path {
        match self {
            ModelPath::Pipeline(p) | ModelPath::Vae(p) => p,
        }
    }
}

/// Channels of the first UNet and VAE levels of a model (SDXL's when unreadable).
fn first_channels(path: &Path) -> (u64, u64) {
    let first = |v: &serde_json::Value| {
        v.get("block_out_channels")
            .and_then(|c| c.get(0))
            .and_then(serde_json::Value::as_u64)
    };
    if path.is_file() {
        let configs = crate::engine::loading::weights::read_header(path)
            .ok()
            .and_then(|(_, m)| {
                crate::engine::loading::single_file::Configs::from_metadata(path, &m).ok()
            });
        return configs.map_or((320, 128), |c| {
            (first(&c.unet).unwrap_or(320), first(&c.vae).unwrap_or(128))
        });
    }
    let read = |sub: &str| read_json::<serde_json::Value>(&path.join(sub).join("config.json")).ok();
    (
        read("unet").as_ref().and_then(first).unwrap_or(320),
        read("vae").as_ref().and_then(first).unwrap_or(128),
    )
}

/// A rough estimate of the bytes a generation needs beyond the weights: the UNet's
/// widest activations at latent resolution for the guided batch, and the VAE decoder's
/// full-resolution activations, a few tensors of each alive at once.
pub fn activation_estimate(model: &Path, p: &GenerateParams, element_bytes: u64) -> u64 {
    let (unet_channels, vae_channels) = first_channels(model);
    let pixels = (p.width.max(0) as u64) * (p.height.max(0) as u64);
    let latent_pixels = pixels / 64;
    let batch = if p.guidance_scale > 1.0 { 2 } else { 1 };
    let unet = 8 * batch * latent_pixels * unet_channels * 4 * element_bytes;
    let vae = 4 * pixels * vae_channels * element_bytes;
    unet + vae
}
