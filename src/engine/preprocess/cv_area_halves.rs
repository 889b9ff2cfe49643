//! OpenCV's area averaging at a factor of 2 on 8-bit RGB (`resizeAreaFast_` with 2×2
//! blocks): each destination value the rounded quarter of its block's sum,
//! `(sum + 2) >> 2`. The common case of `tile_resample`, so it has its own kernels.

/// Colour channels.
const CN: usize = 3;

/// The `dw`×`dh` halving of interleaved RGB `pixels` that are `width` pixels wide
/// (`width` ≥ 2·dw, at least 2·dh rows).
pub(super) fn halve(pixels: &[u8], width: usize, dw: usize, dh: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the features the function is compiled with.
        return unsafe { avx2::halve(pixels, width, dw, dh) };
    }
    halve_portable(pixels, width, dw, dh)
}

/// The rounded quarter of four bytes.
fn quarter(a: u8, b: u8, c: u8, d: u8) -> u8 {
    ((u16::from(a) + u16::from(b) + u16::from(c) + u16::from(d) + 2) >> 2) as u8
}

/// Any CPU: the quarter computed at every source column (one channel with its right
/// neighbour's, over contiguous bytes, which the compiler vectorises), then every other
/// pixel's kept.
fn halve_portable(pixels: &[u8], width: usize, dw: usize, dh: usize) -> Vec<u8> {
    if dw == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(dw * dh * CN);
    let (stride, span) = (width * CN, 2 * dw * CN);
    // One byte more than the last kept pixel's, for the four-byte copies below.
    let mut quarters = vec![0u8; span - CN + 1];
    let computed = span - CN;
    for y in 0..dh {
        // Zeroed while the row is written (in cache), not all at once beforehand.
        out.resize((y + 1) * dw * CN, 0);
        let target = &mut out[y * dw * CN..];
        let upper = &pixels[2 * y * stride..][..span];
        let lower = &pixels[(2 * y + 1) * stride..][..span];
        let pairs = upper[..computed]
            .iter()
            .zip(&lower[..computed])
            .zip(upper[CN..].iter().zip(&lower[CN..]));
        for (q, ((&a, &b), (&c, &d))) in quarters[..computed].iter_mut().zip(pairs) {
            *q = quarter(a, b, c, d);
        }
        keep_even_pixels(&quarters, target);
    }
    out
}

/// `target`'s pixels from the even pixels of `quarters` (which holds a byte beyond its
/// last even pixel): each copied as four bytes, the fourth overwritten by the next.
fn keep_even_pixels(quarters: &[u8], target: &mut [u8]) {
    let Some(last) = (target.len() / CN).checked_sub(1) else {
        return;
    };
    for j in 0..last {
        let from = 2 * j * CN;
        target[j * CN..j * CN + 4].copy_from_slice(&quarters[from..from + 4]);
    }
    target[last * CN..].copy_from_slice(&quarters[2 * last * CN..2 * last * CN + CN]);
}

/// AVX2: four destination pixels per step. Each 128-bit lane holds two 2×1 pixel pairs
/// of a row (12 bytes), shuffled so that the bytes to add sit side by side; a
/// multiply-add by ones sums them into 16 bits, the two rows are added, and the rounded
/// quarters are packed back to 12 bytes.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{quarter, CN};

    /// Destination pixels per vector step.
    const STEP: usize = 4;
    /// Bytes one step loads from each source row.
    const LOADED: usize = 32;
    /// Bytes one step stores: its 12, then 4 that the next write overwrites.
    const STORED: usize = 16;

    /// SAFETY: the CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn halve(pixels: &[u8], width: usize, dw: usize, dh: usize) -> Vec<u8> {
        let stride = width * CN;
        let len = dw * dh * CN;
        let mut out: Vec<u8> = Vec::with_capacity(len + STORED);
        let target = out.as_mut_ptr();
        for y in 0..dh {
            let (upper, lower) = (&pixels[2 * y * stride..], &pixels[(2 * y + 1) * stride..]);
            let row = target.add(y * dw * CN);
            // Steps while both 32-byte loads stay inside `pixels` (the lower row's is last).
            let mut x = 0;
            while x + STEP <= dw && 2 * x * CN + LOADED <= lower.len() {
                let quarters =
                    four_quarters(upper[2 * x * CN..].as_ptr(), lower[2 * x * CN..].as_ptr());
                _mm_storeu_si128(row.add(x * CN).cast(), quarters);
                x += STEP;
            }
            for x in x..dw {
                let (a, b) = (&upper[2 * x * CN..], &lower[2 * x * CN..]);
                for c in 0..CN {
                    row.add(x * CN + c)
                        .write(quarter(a[c], a[c + CN], b[c], b[c + CN]));
                }
            }
        }
        // SAFETY: every row's bytes were written, by steps or by the scalar tail; a
        // step's 4 extra bytes land on later pixels (written after it) or the spare room.
        out.set_len(len);
        out
    }

    /// The 12 bytes of four destination pixels from 8 source pixels of two rows (32
    /// bytes readable at each pointer), then 4 zero bytes.
    #[target_feature(enable = "avx2")]
    unsafe fn four_quarters(upper: *const u8, lower: *const u8) -> __m128i {
        let sum = _mm256_add_epi16(pair_sums(upper), pair_sums(lower));
        let rounded = _mm256_srli_epi16::<2>(_mm256_add_epi16(sum, _mm256_set1_epi16(2)));
        // Per lane: six quarters and two zeros, as bytes in its low 8.
        let packed = _mm256_packus_epi16(rounded, rounded);
        let low_halves = _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed));
        let drop_zeros = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, -1, -1, -1, -1);
        _mm_shuffle_epi8(low_halves, drop_zeros)
    }

    /// One row's horizontal pair sums for four destination pixels: lane 0 from source
    /// bytes 0..12, lane 1 from 12..24, each as six 16-bit sums and two zeros.
    #[target_feature(enable = "avx2")]
    unsafe fn pair_sums(row: *const u8) -> __m256i {
        let bytes = _mm256_loadu_si256(row.cast());
        let lanes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6));
        #[rustfmt::skip]
        let side_by_side = _mm256_setr_epi8(
            0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11, -1, -1, -1, -1,
            0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11, -1, -1, -1, -1,
        );
        let paired = _mm256_shuffle_epi8(lanes, side_by_side);
        _mm256_maddubs_epi16(paired, _mm256_set1_epi8(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::preprocess::xorshift32;

    /// Every destination width from one pixel up, on even and odd source widths (rows
    /// that end mid-step and a last row that ends the buffer), in the portable kernel
    /// and the one the CPU runs, against the rounded quarter of each block's sum.
    #[test]
    fn halving_rounds_each_blocks_quarter() {
        let mut words = xorshift32(0x2545_f491);
        for (dw, dh) in (1..=41).map(|w| (w, 1 + w % 3)) {
            for width in [2 * dw, 2 * dw + 1] {
                let height = 2 * dh + dw % 2;
                let pixels: Vec<u8> = words
                    .by_ref()
                    .take(width * height * CN)
                    .map(|w| w as u8)
                    .collect();
                let at = |x: usize, y: usize, c: usize| pixels[(y * width + x) * CN + c];
                let mut expected = Vec::new();
                for (y, x, c) in (0..dh).flat_map(|y| {
                    (0..dw).flat_map(move |x| (0..CN).map(move |c| (2 * y, 2 * x, c)))
                }) {
                    expected.push(quarter(
                        at(x, y, c),
                        at(x + 1, y, c),
                        at(x, y + 1, c),
                        at(x + 1, y + 1, c),
                    ));
                }
                let case = format!("{dw}x{dh} from {width}x{height}");
                assert_eq!(halve_portable(&pixels, width, dw, dh), expected, "{case}");
                assert_eq!(halve(&pixels, width, dw, dh), expected, "{case}");
            }
        }
    }

    #[test]
    fn a_quarter_rounds_half_up() {
        assert_eq!(quarter(0, 0, 0, 1), 0);
        assert_eq!(quarter(0, 0, 1, 1), 1);
        assert_eq!(quarter(255, 255, 255, 254), 255);
        assert_eq!(quarter(1, 2, 3, 0), 2);
    }
}
