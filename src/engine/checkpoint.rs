//! The stop check a network pass asks between its blocks, so that a cancelled or late
//! job ends within a block instead of at the end of the pass (an upscaler's tile, a
//! detector's image), which on a CPU may take seconds to minutes.

use tch::Tensor;

use crate::engine::error::Result;

/// Asked between a network's blocks: its error ends the pass with that error.
pub type Between<'a> = dyn FnMut() -> Result<()> + 'a;

/// `x` through each of `blocks` in turn by `forward`, `between` asked before each.
pub fn in_turn<B>(
    x: Tensor,
    blocks: &[B],
    between: &mut Between<'_>,
    forward: impl Fn(&B, &Tensor) -> Tensor,
) -> Result<Tensor> {
    blocks.iter().try_fold(x, |x, block| {
        between()?;
        Ok(forward(block, &x))
    })
}
