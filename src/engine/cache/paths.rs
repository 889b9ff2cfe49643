//! What the cache loads a job's models as, and the files each kind is made of.

use std::path::Path;

use crate::engine::components::ComponentFiles;
use crate::engine::pipeline::SdxlPipeline;

/// A model a job uses, by kind of loading.
#[derive(Debug, Clone, Copy)]
pub enum ModelPath<'a> {
    /// A pipeline (folder or single file).
    Pipeline(&'a Path),
    /// A VAE folder.
    Vae(&'a Path),
    /// A ControlNet folder or file.
    ControlNet(&'a Path),
    /// A Control-LoRA file, built on the UNet of the pipeline at `base`.
    ControlLora {
        /// The Control-LoRA.
        file: &'a Path,
        /// Its base pipeline (folder or single file).
        base: &'a Path,
    },
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
            ModelPath::ControlLora { file, .. } => file,
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

/// The role of a Control-LoRA's ControlNet among the components.
pub(super) const CONTROL_LORA_ROLE: &str = "control_lora";

/// The files a Control-LoRA's ControlNet is built from: its own, then its base's UNet's
/// (their prefix, in a single-file checkpoint).
pub(super) fn control_lora_files(file: &Path, base: &Path) -> ComponentFiles {
    let unet = SdxlPipeline::component_files(base)
        .into_iter()
        .find(|f| f.role == "unet");
    let (mut paths, prefix) = unet.map_or((Vec::new(), None), |u| (u.paths, u.prefix));
    paths.insert(0, file.to_path_buf());
    ComponentFiles {
        role: CONTROL_LORA_ROLE,
        paths,
        prefix,
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
