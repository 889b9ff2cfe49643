//! Encoding results for clients: PNG images and safetensors latents.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};

/// One [H, W, 3] uint8 image as PNG bytes.
pub fn png_bytes(image: &Tensor) -> Result<Vec<u8>> {
    let size = image.size();
    let (height, width) = (size[0] as u32, size[1] as u32);
    let pixels: Vec<u8> = Vec::try_from(image.to_kind(Kind::Uint8).contiguous().flatten(0, -1))?;
    let buffer = image::RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| EngineError::InvalidRequest("image buffer has the wrong size".into()))?;
    let mut out = Cursor::new(Vec::new());
    buffer
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| EngineError::InvalidRequest(format!("cannot encode PNG: {e}")))?;
    Ok(out.into_inner())
}

/// The path of image `index` for an output path: `out.png`, `out-1.png`, `out-2.png`, ...
pub fn numbered_path(path: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    path.with_file_name(name)
}

/// Writes latents as a safetensors file holding one float32 tensor named `latents`.
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("latents".to_string(), latents.shallow_clone());
    crate::engine::demo::save_safetensors(path, &tensors)
}

#[cfg(test)]
mod tests {
    use super::numbered_path;
    use std::path::Path;

    #[test]
    fn numbered_paths_keep_the_extension() {
        assert_eq!(
            numbered_path(Path::new("a/out.png"), 0),
            Path::new("a/out.png")
        );
        assert_eq!(
            numbered_path(Path::new("a/out.png"), 2),
            Path::new("a/out-2.png")
        );
        assert_eq!(numbered_path(Path::new("out"), 1), Path::new("out-1"));
    }
}
