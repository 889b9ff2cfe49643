//! Model names to folders: configured roots resolve names; no name can reach a file
//! outside its root (invariant 4), and no file of a model leads outside every root.
//! A root may be a plain tree of models or a Hugging Face hub cache.

use std::path::{Component, Path, PathBuf};

use crate::engine::files::read_json;

mod facts;
mod files;
mod hub;

pub use facts::{ControlNetFacts, PipelineFacts, UpscalerFacts};
pub use files::{model_files, Escape, ModelFile};

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
    /// A file of the model leads outside every model root.
    #[error("model `{name}` has `{file}` leading outside the model roots")]
    OutsideRoots {
        /// The name.
        name: String,
        /// The file, relative to the model.
        file: String,
    },
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
    /// A ControlNet (diffusers ControlNetModel folder) or a T2I-Adapter (T2IAdapter
    /// folder), or either as a single file.
    ControlNet,
    /// A super-resolution upscaler (`.safetensors` file).
    Upscaler,
    /// A preprocessor network (detector; `.safetensors` file).
    Preprocessor,
    /// A textual inversion embedding (`.safetensors` file).
    Embedding,
    /// An IP-Adapter (`.safetensors` file).
    IpAdapter,
    /// A CLIP image encoder (transformers CLIPVisionModelWithProjection folder).
    ImageEncoder,
}

impl ModelKind {
    /// Every kind with roots, in listing order.
    pub const ALL: [ModelKind; 10] = [
        ModelKind::Base,
        ModelKind::Refiner,
        ModelKind::Vae,
        ModelKind::Lora,
        ModelKind::ControlNet,
        ModelKind::Upscaler,
        ModelKind::Preprocessor,
        ModelKind::Embedding,
        ModelKind::IpAdapter,
        ModelKind::ImageEncoder,
    ];

    /// Whether models of this kind may be single `.safetensors` files (named without the
    /// extension).
    fn takes_files(self) -> bool {
        matches!(
            self,
            ModelKind::Base
                | ModelKind::Lora
                | ModelKind::ControlNet
                | ModelKind::Upscaler
                | ModelKind::Preprocessor
                | ModelKind::Embedding
                | ModelKind::IpAdapter
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
            ModelKind::Preprocessor => "models.preprocessor_roots",
            ModelKind::Embedding => "models.embedding_roots",
            ModelKind::IpAdapter => "models.ip_adapter_roots",
            ModelKind::ImageEncoder => "models.image_encoder_roots",
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
            // Folders by their class; any `.safetensors` file (a layout that is not a
            // ControlNet's is refused, naming the key, when it is used).
            ModelKind::ControlNet => {
                class_name(path).is_some_and(|c| {
                    ["ControlNetModel", "ControlNetUnionModel", "T2IAdapter"].contains(&c.as_str())
                }) || (path.is_file() && path.extension().is_some_and(|e| e == "safetensors"))
            }
            ModelKind::Lora | ModelKind::Upscaler | ModelKind::Embedding => {
                path.is_file() && path.extension().is_some_and(|e| e == "safetensors")
            }
            // Not the weights of a model folder (h94/IP-Adapter keeps its image encoders,
            // `image_encoder/model.safetensors`, beside the adapters).
            ModelKind::IpAdapter => {
                path.is_file()
                    && path.extension().is_some_and(|e| e == "safetensors")
                    && !path.with_file_name("config.json").is_file()
            }
            ModelKind::ImageEncoder => model_type(path).is_some_and(|t| t == "clip_vision_model"),
            // Weight files, and model folders of a served type (Depth Anything, DPT, ZoeDepth,
            // UperNet).
            ModelKind::Preprocessor => {
                (path.is_file() && path.extension().is_some_and(|e| e == "safetensors"))
                    || model_type(path).is_some_and(|t| {
                        ["depth_anything", "dpt", "zoedepth", "upernet"].contains(&t.as_str())
                    })
            }
        }
    }
}

/// The `model_type` of a transformers model folder's config.
fn model_type(path: &Path) -> Option<String> {
    let config: serde_json::Value = read_json(&path.join("config.json")).ok()?;
    config.get("model_type")?.as_str().map(str::to_string)
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
    /// Preprocessor networks.
    pub preprocessor: Vec<PathBuf>,
    /// Textual inversion embeddings.
    pub embedding: Vec<PathBuf>,
    /// IP-Adapters.
    pub ip_adapter: Vec<PathBuf>,
    /// CLIP image encoders (of IP-Adapters).
    pub image_encoder: Vec<PathBuf>,
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
            ModelKind::Preprocessor => &self.preprocessor,
            ModelKind::Embedding => &self.embedding,
            ModelKind::IpAdapter => &self.ip_adapter,
            ModelKind::ImageEncoder => &self.image_encoder,
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
#[derive(Debug, Clone, PartialEq)]
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
    /// For ControlNets: what their config says.
    pub controlnet: Option<ControlNetFacts>,
    /// For upscalers: what their tensors show (`None` for a file of no served layout).
    pub upscaler: Option<UpscalerFacts>,
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

    /// Describes `path` as a model of `kind` under `name`, if it holds one; its symlinks
    /// are followed wherever they lead (a model the operator named by path).
    pub fn of_kind(kind: ModelKind, name: &str, path: &Path) -> Option<Self> {
        Self::within(kind, name, path, None).ok().flatten()
    }

    /// [`Self::of_kind`] for a model under the roots: a file leading outside `bounds` is
    /// an [`Escape`].
    fn within(
        kind: ModelKind,
        name: &str,
        path: &Path,
        bounds: Option<&[PathBuf]>,
    ) -> Result<Option<Self>, Escape> {
        if !kind.holds(path) {
            return Ok(None);
        }
        let file = path.is_file();
        let size_bytes = if file {
            path.metadata().map(|m| m.len()).unwrap_or(0)
        } else {
            model_files(path, bounds)?.iter().map(|f| f.size).sum()
        };
        Ok(Some(Self {
            name: name.to_string(),
            kind,
            format: if file {
                ModelFormat::SingleFile
            } else {
                ModelFormat::Diffusers
            },
            path: path.to_path_buf(),
            size_bytes,
            pipeline: matches!(kind, ModelKind::Base | ModelKind::Refiner)
                .then(|| PipelineFacts::read(path))
                .flatten(),
            controlnet: (kind == ModelKind::ControlNet)
                .then(|| ControlNetFacts::read(path))
                .flatten(),
            upscaler: (kind == ModelKind::Upscaler)
                .then(|| UpscalerFacts::read(path))
                .flatten(),
        }))
    }

    /// Default image side in pixels (1024 where the configs do not say).
    pub fn default_size(&self) -> u32 {
        self.pipeline.as_ref().map_or(1024, |p| p.default_size)
    }

    /// Its files, in path order (through the model folder's symlinks).
    pub fn files(&self) -> Vec<PathBuf> {
        if self.path.is_file() {
            return vec![self.path.clone()];
        }
        model_files(&self.path, None)
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.path)
            .collect()
    }
}

/// Where a name may lead under one root: the path as named, and the hub cache's snapshot.
fn candidates(root: &Path, name: &str) -> impl Iterator<Item = PathBuf> {
    [Some(root.join(name)), hub::resolve(root, name)]
        .into_iter()
        .flatten()
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

    /// Every root of every kind, canonical: where a model's files may lead.
    fn bounds(&self) -> Vec<PathBuf> {
        self.roots
            .all()
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .collect()
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
        let bounds = self.bounds();
        for root in self.roots.of(kind) {
            let Ok(root) = root.canonicalize() else {
                continue;
            };
            if let Some(found) = self.resolve_in(kind, name, &root, &bounds) {
                return found;
            }
        }
        Err(RegistryError::NotFound(name.to_string()))
    }

    /// What `name` is under one root, if anything.
    fn resolve_in(
        &self,
        kind: ModelKind,
        name: &str,
        root: &Path,
        bounds: &[PathBuf],
    ) -> Option<Result<ModelEntry, RegistryError>> {
        // The model itself may not lead outside its own root. Its path stays as named
        // (a hub cache's file links to a blob without the file's extension).
        let inside = |candidate: PathBuf| {
            let real = candidate.canonicalize().ok()?;
            real.starts_with(root).then_some(candidate)
        };
        let escaped = |e: Escape| RegistryError::OutsideRoots {
            name: name.to_string(),
            file: e.file,
        };
        let mut files: Vec<String> = vec![name.to_string()];
        if kind.takes_files() {
            files.push(format!("{name}.safetensors"));
        }
        for file in &files {
            for real in candidates(root, file).filter_map(inside) {
                match ModelEntry::within(kind, name, &real, Some(bounds)) {
                    Ok(Some(entry)) => return Some(Ok(entry)),
                    Ok(None) => {}
                    Err(e) => return Some(Err(escaped(e))),
                }
            }
        }
        // Every kind may have been downloaded as a pickle file: say what to do with it.
        let pickles = std::iter::once(name.to_string())
            .filter(|n| is_pickle(Path::new(n)))
            .chain(PICKLE_EXTENSIONS.iter().map(|e| format!("{name}.{e}")));
        for file in pickles {
            if candidates(root, &file)
                .filter_map(inside)
                .any(|p| p.is_file())
            {
                return Some(Err(RegistryError::Pickle {
                    name: name.to_string(),
                    file,
                }));
            }
        }
        None
    }

    /// Every model under the roots (up to three levels deep, and every repository of a
    /// hub cache), sorted by kind and name, with the default base model.
    pub fn list(&self) -> Vec<ModelEntry> {
        let mut found = vec![self.default.clone()];
        let bounds = self.bounds();
        for kind in ModelKind::ALL {
            self.list_roots(kind, &bounds, &mut found);
        }
        found.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        found.dedup_by(|a, b| a.kind == b.kind && a.name == b.name);
        found
    }

    /// The models of `kind` under its roots, by name.
    pub fn list_kind(&self, kind: ModelKind) -> Vec<ModelEntry> {
        let mut found = Vec::new();
        self.list_roots(kind, &self.bounds(), &mut found);
        found.retain(|m| m.kind == kind);
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found.dedup_by(|a, b| a.name == b.name);
        found
    }

    /// Lists every root of `kind`.
    fn list_roots(&self, kind: ModelKind, bounds: &[PathBuf], found: &mut Vec<ModelEntry>) {
        for root in self.roots.of(kind) {
            if let Ok(root) = root.canonicalize() {
                self.list_root(kind, &root, bounds, found);
            }
        }
    }

    fn list_root(
        &self,
        kind: ModelKind,
        root: &Path,
        bounds: &[PathBuf],
        found: &mut Vec<ModelEntry>,
    ) {
        let mut stack = vec![(root.to_path_buf(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(real) = entry.path().canonicalize() else {
                    continue;
                };
                if !real.starts_with(root) {
                    continue;
                }
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if let Some(repo) = hub::repo_name(&file_name).filter(|_| depth == 0) {
                    self.list_repo(kind, &repo, &real, bounds, found);
                    continue;
                }
                if real.is_file() && !(kind.takes_files() && kind.holds(&real)) {
                    continue;
                }
                let Ok(relative) = entry.path().strip_prefix(root).map(Path::to_path_buf) else {
                    continue;
                };
                let relative = if real.is_file() {
                    relative.with_extension("")
                } else {
                    relative
                };
                let name = relative.to_string_lossy().replace('\\', "/");
                if !self.found(kind, &name, &real, bounds, found) && depth < 2 && real.is_dir() {
                    stack.push((real, depth + 1));
                }
            }
        }
    }

    /// Lists a hub cache repository: its snapshot, or the models one level inside it.
    fn list_repo(
        &self,
        kind: ModelKind,
        repo: &str,
        folder: &Path,
        bounds: &[PathBuf],
        found: &mut Vec<ModelEntry>,
    ) {
        let Some(snapshot) = hub::snapshot(folder) else {
            return;
        };
        if self.found(kind, repo, &snapshot, bounds, found) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&snapshot) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let stem = if path.is_file() {
                path.with_extension("")
            } else {
                path.clone()
            };
            let Some(sub) = stem.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if path.is_dir() || kind.takes_files() {
                self.found(kind, &format!("{repo}/{sub}"), &path, bounds, found);
            }
        }
    }

    /// Adds the model of `kind` at `path` to `found` if it holds one; whether it does.
    /// A model leading outside the roots is left out (resolving it says why).
    fn found(
        &self,
        kind: ModelKind,
        name: &str,
        path: &Path,
        bounds: &[PathBuf],
        found: &mut Vec<ModelEntry>,
    ) -> bool {
        match ModelEntry::within(kind, name, path, Some(bounds)) {
            Ok(Some(model)) => {
                if kind != ModelKind::Base || model.name != self.default.name {
                    found.push(model);
                }
                true
            }
            Ok(None) => false,
            Err(escape) => {
                tracing::warn!(
                    model = name,
                    file = escape.file,
                    "a model file leads outside the model roots: not listed"
                );
                true
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
