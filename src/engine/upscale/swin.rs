//! Swin transformer blocks as SwinIR defines them (`SwinIR/__arch/SwinIR.py`): window
//! attention with a relative position bias, every other block on windows shifted by half
//! a window with the regions the roll joined masked apart, an MLP. The relative position
//! index and the masks are computed, not read: a file's stored buffers are those values.

use tch::{Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{LayerNorm, Linear};
use crate::engine::weights::VarPath;

/// `nn.LayerNorm`'s epsilon.
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// What SwinIR's and DAT's shifted windows add to the scores of pixels from different
/// regions (SCUNet's fill them with minus infinity).
pub const MASKED: f64 = -100.0;

/// `index[i][j]` of a window's pixels `i` and `j` (row-major) in a `[rows, columns]`
/// window: their offset's row and column, each shifted to start at 0, as one index into
/// the bias table.
pub fn relative_position_index([rows, columns]: [i64; 2]) -> Vec<i64> {
    let pixels = rows * columns;
    let side = 2 * columns - 1;
    let mut index = Vec::with_capacity((pixels * pixels) as usize);
    for i in 0..pixels {
        for j in 0..pixels {
            let dy = i / columns - j / columns + rows - 1;
            let dx = i % columns - j % columns + columns - 1;
            index.push(dy * side + dx);
        }
    }
    index
}

/// [B, H, W, C] as [B·(H/r)·(W/c), r, c, C] windows of `[r, c]`, row-major.
pub fn partition(x: &Tensor, [rows, columns]: [i64; 2]) -> Tensor {
    let size = x.size();
    let (b, h, w, c) = (size[0], size[1], size[2], size[3]);
    x.view([b, h / rows, rows, w / columns, columns, c])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([-1, rows, columns, c])
}

/// The `[r, c]` windows back as [B, H, W, C].
pub fn reverse(windows: &Tensor, [rows, columns]: [i64; 2], height: i64, width: i64) -> Tensor {
    let per_image = (height / rows) * (width / columns);
    let b = windows.size()[0] / per_image;
    windows
        .view([b, height / rows, width / columns, rows, columns, -1])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([b, height, width, -1])
}

/// `calculate_mask`: the shifted windows' [nW, N, N] mask, `masked` between pixels of
/// the regions that the roll brought together, 0 within one. Along each side the last
/// `shift` pixels are one region, the window before them another, the rest a third; a
/// side not shifted is one region (the references' `slice(-0, None)` takes it all).
pub fn shifted_mask(
    height: i64,
    width: i64,
    window: [i64; 2],
    shift: [i64; 2],
    masked: f64,
    like: &Tensor,
) -> Tensor {
    let bands = |length: i64, window: i64, shift: i64| -> Vec<f32> {
        (0..length)
            .map(|i| match i {
                _ if shift == 0 => 2.0,
                _ if i < length - window => 0.0,
                _ if i < length - shift => 1.0,
                _ => 2.0,
            })
            .collect()
    };
    let rows = Tensor::from_slice(&bands(height, window[0], shift[0])).view([height, 1]);
    let columns = Tensor::from_slice(&bands(width, window[1], shift[1])).view([1, width]);
    let regions = (rows * 3.0 + columns).view([1, height, width, 1]);
    let windows = partition(&regions, window).view([-1, window[0] * window[1]]);
    let differ = windows.unsqueeze(1).ne_tensor(&windows.unsqueeze(2));
    Tensor::zeros(differ.size(), (Kind::Float, tch::Device::Cpu))
        .masked_fill(&differ, masked)
        .to_device(like.device())
        .to_kind(like.kind())
}

/// The [heads, queries, keys] bias a [rows, heads] `table` gives through `index` (one
/// row per query and key, row-major), gathered once at load.
pub fn gather_bias(table: &Tensor, index: &[i64], queries: i64, keys: i64) -> Tensor {
    let index = Tensor::from_slice(index).to_device(table.device());
    table
        .index_select(0, &index)
        .view([queries, keys, -1])
        .permute([2, 0, 1])
        .contiguous()
}

/// Window attention with a relative position bias.
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    /// The bias gathered from the table once: [heads, N, N].
    bias: Tensor,
    heads: i64,
}

impl WindowAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, window: i64) -> Result<Self> {
        let pixels = window * window;
        let side = 2 * window - 1;
        let table = vp.get("relative_position_bias_table", &[side * side, heads])?;
        let bias = gather_bias(
            &table,
            &relative_position_index([window, window]),
            pixels,
            pixels,
        );
        Ok(Self {
            qkv: Linear::load(&vp.pp("qkv"), dim, 3 * dim, vp.pp("qkv").contains("bias"))?,
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            bias,
            heads,
        })
    }

    /// Attention within each of the [B·nW, N, C] windows; `mask` [nW, N, N] on shifted
    /// ones.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        self.proj.forward(&attend(&q, &k, &v, &self.bias, mask))
    }
}

/// Scaled dot-product attention of [B·nW, heads, Nq, d] queries over keys and values
/// [B·nW, heads, Nk, d], the [heads, Nq, Nk] `bias` and the [nW, Nq, Nk] `mask` added to
/// the scores; [B·nW, Nq, heads·d] out. The reference writes out the scores, the
/// softmax and the product; torch's fused attention (the bias and mask as its float
/// mask) gives the same within float rounding in about half the time on the CPU.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let d = q.size()[3];
    attend_scaled(q, k, v, bias, mask, (d as f64).powf(-0.5))
}

/// [`attend`] with the scores scaled by `scale` rather than the head width's inverse
/// square root (Swin V2's cosine attention brings its own per-head scale: 1).
pub fn attend_scaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Tensor {
    let size = q.size();
    let (b, heads, n, d) = (size[0], size[1], size[2], size[3]);
    let keys = k.size()[2];
    let scores_bias = match mask {
        Some(mask) => {
            let windows = mask.size()[0];
            (bias.unsqueeze(0) + mask.unsqueeze(1))
                .unsqueeze(0)
                .expand([b / windows, windows, heads, n, keys], false)
                .reshape([b, heads, n, keys])
        }
        None => bias.unsqueeze(0).expand([b, heads, n, keys], false),
    };
    Tensor::scaled_dot_product_attention(q, k, v, Some(&scores_bias), 0.0, false, scale, false)
        .transpose(1, 2)
        .reshape([b, n, heads * d])
}

/// One Swin transformer block.
pub struct Block {
    norm1: LayerNorm,
    attention: WindowAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    shifted: bool,
}

/// How many blocks there are under `blocks` (`blocks.0`, `blocks.1`, ...).
pub fn count_blocks(blocks: &VarPath) -> usize {
    (0..)
        .take_while(|b| blocks.pp(b).contains("norm1.weight"))
        .count()
}

/// The heads of the attention under `vp`, from its bias table's width (the layouts have
/// checked that every group's table is there).
pub fn table_heads(vp: &VarPath) -> i64 {
    vp.shape("relative_position_bias_table")
        .and_then(|s| s.get(1).copied())
        .unwrap_or(1)
}

/// The shifted blocks' shift: half a window, or none where the training size fit in one
/// window (the references' `min(input_resolution) <= window_size`).
pub fn shift_for(image_size: i64, window: i64) -> i64 {
    if image_size <= window {
        0
    } else {
        window / 2
    }
}

/// A group's input size and windows: the padded side lengths, the window, the shift of
/// shifted blocks and their mask.
pub struct Windows {
    pub height: i64,
    pub width: i64,
    pub window: i64,
    pub shift: i64,
    pub mask: Option<Tensor>,
}

impl Windows {
    /// The windows over a [B, C, H, W] feature map `like` (whole windows already), with
    /// the shifted blocks' mask where `shift` is above 0.
    pub fn of(like: &Tensor, window: i64, shift: i64) -> Self {
        let size = like.size();
        let (height, width) = (size[2], size[3]);
        Windows {
            height,
            width,
            window,
            shift,
            mask: (shift > 0)
                .then(|| shifted_mask(height, width, [window; 2], [shift; 2], MASKED, like)),
        }
    }
}

impl Block {
    /// The block under `vp`: `dim` wide, `heads` heads over `window`-pixel windows, an
    /// MLP `mlp_hidden` wide; `shifted` on shifted windows.
    pub fn load(
        vp: &VarPath,
        dim: i64,
        heads: i64,
        window: i64,
        mlp_hidden: i64,
        shifted: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attention: WindowAttention::load(&vp.pp("attn"), dim, heads, window)?,
            norm2: LayerNorm::load(&vp.pp("norm2"), dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(&vp.pp("mlp").pp("fc1"), dim, mlp_hidden, true)?,
            fc2: Linear::load(&vp.pp("mlp").pp("fc2"), mlp_hidden, dim, true)?,
            shifted,
        })
    }

    /// The block on [B, H·W, C] tokens.
    pub fn forward(&self, x: &Tensor, windows: &Windows) -> Tensor {
        self.forward_beside(x, windows, &|_| None)
    }

    /// The block with a branch beside the attention: `beside` takes the normed tokens
    /// as [B, H, W, C] and gives [B, H·W, C] added with the attention's output (HAT's
    /// convolutions).
    pub fn forward_beside(
        &self,
        x: &Tensor,
        windows: &Windows,
        beside: &dyn Fn(&Tensor) -> Option<Tensor>,
    ) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[2]);
        let Windows {
            height: h,
            width: w,
            window,
            shift,
            ..
        } = *windows;
        let shift = if self.shifted { shift } else { 0 };
        let normed = self.norm1.forward(x).view([b, h, w, c]);
        let y = match shift {
            0 => normed.shallow_clone(),
            s => normed.roll([-s, -s], [1, 2]),
        };
        let parts = partition(&y, [window; 2]).view([-1, window * window, c]);
        let mask = windows.mask.as_ref().filter(|_| shift > 0);
        let attended = self.attention.forward(&parts, mask);
        let y = reverse(&attended.view([-1, window, window, c]), [window; 2], h, w);
        let y = match shift {
            0 => y,
            s => y.roll([s, s], [1, 2]),
        };
        let mut x = x + y.view([b, h * w, c]);
        if let Some(branch) = beside(&normed) {
            let _ = x.g_add_(&branch);
        }
        let hidden = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        let mut out = self.fc2.forward(&hidden);
        let _ = out.g_add_(&x);
        out
    }
}

/// `check_image_size`: `image` padded on the bottom and right to whole windows by
/// reflection, or by replication where a side is too short to reflect (spandrel fails
/// there).
pub fn pad_to_windows(image: &Tensor, window: i64) -> Tensor {
    let size = image.size();
    let (height, width) = (size[2], size[3]);
    let more = |n: i64| (window - n % window) % window;
    let (ph, pw) = (more(height), more(width));
    if ph == 0 && pw == 0 {
        image.shallow_clone()
    } else if height > ph && width > pw {
        image.reflection_pad2d([0, pw, 0, ph])
    } else {
        image.replication_pad2d([0, pw, 0, ph])
    }
}

/// [B, C, H, W] as [B, H·W, C] tokens.
pub fn embed(x: &Tensor) -> Tensor {
    x.flatten(2, -1).transpose(1, 2)
}

/// [B, H·W, C] tokens as [B, C, H, W].
pub fn unembed(x: &Tensor, height: i64, width: i64) -> Tensor {
    let size = x.size();
    x.transpose(1, 2).reshape([size[0], size[2], height, width])
}

/// The body the Swin networks share (`forward_features`): the embedded `tokens` through
/// the patch norm where there is one, each group in turn (`group` runs one on the
/// tokens, handed `between` to ask between its blocks), the closing `norm`, back to
/// [B, C, H, W] over `windows`.
pub fn through_groups<G>(
    tokens: Tensor,
    embed_norm: Option<&LayerNorm>,
    (groups, between): (&[G], &mut Between<'_>),
    group: impl Fn(&G, &Tensor, &mut Between<'_>) -> Result<Tensor>,
    norm: &LayerNorm,
    windows: &Windows,
) -> Result<Tensor> {
    let tokens = match embed_norm {
        Some(embed_norm) => embed_norm.forward(&tokens),
        None => tokens,
    };
    let tokens = groups
        .iter()
        .try_fold(tokens, |x, g| group(g, &x, between))?;
    Ok(unembed(
        &norm.forward(&tokens),
        windows.height,
        windows.width,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relative_position_index_is_swins() {
        // torch's construction for a 2-pixel window, written out.
        assert_eq!(
            relative_position_index([2, 2]),
            [4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
    }

    #[test]
    fn the_rectangle_windows_index_is_dats() {
        // DAT's `Spatial_Attention` index for 2x3 windows, from torch.
        let expected = [
            7, 6, 5, 2, 1, 0, 8, 7, 6, 3, 2, 1, 9, 8, 7, 4, 3, 2, 12, 11, 10, 7, 6, 5, 13, 12, 11,
            8, 7, 6, 14, 13, 12, 9, 8, 7,
        ];
        assert_eq!(relative_position_index([2, 3]), expected);
    }

    #[test]
    fn a_side_not_shifted_is_one_region() {
        // DAT's masks for 2x1 windows shifted by (1, 0) and 1x2 ones by (0, 1) over 4x4,
        // from torch: each window's sum of masked scores.
        let like = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        let sums = |window, shift| {
            let mask = shifted_mask(4, 4, window, shift, MASKED, &like);
            Vec::<f32>::try_from(
                mask.abs()
                    .sum_dim_intlist([1i64, 2].as_slice(), false, None),
            )
            .unwrap()
        };
        assert_eq!(
            sums([2, 1], [1, 0]),
            [0., 0., 0., 0., 200., 200., 200., 200.]
        );
        assert_eq!(
            sums([1, 2], [0, 1]),
            [0., 200., 0., 200., 0., 200., 0., 200.]
        );
    }

    #[test]
    fn shifted_windows_mask_the_regions_the_roll_joined() {
        let like = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        let mask = shifted_mask(4, 4, [2, 2], [1, 1], MASKED, &like);
        assert_eq!(mask.size(), [4, 4, 4]);
        // The top-left window holds one region; the bottom-right four.
        assert_eq!(
            f64::try_from(mask.get(0).abs().sum(Kind::Float)).unwrap(),
            0.0
        );
        let last = Vec::<f32>::try_from(mask.get(3).flatten(0, -1)).unwrap();
        let masked = last.iter().filter(|v| **v == MASKED as f32).count();
        assert_eq!(masked, 12);
    }
}
