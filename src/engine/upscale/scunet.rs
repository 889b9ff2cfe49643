//! SCUNet (Swin-Conv-UNet, the ScuNET GAN and PSNR denoisers), as spandrel runs it
//! (`SCUNet/__arch/SCUNet.py`): the image padded to a multiple of 64 by reflection, a
//! U-Net of three 2×2 strided downsamplings and three transposed ones with skip sums,
//! each stage a chain of Swin-Conv blocks. A block's 1×1 convolution splits its channels
//! into a residual convolution branch and a Swin transformer branch (8-pixel windows,
//! heads of 32 channels, every other block on windows shifted by half with the joined
//! regions masked to minus infinity); another 1×1 convolution joins them, added to the
//! block's input.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::layout::scunet::{HEAD_WIDTH, STAGES, WINDOW};
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::patch_conv::PatchConv;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{
    attend, gather_bias, pad_to_windows, partition, relative_position_index, reverse, shifted_mask,
    LAYER_NORM_EPS,
};
use crate::engine::weights::VarPath;

/// The side the image is padded to a multiple of (three halvings down to whole windows).
const PAD_MULTIPLE: i64 = 64;

/// The Swin transformer branch (`Block` with its `WMSA`).
struct Transformer {
    norm1: LayerNorm,
    qkv: Linear,
    /// The position bias gathered once: [heads, N, N].
    bias: Tensor,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    shifted: bool,
}

impl Transformer {
    fn load(vp: &VarPath, dim: i64, shifted: bool) -> Result<Self> {
        let heads = dim / HEAD_WIDTH;
        let side = 2 * WINDOW - 1;
        let msa = vp.pp("msa");
        // Stored as [heads, rows, columns] of offsets: the table [offsets, heads].
        let params = msa.get("relative_position_params", &[heads, side, side])?;
        let table = params.view([heads, side * side]).transpose(0, 1);
        let pixels = WINDOW * WINDOW;
        let index = relative_position_index([WINDOW; 2]);
        let mlp = vp.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("ln1"), dim, LAYER_NORM_EPS)?,
            qkv: Linear::load(&msa.pp("embedding_layer"), dim, 3 * dim, true)?,
            bias: gather_bias(&table, &index, pixels, pixels),
            proj: Linear::load(&msa.pp("linear"), dim, dim, true)?,
            norm2: LayerNorm::load(&vp.pp("ln2"), dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(&mlp.pp(0), dim, 4 * dim, true)?,
            fc2: Linear::load(&mlp.pp(2), 4 * dim, dim, true)?,
            heads,
            shifted,
        })
    }

    /// On [B, H, W, C] (whole windows); `mask` is the shifted windows' [nW, N, N].
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let size = x.size();
        let (h, w, c) = (size[1], size[2], size[3]);
        let shift = if self.shifted { WINDOW / 2 } else { 0 };
        let normed = self.norm1.forward(x);
        let y = match shift {
            0 => normed,
            s => normed.roll([-s, -s], [1, 2]),
        };
        let pixels = WINDOW * WINDOW;
        let windows = partition(&y, [WINDOW; 2]).view([-1, pixels, c]);
        let qkv = self
            .qkv
            .forward(&windows)
            .view([-1, pixels, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let mask = self.shifted.then_some(mask);
        let attended = attend(&qkv.get(0), &qkv.get(1), &qkv.get(2), &self.bias, mask);
        let attended = self.proj.forward(&attended).view([-1, WINDOW, WINDOW, c]);
        let y = reverse(&attended, [WINDOW; 2], h, w);
        let y = match shift {
            0 => y,
            s => y.roll([s, s], [1, 2]),
        };
        let x = x + y;
        let hidden = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        self.fc2.forward(&hidden) + x
    }
}

/// A Swin-Conv block (`ConvTransBlock`) of `2 × half` channels.
struct SwinConvBlock {
    split: Conv2d,
    convs: [SameConv; 2],
    transformer: Transformer,
    join: Conv2d,
    half: i64,
}

impl SwinConvBlock {
    fn load(vp: &VarPath, half: i64, shifted: bool) -> Result<Self> {
        let width = 2 * half;
        let convs = vp.pp("conv_block");
        Ok(Self {
            split: Conv2d::load(&vp.pp("conv1_1"), width, width, 1, 1, 0)?,
            convs: [
                SameConv::load(&convs.pp(0), [half, half], 3, 1, false)?,
                SameConv::load(&convs.pp(2), [half, half], 3, 1, false)?,
            ],
            transformer: Transformer::load(&vp.pp("trans_block"), half, shifted)?,
            join: Conv2d::load(&vp.pp("conv1_2"), width, width, 1, 1, 0)?,
            half,
        })
    }

    /// On [B, C, H, W].
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let y = self.split.forward(x);
        let convolved = y.narrow(1, 0, self.half);
        let convolved =
            self.convs[1].forward(&self.convs[0].forward(&convolved).relu()) + convolved;
        let tokens = y.narrow(1, self.half, self.half).permute([0, 2, 3, 1]);
        let attended = self
            .transformer
            .forward(&tokens, mask)
            .permute([0, 3, 1, 2]);
        self.join.forward(&Tensor::cat(&[convolved, attended], 1)) + x
    }
}

/// How a stage changes the resolution.
enum Resample {
    /// After the blocks: a 2×2 convolution of stride 2 to twice the channels.
    Down(PatchConv),
    /// Before them: a 2×2 transposed convolution of stride 2 to half the channels.
    Up(PatchConv),
    None,
}

/// One stage of the U-Net.
struct Stage {
    blocks: Vec<SwinConvBlock>,
    resample: Resample,
}

impl Stage {
    /// Stage `index` of `STAGES` with `count` blocks of `width` channels.
    fn load(vp: &VarPath, index: usize, count: i64, width: i64) -> Result<Self> {
        let first_block = i64::from(index > 3);
        let blocks = (0..count)
            .map(|i| SwinConvBlock::load(&vp.pp(first_block + i), width / 2, i % 2 == 1))
            .collect::<Result<_>>()?;
        let resample = match index {
            0..=2 => Resample::Down(PatchConv::down(&vp.pp(count), [width, 2 * width], false)?),
            3 => Resample::None,
            _ => Resample::Up(PatchConv::up(&vp.pp(0), [2 * width, width], false)?),
        };
        Ok(Self { blocks, resample })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = match &self.resample {
            Resample::Up(conv) => conv.forward(x),
            _ => x.shallow_clone(),
        };
        let size = x.size();
        let mask = match self.blocks.len() {
            0 | 1 => Tensor::zeros([1], (x.kind(), x.device())),
            _ => shifted_mask(
                size[2],
                size[3],
                [WINDOW; 2],
                [WINDOW / 2; 2],
                f64::NEG_INFINITY,
                &x,
            ),
        };
        let x = self
            .blocks
            .iter()
            .fold(x, |x, block| block.forward(&x, &mask));
        match &self.resample {
            Resample::Down(conv) => conv.forward(&x),
            _ => x,
        }
    }
}

/// SCUNet.
pub struct ScuNet {
    head: SameConv,
    stages: Vec<Stage>,
    tail: SameConv,
}

impl ScuNet {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::ScuNet {
            channels,
            features,
            blocks,
        } = architecture
        else {
            unreachable!("a SCUNet architecture");
        };
        // The blocks' width at each stage: the down stages double it, the up ones halve
        // it back.
        let widths = [1, 2, 4, 8, 4, 2, 1].map(|m| m * features);
        let stages = (0..STAGES.len())
            .map(|i| Stage::load(&vp.pp(STAGES[i]), i, blocks[i], widths[i]))
            .collect::<Result<_>>()?;
        Ok(Self {
            head: SameConv::load(&vp.pp("m_head").pp(0), [channels, features], 3, 1, false)?,
            stages,
            tail: SameConv::load(&vp.pp("m_tail").pp(0), [features, channels], 3, 1, false)?,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let x1 = self.head.forward(&pad_to_windows(image, PAD_MULTIPLE));
        let [down1, down2, down3, body, up3, up2, up1] = &self.stages[..] else {
            unreachable!("seven stages");
        };
        let mut stage = |stage: &Stage, x: &Tensor| -> Result<Tensor> {
            between()?;
            Ok(stage.forward(x))
        };
        let x2 = stage(down1, &x1)?;
        let x3 = stage(down2, &x2)?;
        let x4 = stage(down3, &x3)?;
        let x = stage(body, &x4)?;
        let x = stage(up3, &(x + &x4))?;
        let x = stage(up2, &(x + &x3))?;
        let x = stage(up1, &(x + &x2))?;
        Ok(self
            .tail
            .forward(&(x + &x1))
            .narrow(2, 0, height)
            .narrow(3, 0, width))
    }
}
