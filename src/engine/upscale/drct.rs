//! DRCT, as spandrel runs it (`DRCT/__arch/drct_arch.py`, in eval mode): a first
//! convolution, residual dense groups of Swin transformer blocks (`swin.rs`), a layer
//! norm, SwinIR's pixel-shuffle upsampler. The descriptor pads the input to multiples of
//! 16, which the window divides (the layout checks it), so the network itself pads
//! nothing.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm};
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::layout::drct::DENSE_BLOCKS;
use crate::engine::upscale::layout::{Architecture, SwinUpsampler};
use crate::engine::upscale::swin::{
    embed, shift_for, table_heads, through_groups, unembed, Block, Windows, LAYER_NORM_EPS,
};
use crate::engine::upscale::swinir::{image_mean, ResidualConv, SwinShape, Tail};
use crate::engine::weights::VarPath;

/// The LeakyReLU slope after each adjusting convolution but the last.
const SLOPE: f64 = 0.2;
/// How much of a group's output its input takes (`x5 * 0.2 + x`).
const GROUP_RESIDUAL_SCALE: f64 = 0.2;

/// A residual dense group (`RDG`): block k attends over the group's input and the
/// growths of blocks 1..k; a 1×1 convolution turns its output into the next growth (the
/// last one back to the group's width).
struct DenseGroup {
    blocks: Vec<Block>,
    adjust: Vec<Conv2d>,
}

impl DenseGroup {
    fn load(vp: &VarPath, features: i64, growth: i64, window: i64) -> Result<Self> {
        let mut blocks = Vec::new();
        let mut adjust = Vec::new();
        for k in 0..DENSE_BLOCKS {
            let width = features + k * growth;
            let block = vp.pp(format!("swin{}", k + 1));
            let hidden = block
                .pp("mlp")
                .shape("fc1.weight")
                .and_then(|s| s.first().copied())
                .unwrap_or(width);
            let heads = table_heads(&block.pp("attn"));
            // Blocks 2 and 4 attend over shifted windows.
            blocks.push(Block::load(
                &block,
                width,
                heads,
                window,
                hidden,
                k % 2 == 1,
            )?);
            let out = if k + 1 == DENSE_BLOCKS {
                features
            } else {
                growth
            };
            adjust.push(Conv2d::load(
                &vp.pp(format!("adjust{}", k + 1)),
                width,
                out,
                1,
                1,
                0,
            )?);
        }
        Ok(Self { blocks, adjust })
    }

    /// The group on [B, H·W, C] tokens.
    fn forward(&self, x: &Tensor, windows: &Windows, between: &mut Between<'_>) -> Result<Tensor> {
        let (height, width) = (windows.height, windows.width);
        let mut dense = vec![x.shallow_clone()];
        for (k, (block, adjust)) in self.blocks.iter().zip(&self.adjust).enumerate() {
            between()?;
            let input = Tensor::cat(&dense, -1);
            let adjusted = adjust.forward(&unembed(&block.forward(&input, windows), height, width));
            if k + 1 == self.blocks.len() {
                return Ok(embed(&adjusted) * GROUP_RESIDUAL_SCALE + x);
            }
            dense.push(embed(&leaky_in_place(adjusted, SLOPE)));
        }
        Ok(x.shallow_clone())
    }
}

/// DRCT.
pub struct Drct {
    first: Conv2d,
    embed_norm: Option<LayerNorm>,
    groups: Vec<DenseGroup>,
    norm: LayerNorm,
    /// The body's closing convolution (`1conv`), or none (`identity`).
    after_body: Option<ResidualConv>,
    tail: Tail,
    mean: Tensor,
    window: i64,
    /// The shifted blocks' shift (0 where the training size fit in one window).
    shift: i64,
    scale: i64,
}

impl Drct {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Drct {
            channels,
            features,
            groups,
            window,
            growth,
            mlp_hidden,
            image_size,
            upsample_features,
            scale,
            identity_residual,
            patch_norm,
            ..
        } = architecture
        else {
            unreachable!("a DRCT architecture");
        };
        let shape = SwinShape {
            channels,
            features,
            window,
            mlp_hidden,
            upsampler: SwinUpsampler::PixelShuffle,
            upsample_features,
            scale,
            three_conv: false,
        };
        let embed_norm = patch_norm
            .then(|| LayerNorm::load(&vp.pp("patch_embed").pp("norm"), features, LAYER_NORM_EPS))
            .transpose()?;
        let after_body = (!identity_residual)
            .then(|| ResidualConv::load(&vp.pp("conv_after_body"), features, false))
            .transpose()?;
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            embed_norm,
            groups: (0..groups)
                .map(|g| DenseGroup::load(&vp.pp("layers").pp(g), features, growth, window))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body,
            tail: Tail::load(vp, &shape)?,
            mean: image_mean(channels, vp),
            window,
            shift: shift_for(image_size, window),
            scale,
        })
    }

    /// The body on the first convolution's [B, C, H, W] output.
    fn features(&self, first: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let windows = Windows::of(first, self.window, self.shift);
        through_groups(
            embed(first),
            self.embed_norm.as_ref(),
            (&self.groups, between),
            |group, x, between| group.forward(x, &windows, between),
            &self.norm,
            &windows,
        )
    }

    /// The network on an image whose sides the window divides.
    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let input = image - &self.mean;
        let first = self.first.forward(&input);
        let features = self.features(&first, between)?;
        let body = match &self.after_body {
            Some(conv) => conv.forward(&features),
            None => features,
        } + &first;
        Ok(self.tail.forward(&body, &input, self.scale) + &self.mean)
    }
}
