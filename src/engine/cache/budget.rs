//! Fitting a job into the device budget: the bytes its models miss, the models evicted to
//! make room, and whether its text encoders must leave the device once its prompts are
//! encoded.

use std::collections::HashSet;
use std::path::PathBuf;

use super::paths::{
    control_lora_files, controlnet_files, detector_files, ip_adapter_files, upscaler_files,
};
use super::{ModelCache, ModelPath};
use crate::engine::components::ComponentFiles;
use crate::engine::error::{EngineError, Result};
use crate::engine::pipeline::SdxlPipeline;

/// What a job needs on the device beyond its weights, before and after its prompts are
/// encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activations {
    /// Until its prompts are encoded (preprocessing and encoding).
    pub encoding: u64,
    /// From its denoising on.
    pub denoising: u64,
}

impl Activations {
    /// The same need all the job long.
    pub fn throughout(bytes: u64) -> Self {
        Self {
            encoding: bytes,
            denoising: bytes,
        }
    }

    fn peak(&self) -> u64 {
        self.encoding.max(self.denoising)
    }
}

/// How a job fits the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// With all its weights on the device all the job long.
    Resident,
    /// Only with its pipelines' text encoders moved to the host once its prompts are
    /// encoded; they come back when a job next uses their model.
    TextEncodersOffloaded,
}

/// The bytes of a job's components at the placement.
struct Needed {
    /// Those not on the device now (not loaded, parked or offloaded).
    missing: u64,
    /// All of them.
    total: u64,
    /// Its pipelines' text encoders.
    text_encoders: u64,
}

pub(super) fn is_text_encoder(role: &str) -> bool {
    role.starts_with("text_encoder")
}

impl ModelCache {
    /// The bytes of the components of `models`, missing or not.
    fn needed_bytes(&mut self, models: &[ModelPath<'_>]) -> Result<Needed> {
        let mut needed = Needed {
            missing: 0,
            total: 0,
            text_encoders: 0,
        };
        let mut seen = HashSet::new();
        for model in models {
            let files = match model {
                ModelPath::Pipeline(path) => SdxlPipeline::component_files(path),
                ModelPath::Vae(path) => vec![ComponentFiles::folder("vae", path)],
                ModelPath::ControlNet(path) => vec![controlnet_files(path)],
                ModelPath::ControlLora { file, base } => vec![control_lora_files(file, base)],
                ModelPath::Upscaler(path) => vec![upscaler_files(path)],
                ModelPath::Detector(path) => vec![detector_files(path)],
                ModelPath::IpAdapter(path) => vec![ip_adapter_files(path)],
                ModelPath::ImageEncoder(path) => {
                    vec![ComponentFiles::folder("image_encoder", path)]
                }
                ModelPath::Lora(path) => {
                    let hash = self.file_hash(path)?;
                    let bytes =
                        crate::engine::weights::loaded_bytes(path, None, self.placement.kind)?;
                    needed.total += bytes;
                    if !self.loras.contains_key(&hash) {
                        needed.missing += bytes;
                    }
                    continue;
                }
            };
            for f in files {
                let (key, bytes) = self.identify(&f)?;
                if !seen.insert(key.clone()) {
                    continue;
                }
                needed.total += bytes;
                if is_text_encoder(f.role) {
                    needed.text_encoders += bytes;
                }
                if !self.is_on_device(&key) {
                    needed.missing += bytes;
                }
            }
        }
        Ok(needed)
    }

    /// Makes room for a job that uses `models` and needs `activations` bytes while it
    /// runs, keeping all its weights on the device: see [`Self::make_room_for`].
    pub fn make_room(&mut self, models: &[ModelPath<'_>], activations: u64) -> Result<()> {
        self.make_room_for(models, Activations::throughout(activations))
            .map(|_| ())
    }

    /// Makes room for a job that uses `models` and needs `activations`: evicts the least
    /// recently used models it does not use until the missing components fit. A job
    /// that fits only with its text encoders on the host once its prompts are encoded is
    /// told so; one that cannot fit even in an empty cache is refused.
    pub fn make_room_for(
        &mut self,
        models: &[ModelPath<'_>],
        activations: Activations,
    ) -> Result<Fit> {
        let Some(budget) = self.budget else {
            return Ok(Fit::Resident);
        };
        let needed = self.needed_bytes(models)?;
        let (fit, running) = fit(&needed, activations, budget)?;
        let keep: Vec<PathBuf> = models.iter().map(|m| m.path().to_path_buf()).collect();
        let mut keep_loras = Vec::new();
        for model in models {
            if let ModelPath::Lora(path) = model {
                keep_loras.push(self.file_hash(path)?);
            }
        }
        while self.resident_bytes() + needed.missing + running > budget {
            if !self.evict_least_recent(&keep, &keep_loras) {
                break;
            }
        }
        Ok(fit)
    }

    /// Evicts the least recently used model or LoRA adapter outside `keep` and
    /// `keep_loras`; whether there was one.
    fn evict_least_recent(&mut self, keep: &[PathBuf], keep_loras: &[String]) -> bool {
        let model = self
            .last_uses()
            .into_iter()
            .filter(|(_, p)| !keep.contains(p))
            .min();
        let lora = self
            .loras
            .iter()
            .filter(|(hash, _)| !keep_loras.contains(hash))
            .map(|(hash, l)| (l.last_used, hash.clone()))
            .min();
        match (model, lora) {
            (Some((used, path)), lora) if lora.as_ref().is_none_or(|(l, _)| used < *l) => {
                tracing::info!(model = %path.display(), "evicting a model to stay within the memory budget");
                self.evict(&path);
            }
            (_, Some((_, hash))) => {
                tracing::info!(lora = %hash, "evicting a LoRA to stay within the memory budget");
                self.loras.remove(&hash);
                self.stats.evictions += 1;
            }
            _ => return false,
        }
        true
    }
}

/// How a job with `needed` weights and `activations` fits `budget`, and the most bytes
/// beyond all its weights it takes while it runs.
fn fit(needed: &Needed, activations: Activations, budget: u64) -> Result<(Fit, u64)> {
    let total = needed.total;
    if total + activations.peak() <= budget {
        return Ok((Fit::Resident, activations.peak()));
    }
    let encoders = needed.text_encoders;
    let without_encoders = total - encoders + activations.denoising;
    if encoders > 0 && total + activations.encoding <= budget && without_encoders <= budget {
        // All weights while encoding; without the encoders' from the denoising on.
        let beyond = activations
            .encoding
            .max(activations.denoising.saturating_sub(encoders));
        return Ok((Fit::TextEncodersOffloaded, beyond));
    }
    let offloaded = if encoders > 0 {
        format!(
            "; {} with its text encoders on the host once its prompts are encoded",
            without_encoders.max(total + activations.encoding)
        )
    } else {
        String::new()
    };
    Err(EngineError::MemoryBudget(format!(
        "the job needs {} bytes ({total} of weights, about {} while it runs{offloaded}) but the budget is {budget}",
        total + activations.peak(),
        activations.peak()
    )))
}
