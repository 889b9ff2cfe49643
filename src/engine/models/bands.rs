//! The VAE decoder's full-resolution layers run a band of rows at a time, so that a
//! layer's temporaries (its group norm's output, its convolution's workspace, an
//! upsampled input) exist for one band rather than for the whole image: at 1024² the
//! decoder's last levels otherwise hold several 256–512 MiB temporaries (bfloat16) at
//! once. A group norm needs statistics over the whole tensor, so they are gathered over
//! the bands first (one pass, merged in double precision), then each band is normalised
//! with them in float32 as libtorch's group norm computes it; a 3×3 convolution takes one row of halo
//! from each neighbouring band and zero rows at the image's edges. The result is the
//! whole-image computation's up to rounding.

use tch::{Kind, Tensor};

use crate::engine::models::nn::{is_channels_last, Conv2d, GroupNorm};

/// The bands `[start, end)` of `height` rows, `rows` each (the last one shorter).
fn bands(height: i64, rows: i64) -> impl Iterator<Item = (i64, i64)> {
    let rows = rows.max(1);
    (0..height)
        .step_by(rows as usize)
        .map(move |start| (start, (start + rows).min(height)))
}

/// Per sample and group: the mean and the (biased) variance, [N, G] float64.
struct GroupStats {
    mean: Tensor,
    var: Tensor,
}

/// The statistics `norm` takes of `x` [N, C, H, W], gathered a band at a time in one
/// pass: each band's mean and variance (float32), merged in float64 (Chan's parallel
/// update).
fn group_stats(norm: &GroupNorm, x: &Tensor, rows: i64) -> GroupStats {
    let size = x.size();
    let (n, channels, width) = (size[0], size[1], size[3]);
    let groups = norm.groups();
    let per_row = (channels / groups * width) as f64;
    let zeros = || Tensor::zeros([n, groups], (Kind::Double, x.device()));
    let (mut mean, mut squares, mut count) = (zeros(), zeros(), 0.0);
    for (start, end) in bands(size[2], rows) {
        let band = x
            .narrow(2, start, end - start)
            .to_kind(Kind::Float)
            .reshape([n, groups, -1]);
        let (band_var, band_mean) = band.var_mean_correction(Some([2i64].as_slice()), 0, false);
        let band_count = per_row * (end - start) as f64;
        let total = count + band_count;
        let delta = band_mean.to_kind(Kind::Double) - &mean;
        mean += &delta * (band_count / total);
        squares += band_var.to_kind(Kind::Double) * band_count
            + delta.square() * (count * band_count / total);
        count = total;
    }
    GroupStats {
        mean,
        var: squares / count,
    }
}

/// `silu(norm(band))` for a band of rows of the tensor `stats` were taken of, in the
/// band's kind, computed in float32 as libtorch's group norm computes it.
fn norm_silu_band(norm: &GroupNorm, band: &Tensor, stats: &GroupStats) -> Tensor {
    let size = band.size();
    let (n, channels) = (size[0], size[1]);
    let groups = norm.groups();
    let float = |t: &Tensor| t.to_kind(Kind::Float);
    if n == 1 {
        // One sample: its group statistics as per-channel ones, in one fused
        // inference-mode batch norm.
        let per_channel = |t: &Tensor| {
            float(t)
                .view([groups])
                .repeat_interleave_self_int(channels / groups, 0, None)
        };
        let mut y = band.batch_norm(
            Some(&float(norm.weight())),
            Some(&float(norm.bias())),
            Some(&per_channel(&stats.mean)),
            Some(&per_channel(&stats.var)),
            false,
            0.0,
            norm.eps(),
            true,
        );
        return y.silu_();
    }
    let view = |t: &Tensor| float(t).view([n, groups, 1, 1, 1]);
    let rstd = (&stats.var + norm.eps()).rsqrt();
    let y = (band
        .to_kind(Kind::Float)
        .reshape([n, groups, channels / groups, size[2], size[3]])
        - view(&stats.mean))
        * view(&rstd);
    let affine = |t: &Tensor| float(t).view([1, channels, 1, 1]);
    let mut y = y.reshape([n, channels, size[2], size[3]]);
    y *= affine(norm.weight());
    y += affine(norm.bias());
    y.silu_().to_kind(band.kind())
}

/// An empty [N, C, H, W] tensor like `like`'s kind, device and memory format.
fn empty_like_layout(like: &Tensor, size: [i64; 4]) -> Tensor {
    let options = (like.kind(), like.device());
    if is_channels_last(like) {
        let [n, c, h, w] = size;
        Tensor::empty([n, h, w, c], options).permute([0, 3, 1, 2])
    } else {
        Tensor::empty(size, options)
    }
}

/// Rows `[start, end)` of `conv` applied to a tensor of `height` rows whose rows
/// `[start - 1, end + 1)` (those that exist) are `halo`: zero rows stand in for the
/// missing ones at the image's edges, the columns are padded by the convolution.
fn conv_rows(conv: &Conv2d, halo: &Tensor, (start, end): (i64, i64), height: i64) -> Tensor {
    let top = i64::from(start == 0);
    let bottom = i64::from(end == height);
    conv.forward_unpadded_rows(&halo.constant_pad_nd([0, 0, top, bottom]))
}

/// `conv(silu(norm(x)))` for a 3×3, stride-1, padding-1 `conv`, `rows` output rows at a
/// time.
pub fn norm_silu_conv(norm: &GroupNorm, conv: &Conv2d, x: &Tensor, rows: i64) -> Tensor {
    let size = x.size();
    let (height, width) = (size[2], size[3]);
    let stats = group_stats(norm, x, rows);
    let mut out: Option<Tensor> = None;
    for (start, end) in bands(height, rows) {
        let (low, high) = ((start - 1).max(0), (end + 1).min(height));
        let halo = norm_silu_band(norm, &x.narrow(2, low, high - low), &stats);
        let y = conv_rows(conv, &halo, (start, end), height);
        let target =
            out.get_or_insert_with(|| empty_like_layout(&y, [size[0], y.size()[1], height, width]));
        target.narrow(2, start, end - start).copy_(&y);
    }
    out.unwrap_or_else(|| conv.forward(&norm.forward(x).silu()))
}

/// `Upsample2D`: nearest-neighbour doubling then a 3×3, stride-1, padding-1 `conv`,
/// `rows` output rows at a time.
pub fn upsample_conv(conv: &Conv2d, x: &Tensor, rows: i64) -> Tensor {
    let size = x.size();
    let (height, width) = (size[2] * 2, size[3] * 2);
    let mut out: Option<Tensor> = None;
    for (start, end) in bands(height, rows) {
        let (low, high) = ((start - 1).max(0), (end + 1).min(height));
        // Upsampled row i is input row i / 2.
        let (first, last) = (low / 2, (high - 1) / 2 + 1);
        let input = x.narrow(2, first, last - first);
        let doubled = input.upsample_nearest2d([2 * (last - first), width], 2.0, 2.0);
        let halo = doubled.narrow(2, low - 2 * first, high - low);
        let y = conv_rows(conv, &halo, (start, end), height);
        let target =
            out.get_or_insert_with(|| empty_like_layout(&y, [size[0], y.size()[1], height, width]));
        target.narrow(2, start, end - start).copy_(&y);
    }
    out.unwrap_or_else(|| conv.forward(&x.upsample_nearest2d([height, width], 2.0, 2.0)))
}
