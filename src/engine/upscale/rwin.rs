//! The rectangle-window attention DAT and RGT share (`Spatial_Attention`,
//! `WindowAttention`): half the channels attend within `[rows, columns]` windows and half
//! within the transposed ones, each with a position bias drawn by a small MLP from the
//! offsets; the q/k/v are zero-padded to whole windows of both orientations, and some
//! blocks shift their windows by half with the regions the roll joined masked apart
//! (CRAFT's, on images already whole windows, shift with no mask).
//! Also their spatial-gate feed-forward network and the frame around their groups.

use tch::Tensor;

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{
    attend, embed, gather_bias, partition, relative_position_index, reverse, shifted_mask, unembed,
    LAYER_NORM_EPS, MASKED,
};
use crate::engine::upscale::swinir::{image_mean, ResidualConv, SwinShape, Tail};
use crate::engine::weights::VarPath;

/// The first dimension of `name` under `vp` (0 where it is missing: the load that
/// follows names it).
pub fn width(vp: &VarPath, name: &str) -> i64 {
    vp.shape(name).and_then(|s| s.first().copied()).unwrap_or(0)
}

/// The offsets a `[rows, columns]` window's position bias is drawn from
/// (`rpe_biases`): every (row, column) difference, row-major, as [(2r-1)(2c-1), 2].
fn position_offsets([rows, columns]: [i64; 2], like: &VarPath) -> Tensor {
    let offsets: Vec<f32> = (1 - rows..rows)
        .flat_map(|dy| (1 - columns..columns).flat_map(move |dx| [dy as f32, dx as f32]))
        .collect();
    Tensor::from_slice(&offsets)
        .view([-1, 2])
        .to_device(like.device())
        .to_kind(like.kind())
}

/// Attention within one orientation's windows (`Spatial_Attention`), its position bias
/// drawn once at load by the dynamic position bias MLP (`DynamicPosBias`, no residual).
struct WindowBranch {
    /// [heads, N, N].
    bias: Tensor,
    heads: i64,
    window: [i64; 2],
}

impl WindowBranch {
    fn load(vp: &VarPath, heads: i64, window: [i64; 2]) -> Result<Self> {
        let pos = vp.pp("pos");
        let hidden = width(&pos, "pos_proj.weight");
        let project = Linear::load(&pos.pp("pos_proj"), 2, hidden, true)?;
        let mut table = project.forward(&position_offsets(window, vp));
        for (layer, output) in [("pos1", hidden), ("pos2", hidden), ("pos3", heads)] {
            let norm = LayerNorm::load(&pos.pp(layer).pp(0), hidden, LAYER_NORM_EPS)?;
            let linear = Linear::load(&pos.pp(layer).pp(2), hidden, output, true)?;
            table = linear.forward(&norm.forward(&table).relu());
        }
        let pixels = window[0] * window[1];
        let index = relative_position_index(window);
        Ok(Self {
            bias: gather_bias(&table, &index, pixels, pixels),
            heads,
            window,
        })
    }

    /// Attention within the windows of [3, B, H, W, C] q/k/v (whole windows), `mask`
    /// [nW, N, N] on shifted ones; [B, H, W, C] out.
    fn forward(&self, qkv: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let size = qkv.size();
        let (h, w, c) = (size[2], size[3], size[4]);
        let [rows, columns] = self.window;
        let heads = self.heads;
        let windows = |i: i64| {
            partition(&qkv.get(i), self.window)
                .view([-1, rows * columns, heads, c / heads])
                .permute([0, 2, 1, 3])
        };
        let attended = attend(&windows(0), &windows(1), &windows(2), &self.bias, mask);
        reverse(&attended.view([-1, rows, columns, c]), self.window, h, w)
    }
}

/// How shifted blocks treat the regions their roll joins.
enum Joined {
    /// No block shifts (or the windows are one pixel): no roll.
    NotShifted,
    /// Each orientation's shifted windows keep the joined regions apart (DAT, RGT).
    Masked([Tensor; 2]),
    /// The joined regions attend to each other (CRAFT).
    Unmasked,
}

/// Where a forward pass's spatial blocks put their windows: the image side lengths, the
/// sides padded with zeros to whole windows of both orientations, each orientation's
/// shift and how its shifted windows treat the regions the roll joins.
pub struct Geometry {
    pub height: i64,
    pub width: i64,
    padded: [i64; 2],
    shifts: [[i64; 2]; 2],
    joined: Joined,
}

impl Geometry {
    /// For the [B, C, H, W] feature map `like` and the first orientation's window; the
    /// masks only where some block is `shifted`.
    pub fn of(like: &Tensor, split: [i64; 2], shifted: bool) -> Self {
        let size = like.size();
        let (height, width) = (size[2], size[3]);
        // The reference pads to the larger side, which the smaller divides.
        let side = split[0].max(split[1]);
        let whole = |n: i64| n + (side - n % side) % side;
        let padded = [whole(height), whole(width)];
        let windows = [split, [split[1], split[0]]];
        let shifts = windows.map(|[rows, columns]| [rows / 2, columns / 2]);
        let joined =
            if shifted && shifts[0] != [0, 0] {
                Joined::Masked([0, 1].map(|i| {
                    shifted_mask(padded[0], padded[1], windows[i], shifts[i], MASKED, like)
                }))
            } else {
                Joined::NotShifted
            };
        Self {
            height,
            width,
            padded,
            shifts,
            joined,
        }
    }

    /// For a [B, C, H, W] feature map `like` whose sides the windows of `split` and its
    /// transpose already tile, shifted blocks rolling by half a window with no mask.
    pub fn unmasked(like: &Tensor, split: [i64; 2]) -> Self {
        let size = like.size();
        let (height, width) = (size[2], size[3]);
        Self {
            height,
            width,
            padded: [height, width],
            shifts: [[split[0] / 2, split[1] / 2], [split[1] / 2, split[0] / 2]],
            joined: Joined::Unmasked,
        }
    }
}

/// Both orientations' window attention (the `attns` pair) over q/k/v whose channels
/// they split in halves.
pub struct WindowPair {
    branches: [WindowBranch; 2],
    shifted: bool,
}

impl WindowPair {
    /// The pair under `attns`, `heads` in all (half each), the first orientation's window
    /// `split`, on shifted windows where `shifted`.
    pub fn load(attns: &VarPath, heads: i64, split: [i64; 2], shifted: bool) -> Result<Self> {
        Ok(Self {
            branches: [
                WindowBranch::load(&attns.pp(0), heads / 2, split)?,
                WindowBranch::load(&attns.pp(1), heads / 2, [split[1], split[0]])?,
            ],
            shifted,
        })
    }

    /// Whether it attends on shifted windows.
    pub fn shifted(&self) -> bool {
        self.shifted
    }

    /// [B, H·W, C] tokens projected by `qkv` and attended: the attention's [B, H·W, C]
    /// output and the values as a [B, C, H, W] map (for the depthwise branch beside it).
    pub fn project_and_attend(
        &self,
        qkv: &Linear,
        x: &Tensor,
        geometry: &Geometry,
    ) -> (Tensor, Tensor) {
        let size = x.size();
        let (b, c) = (size[0], size[2]);
        let qkv = qkv
            .forward(x)
            .view([b, geometry.height, geometry.width, 3, c])
            .permute([3, 0, 1, 2, 4]);
        let values = qkv.get(2).permute([0, 3, 1, 2]);
        (self.forward(&qkv, geometry), values)
    }

    /// Attention of [3, B, H, W, C] q/k/v; [B, H·W, C] out, the halves side by side.
    pub fn forward(&self, qkv: &Tensor, geometry: &Geometry) -> Tensor {
        let size = qkv.size();
        let (b, c) = (size[1], size[4]);
        let (h, w) = (geometry.height, geometry.width);
        let [ph, pw] = geometry.padded;
        let padded = qkv.constant_pad_nd([0, 0, 0, pw - w, 0, ph - h]);
        let half = c / 2;
        let attended: Vec<Tensor> = self
            .branches
            .iter()
            .enumerate()
            .map(|(i, branch)| {
                let part = padded.narrow(4, i as i64 * half, half);
                let shift = match (&geometry.joined, self.shifted) {
                    (Joined::Masked(masks), true) => Some((geometry.shifts[i], Some(&masks[i]))),
                    (Joined::Unmasked, true) => Some((geometry.shifts[i], None)),
                    _ => None,
                };
                let y = match shift {
                    Some(([sy, sx], mask)) => branch
                        .forward(&part.roll([-sy, -sx], [2, 3]), mask)
                        .roll([sy, sx], [1, 2]),
                    None => branch.forward(&part, None),
                };
                y.narrow(1, 0, h).narrow(2, 0, w).reshape([b, h * w, half])
            })
            .collect();
        Tensor::cat(&attended, 2)
    }
}

/// The spatial-gate feed-forward network (`SGFN`): half its hidden channels, normed and
/// convolved depthwise, gate the other half.
pub struct GatedFeedForward {
    fc1: Linear,
    norm: LayerNorm,
    conv: SameConv,
    fc2: Linear,
}

impl GatedFeedForward {
    pub fn load(vp: &VarPath, dim: i64, hidden: i64) -> Result<Self> {
        let half = hidden / 2;
        let gate = vp.pp("sg");
        Ok(Self {
            fc1: Linear::load(&vp.pp("fc1"), dim, hidden, true)?,
            norm: LayerNorm::load(&gate.pp("norm"), half, LAYER_NORM_EPS)?,
            conv: SameConv::depthwise(&gate.pp("conv"), half, 3, true)?,
            fc2: Linear::load(&vp.pp("fc2"), half, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor {
        let y = self.fc1.forward(x).gelu("none");
        let half = y.size()[2] / 2;
        let (h, w) = (geometry.height, geometry.width);
        let normed = self.norm.forward(&y.narrow(2, half, half));
        let gate = embed(&self.conv.forward(&unembed(&normed, h, w)));
        self.fc2.forward(&(y.narrow(2, 0, half) * gate))
    }
}

/// Whether block `block` of group `group` attends on shifted windows: DAT's and RGT's
/// rule, blocks 2, 6, 10, ... of even groups and 0, 4, 8, ... of odd ones.
pub fn shifts(group: i64, block: i64) -> bool {
    match group % 2 {
        0 => block > 0 && (block - 2) % 4 == 0,
        _ => block % 4 == 0,
    }
}

/// A block of the residual groups the frame runs.
pub trait WindowBlock {
    /// The block on [B, H·W, C] tokens.
    fn forward(&self, x: &Tensor, geometry: &Geometry) -> Tensor;
    /// Whether it attends on shifted windows.
    fn shifted(&self) -> bool;
}

/// A residual group: its blocks, the closing convolution, the group's input added.
pub struct WindowGroup<B> {
    pub(super) blocks: Vec<B>,
    pub(super) conv: ResidualConv,
}

impl<B: WindowBlock> WindowGroup<B> {
    fn forward(
        &self,
        x: &Tensor,
        geometry: &Geometry,
        between: &mut Between<'_>,
    ) -> Result<Tensor> {
        let y = in_turn(x.shallow_clone(), &self.blocks, between, |block, y| {
            block.forward(y, geometry)
        })?;
        Ok(self
            .conv
            .close_group(&y, x, geometry.height, geometry.width))
    }
}

/// DAT's frame around its residual groups (RGT's too): the mean subtracted, a first
/// convolution, the groups on its layer-normed tokens, a closing norm, the body's
/// residual convolution with the long skip, SwinIR's tail, the mean added back.
pub struct Frame<B> {
    first: Conv2d,
    before_groups: LayerNorm,
    groups: Vec<WindowGroup<B>>,
    norm: LayerNorm,
    after_body: ResidualConv,
    tail: Tail,
    mean: Tensor,
    split: [i64; 2],
    /// Whether any block attends on shifted windows (the masks are built for them).
    shifted: bool,
    scale: i64,
}

impl<B: WindowBlock> Frame<B> {
    /// The network of `shape` around `groups`, whose first windows are `split`.
    pub(super) fn new(
        vp: &VarPath,
        shape: &SwinShape,
        split: [i64; 2],
        groups: Vec<WindowGroup<B>>,
    ) -> Result<Self> {
        let (channels, features) = (shape.channels, shape.features);
        let shifted = groups.iter().flat_map(|g| &g.blocks).any(B::shifted);
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            before_groups: LayerNorm::load(&vp.pp("before_RG.1"), features, LAYER_NORM_EPS)?,
            groups,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body: ResidualConv::load(&vp.pp("conv_after_body"), features, shape.three_conv)?,
            tail: Tail::load(vp, shape)?,
            mean: image_mean(channels, vp),
            split,
            shifted,
            scale: shape.scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let input = image - &self.mean;
        let first = self.first.forward(&input);
        let geometry = Geometry::of(&first, self.split, self.shifted);
        let tokens = self.before_groups.forward(&embed(&first));
        let tokens = self
            .groups
            .iter()
            .try_fold(tokens, |x, group| group.forward(&x, &geometry, between))?;
        let features = unembed(&self.norm.forward(&tokens), geometry.height, geometry.width);
        let body = self.after_body.forward(&features) + &first;
        Ok(self.tail.forward(&body, &input, self.scale) + &self.mean)
    }
}
