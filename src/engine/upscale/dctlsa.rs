//! DCTLSA, as spandrel runs it (`DCTLSA/__arch/dctlsa.py`, in eval mode): a first
//! convolution, six modules densely joined (each module's input a 1×1 convolution and
//! LeakyReLU of the first features and every module's output so far), a 1×1 convolution
//! of all six outputs, a convolution plus the first features, a pixel shuffle. A module
//! is two local self-attention layers over the features reflected to whole 16-pixel
//! windows: a layer norm, then two blocks (the second on windows rolled by half a window,
//! unmasked), each a convolutional local module added to its input, linear attention
//! within windows (keys softmaxed over the window's pixels) on top, and an MLP.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::activation::leaky_in_place;
use crate::engine::upscale::layout::dctlsa::{HEADS, MODULES};
use crate::engine::upscale::layout::Architecture;
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{
    embed, pad_to_windows, partition, reverse, unembed, LAYER_NORM_EPS,
};
use crate::engine::weights::VarPath;

/// The attention window's side (fixed in the reference).
const WINDOW: i64 = 16;
/// `nn.BatchNorm2d`'s epsilon.
const BATCH_NORM_EPS: f64 = 1e-5;
/// The dense joins' LeakyReLU slope.
const SLOPE: f64 = 0.05;

/// A 1×1 convolution without bias after an inference batch norm, the norm folded into
/// its weights and a bias at load.
fn prenormed_pointwise(conv: &VarPath, norm: &VarPath, width: i64) -> Result<SameConv> {
    let weight = conv.get("weight", &[width, width, 1, 1])?;
    let gamma = norm.get("weight", &[width])?;
    let beta = norm.get("bias", &[width])?;
    let mean = norm.get("running_mean", &[width])?;
    let var = norm.get("running_var", &[width])?;
    let scale = gamma / (var + BATCH_NORM_EPS).sqrt();
    let shift = beta - &mean * &scale;
    let matrix = weight.view([width, width]);
    let bias = matrix.matmul(&shift);
    let weight = (matrix * scale.view([1, width])).view([width, width, 1, 1]);
    Ok(SameConv::from_parts(weight, Some(bias), 1))
}

/// The local module: batch norm, 1×1, depthwise 3×3, batch norm, 1×1 (no biases).
struct LocalModule {
    pointwise0: SameConv,
    depthwise: SameConv,
    pointwise1: SameConv,
}

impl LocalModule {
    fn load(vp: &VarPath, width: i64) -> Result<Self> {
        Ok(Self {
            pointwise0: prenormed_pointwise(
                &vp.pp("pointwise_conv_0"),
                &vp.pp("pointwise_prenorm_0"),
                width,
            )?,
            depthwise: SameConv::depthwise(&vp.pp("depthwise_conv"), width, 3, false)?,
            pointwise1: prenormed_pointwise(
                &vp.pp("pointwise_conv_1"),
                &vp.pp("pointwise_prenorm_1"),
                width,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.depthwise.forward(&self.pointwise0.forward(x));
        self.pointwise1.forward(&y)
    }
}

/// One block (`SwinTransformerBlock`): the local module plus its input, linear window
/// attention on top, an MLP; no layer norms.
struct Block {
    local: LocalModule,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    shifted: bool,
}

impl Block {
    fn load(vp: &VarPath, width: i64, shifted: bool) -> Result<Self> {
        let attn = vp.pp("attn");
        let hidden = 2 * width;
        Ok(Self {
            local: LocalModule::load(&attn.pp("local"), width)?,
            qkv: Linear::load(&attn.pp("qkv"), width, 3 * width, true)?,
            proj: Linear::load(&attn.pp("proj"), width, width, true)?,
            fc1: Linear::load(&vp.pp("mlp").pp("fc1"), width, hidden, true)?,
            fc2: Linear::load(&vp.pp("mlp").pp("fc2"), hidden, width, true)?,
            shifted,
        })
    }

    /// On [B, H·W, C] tokens of an `h`×`w` image (whole windows).
    fn forward(&self, x: &Tensor, h: i64, w: i64) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[2]);
        let shift = if self.shifted { WINDOW / 2 } else { 0 };
        let spatial = x.view([b, h, w, c]);
        let spatial = match shift {
            0 => spatial,
            s => spatial.roll([-s, -s], [1, 2]),
        };
        let maps = spatial.permute([0, 3, 1, 2]);
        let local = (self.local.forward(&maps) + &maps).permute([0, 2, 3, 1]);
        let pixels = WINDOW * WINDOW;
        let d = c / HEADS;
        let qkv = partition(&self.qkv.forward(&local), [WINDOW; 2])
            .reshape([-1, pixels, 3, HEADS, d])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let context = k.softmax(-2, k.kind()).transpose(-2, -1).matmul(&v);
        let attended = (q * (d as f64).powf(-0.5))
            .matmul(&context)
            .transpose(1, 2)
            .reshape([-1, pixels, c]);
        let windows = self.proj.forward(&attended).view([-1, WINDOW, WINDOW, c]);
        let y = reverse(&windows, [WINDOW; 2], h, w) + local;
        let y = match shift {
            0 => y,
            s => y.roll([s, s], [1, 2]),
        };
        let x = y.view([b, h * w, c]);
        let mlp = self.fc2.forward(&self.fc1.forward(&x).gelu("none"));
        x + mlp
    }
}

/// A local self-attention layer (`SwinT`): the features reflected to whole windows, a
/// layer norm, two blocks, cropped back.
struct Layer {
    norm: LayerNorm,
    blocks: [Block; 2],
}

impl Layer {
    fn load(vp: &VarPath, width: i64) -> Result<Self> {
        let layer = vp.pp("transformer_body").pp(0);
        let blocks = layer.pp("blocks");
        Ok(Self {
            norm: LayerNorm::load(&layer.pp("patch_embed").pp("norm"), width, LAYER_NORM_EPS)?,
            blocks: [
                Block::load(&blocks.pp(0), width, false)?,
                Block::load(&blocks.pp(1), width, true)?,
            ],
        })
    }

    /// On [B, C, H, W] features.
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let padded = pad_to_windows(x, WINDOW);
        let (h, w) = (padded.size()[2], padded.size()[3]);
        let tokens = self.norm.forward(&embed(&padded));
        let tokens = self
            .blocks
            .iter()
            .fold(tokens, |t, block| block.forward(&t, h, w));
        unembed(&tokens, h, w)
            .narrow(2, 0, size[2])
            .narrow(3, 0, size[3])
    }
}

/// A 1×1 convolution and LeakyReLU joining `inputs` widths into one.
fn join(vp: &VarPath, inputs: i64, width: i64) -> Result<Conv2d> {
    Conv2d::load(&vp.pp(0), inputs * width, width, 1, 1, 0)
}

/// DCTLSA.
pub struct Dctlsa {
    first: Conv2d,
    /// Each module's two layers (`B1` to `B6`).
    modules: Vec<[Layer; 2]>,
    /// The joins before modules 2 to 6 (`c1` to `c5`), of 2 to 6 widths.
    joins: Vec<Conv2d>,
    /// The join of the six modules' outputs (`c`).
    last_join: Conv2d,
    lr_conv: Conv2d,
    upsampler: Conv2d,
    scale: i64,
}

impl Dctlsa {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Dctlsa {
            channels,
            features,
            scale,
        } = architecture
        else {
            unreachable!("a DCTLSA architecture");
        };
        let modules = (1..=MODULES)
            .map(|m| {
                let body = vp.pp(format!("B{m}")).pp("body");
                Ok([
                    Layer::load(&body.pp(0), features)?,
                    Layer::load(&body.pp(1), features)?,
                ])
            })
            .collect::<Result<_>>()?;
        let joins = (1..MODULES)
            .map(|j| join(&vp.pp(format!("c{j}")), j + 1, features))
            .collect::<Result<_>>()?;
        Ok(Self {
            first: Conv2d::load(&vp.pp("fea_conv"), channels, features, 3, 1, 1)?,
            modules,
            joins,
            last_join: join(&vp.pp("c"), MODULES, features)?,
            lr_conv: Conv2d::load(&vp.pp("LR_conv"), features, features, 3, 1, 1)?,
            upsampler: Conv2d::load(
                &vp.pp("upsampler").pp(0),
                features,
                channels * scale * scale,
                3,
                1,
                1,
            )?,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let first = self.first.forward(image);
        let mut dense = vec![first.shallow_clone()];
        let mut outputs = Vec::with_capacity(self.modules.len());
        let mut x = first.shallow_clone();
        for (m, [a, b]) in self.modules.iter().enumerate() {
            between()?;
            let out = b.forward(&a.forward(&x));
            if let Some(join) = self.joins.get(m) {
                dense.push(out.shallow_clone());
                x = leaky_in_place(join.forward(&Tensor::cat(&dense, 1)), SLOPE);
            }
            outputs.push(out);
        }
        let joined = leaky_in_place(self.last_join.forward(&Tensor::cat(&outputs, 1)), SLOPE);
        let lr = self.lr_conv.forward(&joined) + first;
        Ok(self.upsampler.forward(&lr).pixel_shuffle(self.scale))
    }
}
