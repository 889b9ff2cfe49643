//! The random stream a job draws its noise from (invariant 2).
//!
//! libtorch's CPU generator is process-global and tch exposes no per-generator API, so a
//! job holds the stream (a lock) for all of an image's draws: no other job's draws
//! interleave, and a refiner stage continues the generator where the base stage left it,
//! as diffusers does when one generator is passed to both pipelines. A draw from another
//! seed (a seed variation's) restores the generator's state after it, leaving the job's
//! stream where it was, as a second generator would.

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

    /// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`: samples of
    /// another generator, leaving this stream where it was.
    pub fn randn_apart(&mut self, seed: u64, shape: &[i64]) -> Tensor {
        SideGenerator::new(seed).randn(self, shape)
    }
}

/// A second CPU generator, `torch.Generator("cpu").manual_seed(seed)` beside the stream:
/// each draw swaps its state into libtorch's generator under the stream's lock and back
/// out, so that its draws go on from one another and the stream stays where it was.
pub struct SideGenerator {
    seed: u64,
    /// Its state after its last draw; `None` before the first.
    state: Option<GeneratorState>,
}

impl SideGenerator {
    /// A generator at `seed` (nothing is drawn until [`Self::randn`]).
    pub fn new(seed: u64) -> Self {
        Self { seed, state: None }
    }

    /// Standard normal float32 samples from this generator, drawn while `stream` is held.
    pub fn randn(&mut self, stream: &mut NoiseStream, shape: &[i64]) -> Tensor {
        let saved = GeneratorState::read();
        match self.state.take() {
            Some(state) => state.restore(),
            None => stream.seed(self.seed),
        }
        let drawn = stream.randn(shape);
        self.state = Some(GeneratorState::read());
        saved.restore();
        drawn
    }
}

extern "C" {
    fn sdxld_cpu_generator_state(out: *mut u8, capacity: i64) -> i64;
    fn sdxld_cpu_generator_set_state(data: *const u8, length: i64) -> i32;
}

/// A copy of the default CPU generator's state.
struct GeneratorState(Vec<u8>);

impl GeneratorState {
    fn read() -> Self {
        // The state is about 5 KB (the Mersenne twister's words and a cached normal).
        let mut bytes = vec![0u8; 8192];
        // SAFETY: the shim writes at most `capacity` bytes into the buffer.
        let length = unsafe { sdxld_cpu_generator_state(bytes.as_mut_ptr(), bytes.len() as i64) };
        if length > bytes.len() as i64 {
            bytes = vec![0u8; length as usize];
            // SAFETY: as above, with a buffer of the length the shim asked for.
            unsafe { sdxld_cpu_generator_state(bytes.as_mut_ptr(), bytes.len() as i64) };
        }
        assert!(length >= 0, "libtorch's CPU generator state cannot be read");
        bytes.truncate(length as usize);
        Self(bytes)
    }

    fn restore(self) {
        // SAFETY: the shim reads `length` bytes of the buffer.
        let status = unsafe { sdxld_cpu_generator_set_state(self.0.as_ptr(), self.0.len() as i64) };
        assert_eq!(
            status, 0,
            "libtorch refused the CPU generator state it gave"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draw_apart_leaves_the_stream_where_it_was() {
        let mut noise = NoiseStream::lock();
        noise.seed(7);
        let first = noise.randn(&[3, 5]);
        let straight = noise.randn(&[2, 33]);
        noise.seed(7);
        let again = noise.randn(&[3, 5]);
        let apart = noise.randn_apart(99, &[4, 17]);
        let after = noise.randn(&[2, 33]);
        assert!(first.equal(&again));
        assert!(straight.equal(&after), "the stream moved");
        noise.seed(99);
        assert!(
            apart.equal(&noise.randn(&[4, 17])),
            "not the other seed's draw"
        );
    }

    #[test]
    fn a_side_generator_goes_on_from_its_last_draw_between_the_streams_draws() {
        let mut noise = NoiseStream::lock();
        noise.seed(5);
        let straight = [noise.randn(&[3, 4]), noise.randn(&[7])];
        noise.seed(11);
        let stream_first = noise.randn(&[2, 9]);
        noise.seed(11);
        let mut side = SideGenerator::new(5);
        let first = side.randn(&mut noise, &[3, 4]);
        let again = noise.randn(&[2, 9]);
        let second = side.randn(&mut noise, &[7]);
        assert!(first.equal(&straight[0]) && second.equal(&straight[1]));
        assert!(again.equal(&stream_first), "the stream moved");
    }
}
