//! Regional image prompts (diffusers' `ip_adapter_masks`): an image acts in an attention
//! layer only where its mask is white, the mask downsampled (bicubic) to as many
//! positions as the layer has queries, as `IPAdapterMaskProcessor.downsample` does.

use std::cell::RefCell;

use tch::{Kind, Tensor};

/// One image's mask at the output size, and its downsamples by query count.
pub struct RegionMask {
    /// [1, height, width] float32, 0 or 1.
    full: Tensor,
    /// The kind the layers' results have.
    kind: Kind,
    /// The layers' downsamples computed so far: (queries, [1, queries, 1] in `kind`).
    by_queries: RefCell<Vec<(i64, Tensor)>>,
}

impl RegionMask {
    /// A mask at the output size, [1, height, width] float32, for layers whose results
    /// are in `kind`.
    pub fn new(full: Tensor, kind: Kind) -> Self {
        Self {
            full,
            kind,
            by_queries: RefCell::new(Vec::new()),
        }
    }

    /// The mask as a layer with `queries` positions reads it, [1, queries, 1]: computed
    /// in float32, then in the results' kind (diffusers' order).
    pub fn at(&self, queries: i64) -> Tensor {
        let mut known = self.by_queries.borrow_mut();
        if let Some((_, mask)) = known.iter().find(|(q, _)| *q == queries) {
            return mask.shallow_clone();
        }
        let mask = downsample(&self.full, queries).to_kind(self.kind);
        known.push((queries, mask.shallow_clone()));
        mask
    }
}

/// `mask` [1, H, W] as a layer of `queries` positions reads it, [1, queries, 1]: the
/// layer's rows found from the mask's aspect ratio, bicubic interpolation to rows x
/// (queries / rows), then zeros appended or the tail dropped when that grid holds
/// another number of positions.
pub fn downsample(mask: &Tensor, queries: i64) -> Tensor {
    let size = mask.size();
    let (h, w) = (size[1], size[2]);
    let ratio = w as f64 / h as f64;
    // diffusers divides by the truncated root; at least one row keeps that defined.
    let root = ((queries as f64 / ratio).sqrt() as i64).max(1);
    let rows = root + i64::from(queries % root != 0);
    let columns = (queries / rows).max(1);
    let grid = mask
        .unsqueeze(0)
        .upsample_bicubic2d([rows, columns], false, None, None)
        .reshape([1, rows * columns]);
    let fitted = if rows * columns < queries {
        grid.constant_pad_nd([0, queries - rows * columns])
    } else {
        grid.narrow(1, 0, queries)
    };
    fitted.reshape([1, queries, 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_of_the_layer_grid_keeps_its_halves() {
        // Left half white, 8 wide and 12 high; a layer of 4 x 6 positions.
        let full = Tensor::cat(
            &[
                Tensor::ones([1, 12, 4], (Kind::Float, tch::Device::Cpu)),
                Tensor::zeros([1, 12, 4], (Kind::Float, tch::Device::Cpu)),
            ],
            2,
        );
        let down = downsample(&full, 24).reshape([6, 4]);
        // The outer columns stay exactly white and black; bicubic overshoots between.
        for row in 0..6 {
            assert!((down.double_value(&[row, 0]) - 1.0).abs() < 1e-6);
            assert!(down.double_value(&[row, 3]).abs() < 1e-6);
        }
        // A grid that misses positions is padded with zeros.
        let white = Tensor::ones([1, 10, 10], (Kind::Float, tch::Device::Cpu));
        let odd = RegionMask::new(white, Kind::Float).at(7);
        assert_eq!(odd.size(), [1, 7, 1]);
        assert_eq!(odd.sum(Kind::Float).double_value(&[]), 6.0);
    }

    #[test]
    fn every_query_count_of_every_aspect_ratio_gets_one_value_per_query() {
        let cpu = (Kind::Float, tch::Device::Cpu);
        // Outputs from 64 times wider than high to 64 times higher than wide.
        for (h, w) in [(8, 512), (40, 64), (64, 64), (96, 64), (512, 8), (1, 3)] {
            let mask = Tensor::ones([1, h, w], cpu);
            for queries in (1..=70).chain([127, 1000, 4096]) {
                let down = downsample(&mask, queries);
                assert_eq!(down.size(), [1, queries, 1], "{h}x{w}, {queries} queries");
                let max = down.max().double_value(&[]);
                assert!(max.is_finite() && max <= 1.0 + 1e-5, "{h}x{w}: {max}");
            }
        }
    }
}
