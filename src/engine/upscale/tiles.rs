//! Tiled inference as Real-ESRGAN's `RealESRGANer.tile_process` does it: a grid of
//! tiles, each run with `pad` pixels of context on every side (clamped at the image's
//! edges) and only its centre kept. With an overlap, neighbouring tiles share `overlap`
//! input pixels and are blended with linear ramps across them, so no seam shows; with no
//! overlap every output pixel comes from exactly one tile, as in Real-ESRGAN.

use tch::{Device, Kind, Tensor};

/// How an image is cut into tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tile side in input pixels; 0: the whole image in one pass.
    pub tile: i64,
    /// Context pixels around each tile (`tile_pad`).
    pub pad: i64,
    /// Input pixels neighbouring tiles share and blend over; below `tile / 2`.
    pub overlap: i64,
}

/// The tile side when a request leaves it to the server and no memory budget bounds it,
/// on a GPU.
pub const DEFAULT_TILE: i64 = 512;
/// The largest tile side the server picks on the CPU, with or without a budget: over
/// larger tiles a layer's activations outgrow glibc's largest mmap threshold (32 MiB;
/// 64 channels of 512² floats take 64 MiB, of 256² 16 MiB), so every layer maps fresh
/// pages and faults them in;
/// 256-pixel tiles ran RealESRGAN_x4plus's shape 1.33× and SPAN's 1.58× as fast as
/// 512-pixel ones, RRDBNet's in 40% of the memory.
pub const CPU_TILE: i64 = 256;
/// Fitted tile sides are multiples of this, up to [`MAX_TILE`].
const TILE_STEP: i64 = 64;
/// The largest tile side.
pub const MAX_TILE: i64 = 2048;

/// How a request asks for tiles: a side, or the largest side whose activations fit in
/// the device memory the budget leaves free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilePlan {
    /// The side asked for; `None`: fitted to the free memory.
    pub side: Option<i64>,
    /// Context pixels around each tile.
    pub pad: i64,
    /// The overlap asked for; `None`: a sixteenth of the side.
    pub overlap: Option<i64>,
}

impl TilePlan {
    /// The tiling on `device` for an upscaler whose activations take `bytes_per_pixel`
    /// per input pixel with `free` bytes of device memory left (`None`: no budget): the
    /// side asked for, else the largest multiple of 64 up to 2048 whose padded tile fits
    /// (64 if none does; [`DEFAULT_TILE`] without a budget), at most [`CPU_TILE`] on the
    /// CPU. The overlap stays below half the side.
    pub fn tiling(self, free: Option<u64>, bytes_per_pixel: u64, device: Device) -> Tiling {
        let (default, largest) = match device {
            Device::Cpu => (CPU_TILE, CPU_TILE),
            _ => (DEFAULT_TILE, MAX_TILE),
        };
        let tile = match (self.side, free) {
            (Some(side), _) => side,
            (None, None) => default,
            (None, Some(free)) => {
                let fits = |side: i64| {
                    let padded = (side + 2 * self.pad) as u64;
                    padded * padded * bytes_per_pixel.max(1) <= free
                };
                (1..=largest / TILE_STEP)
                    .rev()
                    .map(|k| k * TILE_STEP)
                    .find(|&side| fits(side))
                    .unwrap_or(TILE_STEP)
            }
        };
        let overlap = self.overlap.unwrap_or(tile / 16).min((tile - 1) / 2);
        Tiling {
            tile,
            pad: self.pad,
            overlap,
        }
    }
}

/// Where a tiled run asks its caller whether to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Before tile `done` of `total`, and after the last (`done == total`).
    Tile { done: usize, total: usize },
    /// Between two blocks of the network's pass over a tile.
    Block,
}

/// One tile: its rectangle in the input, `[x0, x1) × [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub x0: i64,
    pub x1: i64,
    pub y0: i64,
    pub y1: i64,
}

/// Starts of the tiles along a side of `length`: a stride of `tile - overlap`, the last
/// tile ending at the side.
fn starts(length: i64, tile: i64, overlap: i64) -> Vec<i64> {
    if tile <= 0 || tile >= length {
        return vec![0];
    }
    let stride = tile - overlap;
    let count = ((length - overlap) + stride - 1) / stride;
    (0..count.max(1)).map(|i| i * stride).collect()
}

impl Tiling {
    /// The tiles of a `width`×`height` image, row by row.
    pub fn tiles(&self, width: i64, height: i64) -> Vec<Tile> {
        let side = |length| {
            let tile = if self.tile <= 0 { length } else { self.tile };
            starts(length, tile, self.overlap)
                .into_iter()
                .map(move |s| (s, (s + tile).min(length)))
        };
        side(height)
            .flat_map(|(y0, y1)| side(width).map(move |(x0, x1)| Tile { x0, x1, y0, y1 }))
            .collect()
    }
}

/// The blend weight of each output position of a tile along one side: ramps over the
/// `overlap` shared with a neighbour before and after, 1 elsewhere.
fn ramp(length: i64, before: bool, after: bool, overlap: i64) -> Vec<f32> {
    (0..length)
        .map(|i| {
            let mut w = 1.0f32;
            if before && i < overlap {
                w = w.min((i as f32 + 0.5) / overlap as f32);
            }
            if after && i >= length - overlap {
                w = w.min(((length - i) as f32 - 0.5) / overlap as f32);
            }
            w
        })
        .collect()
}

/// A network pass over one tile, handed the check to ask between its blocks.
pub type TilePass<'a, E> =
    dyn FnMut(&Tensor, &mut dyn FnMut() -> Result<(), E>) -> Result<Tensor, E> + 'a;

/// Runs `network` over `image` (NCHW, one image) tile by tile; `scale` is the network's
/// factor. `watch` runs before each tile, after the last and wherever the network asks
/// between its blocks (the check it is handed), and stops the run with its error.
pub fn run<E>(
    image: &Tensor,
    scale: i64,
    tiling: Tiling,
    network: &mut TilePass<'_, E>,
    watch: &mut dyn FnMut(Checkpoint) -> Result<(), E>,
) -> Result<Tensor, E> {
    let size = image.size();
    let (channels, height, width) = (size[1], size[2], size[3]);
    let tiles = tiling.tiles(width, height);
    let options = (Kind::Float, image.device());
    let output = Tensor::zeros([1, channels, height * scale, width * scale], options);
    let blended = tiling.overlap > 0 && tiles.len() > 1;
    let mut weights =
        blended.then(|| Tensor::zeros([1, 1, height * scale, width * scale], options));
    for (done, tile) in tiles.iter().enumerate() {
        watch(Checkpoint::Tile {
            done,
            total: tiles.len(),
        })?;
        let pad = tiling.pad;
        let (px0, py0) = ((tile.x0 - pad).max(0), (tile.y0 - pad).max(0));
        let (px1, py1) = ((tile.x1 + pad).min(width), (tile.y1 + pad).min(height));
        let input = image.narrow(2, py0, py1 - py0).narrow(3, px0, px1 - px0);
        let result = network(&input, &mut || watch(Checkpoint::Block))?.to_kind(Kind::Float);
        let (w, h) = ((tile.x1 - tile.x0) * scale, (tile.y1 - tile.y0) * scale);
        let centre =
            result
                .narrow(2, (tile.y0 - py0) * scale, h)
                .narrow(3, (tile.x0 - px0) * scale, w);
        let mut target = output
            .narrow(2, tile.y0 * scale, h)
            .narrow(3, tile.x0 * scale, w);
        match weights.as_mut() {
            None => target.copy_(&centre),
            Some(sums) => {
                let overlap = tiling.overlap * scale;
                let across = ramp(w, tile.x0 > 0, tile.x1 < width, overlap);
                let down = ramp(h, tile.y0 > 0, tile.y1 < height, overlap);
                let across = Tensor::from_slice(&across).to_device(image.device());
                let down = Tensor::from_slice(&down).to_device(image.device());
                let weight = down.view([1, 1, h, 1]) * across.view([1, 1, 1, w]);
                let _ = target.g_add_(&(centre * &weight));
                let mut sum = sums
                    .narrow(2, tile.y0 * scale, h)
                    .narrow(3, tile.x0 * scale, w);
                let _ = sum.g_add_(&weight);
            }
        }
    }
    watch(Checkpoint::Tile {
        done: tiles.len(),
        total: tiles.len(),
    })?;
    Ok(match weights {
        Some(sums) => output / sums,
        None => output,
    })
}

#[cfg(test)]
mod tests {
    use super::{ramp, TilePlan, Tiling, CPU_TILE, DEFAULT_TILE, MAX_TILE};
    use tch::Device;

    #[test]
    fn a_fitted_tile_is_the_largest_whose_padded_activations_fit() {
        let plan = TilePlan {
            side: None,
            pad: 10,
            overlap: None,
        };
        let per_pixel = 1000;
        for free in [1u64 << 20, 100 << 20, 1 << 30, 64 << 30] {
            let tiling = plan.tiling(Some(free), per_pixel, Device::Cuda(0));
            let used = |side: i64| ((side + 20) * (side + 20)) as u64 * per_pixel;
            assert_eq!(tiling.tile % 64, 0);
            assert!((64..=MAX_TILE).contains(&tiling.tile));
            // It fits (unless nothing does) and the next size up does not (unless capped).
            assert!(used(tiling.tile) <= free || tiling.tile == 64, "{free}");
            assert!(
                used(tiling.tile + 64) > free || tiling.tile == MAX_TILE,
                "{free}"
            );
            assert_eq!(tiling.overlap, tiling.tile / 16);
        }
        assert_eq!(
            plan.tiling(None, per_pixel, Device::Cuda(0)).tile,
            DEFAULT_TILE
        );
        let asked = TilePlan {
            side: Some(128),
            pad: 10,
            overlap: Some(100),
        };
        let tiling = asked.tiling(Some(1), per_pixel, Device::Cuda(0));
        assert_eq!((tiling.tile, tiling.overlap), (128, 63));
    }

    #[test]
    fn the_cpu_takes_tiles_of_at_most_256_pixels_unless_asked() {
        let plan = TilePlan {
            side: None,
            pad: 10,
            overlap: None,
        };
        let per_pixel = 1000;
        assert_eq!(plan.tiling(None, per_pixel, Device::Cpu).tile, CPU_TILE);
        assert_eq!(
            plan.tiling(Some(64 << 30), per_pixel, Device::Cpu).tile,
            CPU_TILE
        );
        // A budget that fits only smaller tiles still shrinks them.
        let small = plan.tiling(Some(30_000_000), per_pixel, Device::Cpu);
        assert_eq!(small.tile, 128);
        let asked = TilePlan {
            side: Some(1024),
            ..plan
        };
        assert_eq!(asked.tiling(None, per_pixel, Device::Cpu).tile, 1024);
    }

    #[test]
    fn neighbours_ramps_cross_fade_to_one_over_their_overlap() {
        for overlap in [1, 2, 5] {
            let (length, stride) = (12, 12 - overlap);
            let left = ramp(length, false, true, overlap);
            let right = ramp(length, true, false, overlap);
            for i in 0..overlap {
                let sum = left[stride as usize + i as usize] + right[i as usize];
                assert!((sum - 1.0).abs() < 1e-6, "{overlap} {i}: {sum}");
            }
            assert!(left[..stride as usize].iter().all(|w| *w == 1.0));
            assert!(right.windows(2).all(|w| w[0] <= w[1]));
        }
    }

    #[test]
    fn the_grid_covers_the_image_and_ends_at_its_edges() {
        let tiling = Tiling {
            tile: 5,
            pad: 1,
            overlap: 2,
        };
        let tiles = tiling.tiles(21, 13);
        let xs: Vec<(i64, i64)> = tiles
            .iter()
            .filter(|t| t.y0 == 0)
            .map(|t| (t.x0, t.x1))
            .collect();
        assert_eq!(
            xs,
            [
                (0, 5),
                (3, 8),
                (6, 11),
                (9, 14),
                (12, 17),
                (15, 20),
                (18, 21)
            ]
        );
        let whole = Tiling {
            tile: 0,
            pad: 0,
            overlap: 0,
        };
        assert_eq!(whole.tiles(7, 3).len(), 1);
    }
}
