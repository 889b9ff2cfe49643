//! `sdxld demo-model`.

use std::path::Path;

/// Writes the built-in random-weight demo pipeline to `output`.
pub fn demo_model(output: &Path, seed: u64) -> anyhow::Result<()> {
    sdxld::engine::demo::write_demo_model(output, seed)?;
    println!("wrote the demo model to {}", output.display());
    Ok(())
}
