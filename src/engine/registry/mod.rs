//! Model names to folders: configured roots resolve names; no name can reach a file
//! outside its root (invariant 4).

use std::path::{Component, Path, PathBuf};

use crate::engine::error::read_json;
use crate::engine::loading::single_file::Configs;
use crate::engine::models::clip::ClipTextConfig;
use crate::engine::schedulers::SchedulerKind;

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The name is malformed (empty, absolute, `..`, NUL, backslash, too long).
    #[error("invalid model name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// No root holds the name.
    #[error("model `{0}` not found")]
    NotFound(String),
    /// The name is a pickle-based file, which is never loaded at request time.
    #[error("model `{name}` is a pickle file ({file}); convert it with `sdxld convert` first")]
    Pickle {
        /// The name.
        name: String,
        /// The file's name under its root.
        file: String,
    },
}

impl RegistryError {
    /// Why a malformed name is refused (the whole message for other errors).
    pub fn reason(&self) -> String {
        match self {
            RegistryError::InvalidName { reason, .. } => reason.to_string(),
            other => other.to_string(),
        }
    }
}

/// Extensions of pickle-based weight files.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Whether `path` has the extension of a pickle-based weight file.
fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
}

/// Whether `path` is a single-file SDXL checkpoint (judged by its header's names).
fn is_single_file_checkpoint(path: &Path) -> bool {
    path.is_file()
        && path.extension().is_some_and(|e| e == "safetensors")
        && crate::engine::weights::read_header(path).is_ok_and(|(names, _)| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            crate::engine::loading::single_file::is_sdxl_checkpoint(&names)
        })
}

/// What a model is for; each kind has its own roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelKind {
    /// A text-to-image SDXL pipeline (diffusers folder).
    Base,
    /// An SDXL refiner pipeline (diffusers folder, second text encoder only).
    Refiner,
    /// A VAE (diffusers AutoencoderKL folder).
    Vae,
    /// A LoRA adapter (`.safetensors` file).
    Lora,
    /// A ControlNet (diffusers ControlNetModel folder).
    ControlNet,
    /// A super-resolution upscaler (`.safetensors` file).
    Upscaler,
}

impl ModelKind {
    /// Every kind with roots, in listing order.
    pub const ALL: [ModelKind; 6] = [
        ModelKind::Base,
        ModelKind::Refiner,
        ModelKind::Vae,
        ModelKind::Lora,
        ModelKind::ControlNet,
        ModelKind::Upscaler,
    ];

    /// Whether models of this kind may be single `.safetensors` files (named without the
    /// extension).
    fn takes_files(self) -> bool {
        matches!(
            self,
            ModelKind::Base | ModelKind::Lora | ModelKind::Upscaler
        )
    }

    /// The configuration key of this kind's roots.
    pub fn roots_key(self) -> &'static str {
        match self {
            ModelKind::Base => "models.base_roots",
            ModelKind::Refiner => "models.refiner_roots",
            ModelKind::Vae => "models.vae_roots",
            ModelKind::Lora => "models.lora_roots",
            ModelKind::ControlNet => "models.controlnet_roots",
            ModelKind::Upscaler => "models.upscaler_roots",
        }
    }

    /// Whether `path` holds a model of this kind.
    fn holds(self, path: &Path) -> bool {
        match self {
            ModelKind::Base => {
                path.join("model_index.json").is_file() || is_single_file_checkpoint(path)
            }
            ModelKind::Refiner => path.join("model_index.json").is_file(),
            ModelKind::Vae => class_name(path).is_some_and(|c| c == "AutoencoderKL"),
            ModelKind::ControlNet => class_name(path).is_some_and(|c| c == "ControlNetModel"),
            ModelKind::Lora | ModelKind::Upscaler => {
                path.is_file() && path.extension().is_some_and(|e| e == "safetensors")
            }
        }
    }
}

/// The `_class_name` of a diffusers component folder's config.
fn class_name(path: &Path) -> Option<String> {
    let config: serde_json::Value = read_json(&path.join("config.json")).ok()?;
    config.get("_class_name")?.as_str().map(str::to_string)
}

/// The model roots of each kind.
#[derive(Debug, Clone, Default)]
pub struct ModelRoots {
    /// Base pipelines.
    pub base: Vec<PathBuf>,
    /// Refiner pipelines.
    pub refiner: Vec<PathBuf>,
    /// VAEs.
    pub vae: Vec<PathBuf>,
    /// LoRA adapters.
    pub lora: Vec<PathBuf>,
    /// ControlNets.
    pub controlnet: Vec<PathBuf>,
    /// Upscalers.
    pub upscaler: Vec<PathBuf>,
}

impl ModelRoots {
    /// Every root of every kind.
    pub fn all(&self) -> Vec<PathBuf> {
        ModelKind::ALL
            .iter()
            .flat_map(|kind| self.of(*kind).iter().cloned())
            .collect()
    }

    fn of(&self, kind: ModelKind) -> &[PathBuf] {
        match kind {
            ModelKind::Base => &self.base,
            ModelKind::Refiner => &self.refiner,
            ModelKind::Vae => &self.vae,
            ModelKind::Lora => &self.lora,
            ModelKind::ControlNet => &self.controlnet,
            ModelKind::Upscaler => &self.upscaler,
        }
    }
}

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A diffusers folder.
    Diffusers,
    /// One `.safetensors` file (a single-file checkpoint).
    SingleFile,
}

/// A resolved model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// Its name (path under its root, "/"-separated), or "demo" for the built-in model.
    pub name: String,
    /// What it is.
    pub kind: ModelKind,
    /// How it is stored.
    pub format: ModelFormat,
    /// The folder or file.
    pub path: PathBuf,
    /// Total size of its files.
    pub size_bytes: u64,
    /// For pipelines (base and refiner models): what their configs say.
    pub pipeline: Option<PipelineFacts>,
}

/// The model roots and the default model.
pub struct Registry {
    roots: ModelRoots,
    default: ModelEntry,
}

/// Checks a client-supplied model name.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let invalid = |reason| {
        Err(RegistryError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.trim().is_empty() {
        return invalid("empty");
    }
    if name.len() > 512 {
        return invalid("longer than 512 bytes");
    }
    if name.contains('\0') {
        return invalid("contains NUL");
    }
    if name.contains('\\') {
        return invalid("contains a backslash");
    }
    if name.starts_with('/') {
        return invalid("absolute");
    }
    if name.contains('%') {
        return invalid("contains %");
    }
    for component in Path::new(name).components() {
        match component {
            Component::Normal(_) => {}
            _ => return invalid("has `.`, `..` or root components"),
        }
    }
    Ok(())
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => total += dir_size(&entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

fn files_sorted(path: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            match entry.file_type() {
                Ok(t) if t.is_dir() => files_sorted(&entry.path(), out),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
}

/// What validation needs to know of a pipeline before it is loaded, read from its
/// configs: its default image size, the depth of its text encoders and its scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineFacts {
    /// Default image side in pixels (UNet sample size × VAE scale factor).
    pub default_size: u32,
    /// Layers of its shallowest text encoder.
    pub text_encoder_layers: u32,
    /// Its scheduler, where sdxld implements it.
    pub scheduler: Option<SchedulerKind>,
}

impl PipelineFacts {
    /// Reads the configs of a pipeline folder or single-file checkpoint.
    fn read(path: &Path) -> Option<Self> {
        let configs = if path.is_file() {
            let (_, metadata) = crate::engine::weights::read_header(path).ok()?;
            Configs::from_metadata(path, &metadata).ok()?
        } else {
            let read_clip =
                |sub: &str| read_json::<ClipTextConfig>(&path.join(sub).join("config.json"));
            let text_encoder_2 = read_clip("text_encoder_2").ok()?;
            Configs {
                unet: read_json(&path.join("unet/config.json")).ok()?,
                vae: read_json(&path.join("vae/config.json")).ok()?,
                // A refiner has only the second encoder.
                text_encoder: read_clip("text_encoder").unwrap_or_else(|_| text_encoder_2.clone()),
                text_encoder_2,
                scheduler: read_json(&path.join("scheduler/scheduler_config.json")).ok()?,
            }
        };
        let sample = configs.unet.sample_size.unwrap_or(128).max(0) as u32;
        let layers = configs
            .text_encoder
            .num_hidden_layers
            .min(configs.text_encoder_2.num_hidden_layers);
        Some(Self {
            default_size: sample * configs.vae.scale_factor() as u32,
            text_encoder_layers: layers.max(0) as u32,
            scheduler: configs.scheduler.kind().ok(),
        })
    }
}

impl ModelEntry {
    /// Describes the diffusers pipeline folder `path` under `name`, if it is one.
    pub fn from_folder(name: &str, path: &Path) -> Option<Self> {
        Self::of_kind(ModelKind::Base, name, path)
    }

    /// Describes the pipeline at `path` (a folder or single file) named by its file name
    /// without extension, as a model given by path is named.
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_stem()?.to_string_lossy().into_owned();
        Self::from_folder(&name, path)
    }

    /// Describes `path` as a model of `kind` under `name`, if it holds one.
    pub fn of_kind(kind: ModelKind, name: &str, path: &Path) -> Option<Self> {
        if !kind.holds(path) {
            return None;
        }
        let file = path.is_file();
        Some(Self {
            name: name.to_string(),
            kind,
            format: if file {
                ModelFormat::SingleFile
            } else {
                ModelFormat::Diffusers
            },
            path: path.to_path_buf(),
            size_bytes: if file {
                path.metadata().map(|m| m.len()).unwrap_or(0)
            } else {
                dir_size(path)
            },
            pipeline: matches!(kind, ModelKind::Base | ModelKind::Refiner)
                .then(|| PipelineFacts::read(path))
                .flatten(),
        })
    }

    /// Default image side in pixels (1024 where the configs do not say).
    pub fn default_size(&self) -> u32 {
        self.pipeline.as_ref().map_or(1024, |p| p.default_size)
    }

    /// Its files, in path order.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if self.path.is_file() {
            files.push(self.path.clone());
        } else {
            files_sorted(&self.path, &mut files);
        }
        files
    }
}

impl Registry {
    /// A registry over `roots` with `default` as the default base model.
    pub fn new(roots: ModelRoots, default: ModelEntry) -> Self {
        Self { roots, default }
    }

    /// The default model.
    pub fn default_model(&self) -> &ModelEntry {
        &self.default
    }

    /// Resolves a client-supplied base model name ("" = the default model).
    pub fn resolve(&self, name: &str) -> Result<ModelEntry, RegistryError> {
        if name.is_empty() || name == self.default.name {
            return Ok(self.default.clone());
        }
        self.resolve_kind(ModelKind::Base, name)
    }

    /// Resolves a client-supplied name under the roots of `kind`.
    pub fn resolve_kind(&self, kind: ModelKind, name: &str) -> Result<ModelEntry, RegistryError> {
        check_name(name)?;
        for root in self.roots.of(kind) {
            let Ok(root) = root.canonicalize() else {
                continue;
            };
            // Symlinks may not lead outside the root.
            let inside = |candidate: PathBuf| {
                candidate
                    .canonicalize()
                    .ok()
                    .filter(|real| real.starts_with(&root))
            };
            if let Some(real) = inside(root.join(name)) {
                if let Some(entry) = ModelEntry::of_kind(kind, name, &real) {
                    return Ok(entry);
                }
                if real.is_file() && is_pickle(&real) {
                    return Err(RegistryError::Pickle {
                        name: name.to_string(),
                        file: name.to_string(),
                    });
                }
            }
            if kind.takes_files() {
                if let Some(real) = inside(root.join(format!("{name}.safetensors"))) {
                    if let Some(entry) = ModelEntry::of_kind(kind, name, &real) {
                        return Ok(entry);
                    }
                }
            }
            // Every kind may have been downloaded as a pickle file: say what to do with it.
            for extension in PICKLE_EXTENSIONS {
                let file = format!("{name}.{extension}");
                if inside(root.join(&file)).is_some_and(|p| p.is_file()) {
                    return Err(RegistryError::Pickle {
                        name: name.to_string(),
                        file,
                    });
                }
            }
        }
        Err(RegistryError::NotFound(name.to_string()))
    }

    /// Every model under the roots (up to three levels deep), sorted by kind and name,
    /// with the default base model.
    pub fn list(&self) -> Vec<ModelEntry> {
        let mut found = vec![self.default.clone()];
        for kind in ModelKind::ALL {
            self.list_kind(kind, &mut found);
        }
        found.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        found.dedup_by(|a, b| a.kind == b.kind && a.name == b.name);
        found
    }

    fn list_kind(&self, kind: ModelKind, found: &mut Vec<ModelEntry>) {
        for root in self.roots.of(kind) {
            let Ok(root) = root.canonicalize() else {
                continue;
            };
            let mut stack = vec![(root.clone(), 0)];
            while let Some((dir, depth)) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(real) = entry.path().canonicalize() else {
                        continue;
                    };
                    if !real.starts_with(&root) {
                        continue;
                    }
                    if real.is_file() && !(kind.takes_files() && kind.holds(&real)) {
                        continue;
                    }
                    let Ok(relative) = entry.path().strip_prefix(&root).map(Path::to_path_buf)
                    else {
                        continue;
                    };
                    let relative = if real.is_file() {
                        relative.with_extension("")
                    } else {
                        relative
                    };
                    let name = relative.to_string_lossy().replace('\\', "/");
                    if let Some(model) = ModelEntry::of_kind(kind, &name, &real) {
                        if kind != ModelKind::Base || model.name != self.default.name {
                            found.push(model);
                        }
                    } else if depth < 2 && real.is_dir() {
                        stack.push((real, depth + 1));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_that_leave_a_root_are_refused() {
        for bad in [
            "../x",
            "..",
            "/etc/passwd",
            "a/../../b",
            "a\0b",
            "  ",
            "%2e%2e/x",
            "a\\..\\b",
            "./a",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["..my_model", "model..1", "sdxl/base-1.0", "a b"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }
}
