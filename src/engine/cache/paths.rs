//! What the cache loads a job's models as, and the files each kind is made of.

use std::path::Path;

use crate::engine::components::ComponentFiles;

/// A model a job uses, by kind of loading.
#[derive(Debug, Clone, Copy)]
pub enum ModelPath<'a> {
    /// A pipeline (folder or single file).
    Pipeline(&'a Path),
    /// A VAE folder.
    Vae(&'a Path),
    /// A ControlNet folder.
    ControlNet(&'a Path),
    /// A LoRA adapter file.
    Lora(&'a Path),
    /// An upscaler file.
    Upscaler(&'a Path),
    /// A preprocessor network file.
    Detector(&'a Path),
    /// An IP-Adapter file.
    IpAdapter(&'a Path),
    /// A CLIP image encoder folder.
    ImageEncoder(&'a Path),
}

impl ModelPath<'_> {
    pub(super) fn path(&self) -> &Path {
        match self {
            ModelPath::Pipeline(p)
            | ModelPath::Vae(p)
            | ModelPath::ControlNet(p)
            | ModelPath::Lora(p)
            | ModelPath::Upscaler(p)
            | ModelPath::Detector(p)
            | ModelPath::IpAdapter(p)
            | ModelPath::ImageEncoder(p) => p,
        }
    }
}

/// The files of a ControlNet folder or single file.
pub(super) fn controlnet_files(path: &Path) -> ComponentFiles {
    if path.is_file() {
        ComponentFiles {
            role: "controlnet",
            paths: vec![path.to_path_buf()],
            prefix: None,
        }
    } else {
        ComponentFiles::folder("controlnet", path)
    }
}

/// An upscaler's one file.
pub(super) fn upscaler_files(path: &Path) -> ComponentFiles {
    ComponentFiles {
        role: "upscaler",
        paths: vec![path.to_path_buf()],
        prefix: None,
    }
}

/// A preprocessor network's one file, or its model folder's files.
pub(super) fn detector_files(path: &Path) -> ComponentFiles {
    if path.is_dir() {
        return ComponentFiles::folder("detector", path);
    }
    ComponentFiles {
        role: "detector",
        paths: vec![path.to_path_buf()],
        prefix: None,
    }
}

/// An IP-Adapter's one file.
pub(super) fn ip_adapter_files(path: &Path) -> ComponentFiles {
    ComponentFiles {
        role: "ip_adapter",
        paths: vec![path.to_path_buf()],
        prefix: None,
    }
}
