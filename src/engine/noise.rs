//! The random stream a job draws its noise from (invariant 2).
//!
//! libtorch's CPU generator is process-global and tch exposes no per-generator API, so a
//! job holds the stream (a lock) for all of an image's draws: no other job's draws
//! interleave, and a refiner stage continues the generator where the base stage left it,
//! as diffusers does when one generator is passed to both pipelines.

use std::sync::{Mutex, MutexGuard};

use tch::{Device, Kind, Tensor};

static GENERATOR: Mutex<()> = Mutex::new(());

/// Exclusive use of the CPU generator.
pub struct NoiseStream {
    _held: MutexGuard<'static, ()>,
}

impl NoiseStream {
    /// Waits for the generator and holds it until dropped.
    pub fn lock() -> Self {
        Self {
            _held: GENERATOR.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Restarts the stream at `seed`, as `torch.Generator("cpu").manual_seed(seed)`.
    pub fn seed(&mut self, seed: u64) {
        tch::manual_seed(seed as i64);
    }

    /// Standard normal float32 samples on the CPU, as `torch.randn(shape, generator=g)`.
    pub fn randn(&mut self, shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }
}
