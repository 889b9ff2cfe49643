//! `--ip-adapter FILE,ENCODER,IMAGE[,IMAGE...][,mask=MASK...][,scale=S]`: an IP-Adapter
//! image prompt from the command line, as the contract's `ImagePrompt` (masks, one per
//! image in order, make it regional).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sdxld::proto::v1 as pb;

/// The value's form.
const USAGE: &str = "FILE,ENCODER_FOLDER,IMAGE[,IMAGE...][,mask=MASK...][,scale=S]";

/// A parsed `--ip-adapter` value: the adapter file, the image encoder folder and the
/// image prompt naming them.
pub struct IpAdapterArg {
    /// The adapter file (its folder becomes an IP-Adapter root).
    pub adapter: PathBuf,
    /// The image encoder folder (its parent becomes an image encoder root).
    pub encoder: PathBuf,
    /// The image prompt.
    pub prompt: pb::ImagePrompt,
}

/// The name a model has in its root: the file's or folder's name, without `.safetensors`.
fn name_of(path: &Path, arg: &str) -> anyhow::Result<String> {
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("--ip-adapter {arg:?}: {path:?} names no file or folder"))
}

/// Parses `FILE,ENCODER,IMAGE[,IMAGE...][,mask=MASK...][,scale=S]`, reading the images
/// and masks.
pub fn parse(arg: &str) -> anyhow::Result<IpAdapterArg> {
    let mut parts = arg.split(',');
    let (Some(adapter), Some(encoder)) = (parts.next(), parts.next()) else {
        bail!("--ip-adapter {arg:?}: expected {USAGE}");
    };
    let (adapter, encoder) = (PathBuf::from(adapter), PathBuf::from(encoder));
    let mut prompt = pb::ImagePrompt {
        adapter: name_of(&adapter, arg)?,
        image_encoder: encoder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("--ip-adapter {arg:?}: {encoder:?} names no folder"))?,
        ..Default::default()
    };
    for part in parts {
        if let Some(scale) = part.strip_prefix("scale=") {
            let scale = scale.parse::<f32>().with_context(|| {
                format!("--ip-adapter {arg:?}: scale {scale:?} is not a number")
            })?;
            prompt.scale = Some(scale);
        } else if let Some(mask) = part.strip_prefix("mask=") {
            let mask = std::fs::read(mask).with_context(|| format!("reading {mask}"))?;
            prompt.masks.push(mask);
        } else {
            let image = std::fs::read(part).with_context(|| format!("reading {part}"))?;
            prompt.images.push(image);
        }
    }
    if prompt.images.is_empty() {
        bail!("--ip-adapter {arg:?}: no image ({USAGE})");
    }
    Ok(IpAdapterArg {
        adapter,
        encoder,
        prompt,
    })
}
