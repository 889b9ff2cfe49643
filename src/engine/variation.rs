//! Seed variations as A1111 makes them (`ImageRNG.first` in `modules/rng.py`): an image's
//! starting noise is spherically interpolated toward the noise of a variation seed, and a
//! seed's noise can be drawn as for another size and centred on the image ("Resize seed
//! from"), so that a seed keeps its composition at another size.

use tch::{Kind, Tensor};

use crate::engine::noise::NoiseStream;

/// A request's variation of its images' noise; image i varies toward `seed + i`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeedVariation {
    /// The variation seed of image 0.
    pub seed: u64,
    /// How far toward the variation seed's noise, in [0, 1]; 0 varies nothing.
    pub strength: f64,
    /// Noise drawn as for an image of this size (width, height) in pixels, centred.
    pub resize_from: Option<(i64, i64)>,
}

impl SeedVariation {
    /// The variation of the image `index` places after this one.
    pub fn nth(&self, index: u64) -> Self {
        Self {
            seed: self.seed.wrapping_add(index),
            ..*self
        }
    }
}

/// Image noise varied as A1111 varies it: `drawn` ([1, C, h, w], float32 on the CPU) is
/// the image's draw from its own stream (seed `seed`), `factor` the VAE's scale factor.
/// The variation's draws come from generators of their own, leaving the stream as it is.
pub fn vary(
    drawn: &Tensor,
    seed: u64,
    variation: &SeedVariation,
    factor: i64,
    noise: &mut NoiseStream,
) -> Tensor {
    let shape = drawn.size();
    let noise_shape = match variation.resize_from {
        Some((width, height)) => vec![shape[0], shape[1], height / factor, width / factor],
        None => shape.clone(),
    };
    let resized = noise_shape != shape;
    let mut varied = if resized {
        noise.randn_apart(seed, &noise_shape)
    } else {
        drawn.shallow_clone()
    };
    if variation.strength != 0.0 {
        let toward = noise.randn_apart(variation.seed, &noise_shape);
        varied = slerp(variation.strength, &varied.get(0), &toward.get(0)).unsqueeze(0);
    }
    if resized {
        centre(&varied, drawn)
    } else {
        varied
    }
}

/// A1111's `slerp(val, low, high)` on [C, h, w] noise, kept as it is: the vectors are the
/// columns (norms over dim 1), and above a mean cosine of 0.9995 it falls back to
/// `low * val + high * (1 - val)`, weights swapped, as A1111 does.
fn slerp(val: f64, low: &Tensor, high: &Tensor) -> Tensor {
    let unit = |t: &Tensor| t / t.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let dot = (unit(low) * unit(high)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    if dot.mean(Kind::Float).double_value(&[]) > 0.9995 {
        return low * val + high * (1.0 - val);
    }
    let omega = dot.acos();
    let so = omega.sin();
    let low_weight = ((&omega * (1.0 - val)).sin() / &so).unsqueeze(1);
    let high_weight = ((&omega * val).sin() / &so).unsqueeze(1);
    low_weight * low + high_weight * high
}

/// `small` ([1, C, h, w]) centred on a copy of `canvas` ([1, C, H, W]): cropped where it
/// is larger, the canvas's own noise around it where it is smaller (A1111's offsets,
/// whose floor division leaves a row or column of the canvas's own noise where an odd
/// difference crops).
fn centre(small: &Tensor, canvas: &Tensor) -> Tensor {
    let (from, to) = (small.size(), canvas.size());
    let (dy, dx) = (
        (to[2] - from[2]).div_euclid(2),
        (to[3] - from[3]).div_euclid(2),
    );
    let height = if dy >= 0 { from[2] } else { from[2] + 2 * dy };
    let width = if dx >= 0 { from[3] } else { from[3] + 2 * dx };
    let out = canvas.copy();
    out.narrow(2, dy.max(0), height)
        .narrow(3, dx.max(0), width)
        .copy_(
            &small
                .narrow(2, (-dy).max(0), height)
                .narrow(3, (-dx).max(0), width),
        );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn noise_of(seed: u64, shape: &[i64]) -> Tensor {
        let mut noise = NoiseStream::lock();
        noise.seed(seed);
        noise.randn(shape)
    }

    #[test]
    fn full_strength_is_the_variation_seed_and_none_is_the_seed() {
        let shape = [1, 4, 6, 5];
        let drawn = noise_of(3, &shape);
        let mut noise = NoiseStream::lock();
        let toward = SeedVariation {
            seed: 11,
            strength: 1.0,
            resize_from: None,
        };
        let full = vary(&drawn, 3, &toward, 8, &mut noise);
        let none = vary(
            &drawn,
            3,
            &SeedVariation {
                strength: 0.0,
                ..toward
            },
            8,
            &mut noise,
        );
        drop(noise);
        assert!(full.allclose(&noise_of(11, &shape), 1e-5, 1e-5, false));
        assert!(none.equal(&drawn));
    }

    #[test]
    fn a_resized_seed_is_centred_cropped_or_surrounded() {
        let canvas = Tensor::zeros([1, 1, 4, 5], (Kind::Float, Device::Cpu));
        let small = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([1, 1, 2, 3]) + 1.0;
        let placed = centre(&small, &canvas);
        let expected = [
            [0., 0., 0., 0., 0.],
            [0., 1., 2., 3., 0.],
            [0., 4., 5., 6., 0.],
            [0., 0., 0., 0., 0.],
        ];
        assert_eq!(
            Vec::<f32>::try_from(placed.flatten(0, -1)).unwrap(),
            expected.concat()
        );
        // Larger by an odd difference: A1111's floor division of -3 / 2 takes two rows
        // and three columns from (2, 2) and leaves the canvas's own noise beside them.
        let large = Tensor::arange(42, (Kind::Float, Device::Cpu)).view([1, 1, 6, 7]);
        let cropped = centre(
            &large,
            &Tensor::zeros([1, 1, 3, 4], (Kind::Float, Device::Cpu)),
        );
        let rows: Vec<f32> = cropped.flatten(0, -1).try_into().unwrap();
        let expected = [[16., 17., 18., 0.], [23., 24., 25., 0.], [0., 0., 0., 0.]];
        assert_eq!(rows, expected.concat());
    }
}
