//! `sdxld convert`.

use std::path::Path;

use anyhow::Context;

/// Converts a torch.save checkpoint at `input` to safetensors at `output`.
pub fn convert(input: &Path, output: &Path) -> anyhow::Result<()> {
    let count = sdxld::convert::convert(input, output)
        .with_context(|| format!("converting {}", input.display()))?;
    println!("wrote {count} tensors to {}", output.display());
    Ok(())
}
