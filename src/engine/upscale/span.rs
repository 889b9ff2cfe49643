//! SPAN (Swift Parameter-free Attention Network), as spandrel runs it
//! (`SPAN/__arch/span.py`, in eval mode): every Conv3XC's 1×1–3×3–1×1 chain and its 1×1
//! skip folded into one 3×3 convolution (`Conv3XC.update_params`, which spandrel
//! recomputes at every call: a file's stored `eval_conv` tensors are not read), six
//! attention blocks, a concatenation, a pixel shuffle.

use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::upscale::layout::Architecture;
use crate::engine::weights::VarPath;

/// The mean SPAN subtracts before scaling by 255 (it cannot be read from a file).
const RGB_MEAN: [f32; 3] = [0.4488, 0.4371, 0.4040];
/// SPAN's `img_range`.
const IMAGE_RANGE: f64 = 255.0;

/// A Conv3XC folded into one 3×3 convolution with padding 1.
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
}

impl FoldedConv {
    /// `Conv3XC(c_in, c_out, gain1=2)` from `vp`: `sk` and `conv.0`–`conv.2`, folded in
    /// float32 on the CPU as `update_params` folds them, then placed as the weights are.
    fn load(vp: &VarPath, input: i64, output: i64) -> Result<Self> {
        let (device, kind) = (vp.device(), vp.kind());
        let read = |name: &str, shape: &[i64]| -> Result<Tensor> {
            Ok(vp
                .get(name, shape)?
                .to_kind(Kind::Float)
                .to_device(Device::Cpu))
        };
        let (gained_in, gained_out) = (2 * input, 2 * output);
        let w1 = read("conv.0.weight", &[gained_in, input, 1, 1])?;
        let b1 = read("conv.0.bias", &[gained_in])?;
        let w2 = read("conv.1.weight", &[gained_out, gained_in, 3, 3])?;
        let b2 = read("conv.1.bias", &[gained_out])?;
        let w3 = read("conv.2.weight", &[output, gained_out, 1, 1])?;
        let b3 = read("conv.2.bias", &[output])?;
        let sk_w = read("sk.weight", &[output, input, 1, 1])?;
        let sk_b = read("sk.bias", &[output])?;
        let compose = |first: &Tensor, second: &Tensor, padding: i64| {
            first
                .flip([2, 3])
                .permute([1, 0, 2, 3])
                .conv2d::<&Tensor>(second, None, [1, 1], [padding, padding], [1, 1], 1)
                .flip([2, 3])
                .permute([1, 0, 2, 3])
        };
        let folded_bias = |w: &Tensor, b: &Tensor| {
            (w * b.reshape([1, -1, 1, 1])).sum_dim_intlist([1i64, 2, 3].as_slice(), false, None)
        };
        let w = compose(&w1, &w2, 2);
        let b = folded_bias(&w2, &b1) + b2;
        let weight = compose(&w, &w3, 0) + sk_w.constant_pad_nd([1, 1, 1, 1]);
        let bias = folded_bias(&w3, &b) + b3 + sk_b;
        let place = |t: Tensor| t.contiguous().to_device(device).to_kind(kind);
        Ok(Self {
            weight: place(weight),
            bias: place(bias),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, Some(&self.bias), [1, 1], [1, 1], [1, 1], 1)
    }
}

/// Swift parameter-free attention block (SPAB).
struct AttentionBlock {
    convs: [FoldedConv; 3],
}

impl AttentionBlock {
    fn load(vp: &VarPath, features: i64) -> Result<Self> {
        let conv = |name: &str| FoldedConv::load(&vp.pp(name), features, features);
        Ok(Self {
            convs: [conv("c1_r")?, conv("c2_r")?, conv("c3_r")?],
        })
    }

    /// The block's output and its first convolution's after the SiLU (SPAN
    /// concatenates the last block's: the reference's in-place SiLU has rewritten it).
    /// Activations are written in place (a tile's feature maps are its largest
    /// tensors).
    fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let mut first = self.convs[0].forward(x);
        let _ = first.silu_();
        let mut second = self.convs[1].forward(&first);
        let _ = second.silu_();
        let mut third = self.convs[2].forward(&second);
        drop(second);
        let mut attention = third.sigmoid();
        let _ = attention.g_sub_scalar_(0.5);
        let _ = third.g_add_(x);
        let _ = third.g_mul_(&attention);
        (third, first)
    }
}

/// SPAN.
pub struct Span {
    normalise: Option<Tensor>,
    conv_1: FoldedConv,
    blocks: Vec<AttentionBlock>,
    conv_cat: (Tensor, Tensor),
    conv_2: FoldedConv,
    upsampler: (Tensor, Tensor),
    scale: i64,
}

impl Span {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Span {
            channels,
            features,
            scale,
            normalised,
        } = architecture
        else {
            unreachable!("a SPAN architecture");
        };
        let blocks = (1..=6)
            .map(|b| AttentionBlock::load(&vp.pp(format!("block_{b}")), features))
            .collect::<Result<_>>()?;
        let cat = vp.pp("conv_cat");
        let up = vp.pp("upsampler").pp(0);
        let shuffled = channels * scale * scale;
        let mean = Tensor::from_slice(&RGB_MEAN).view([1, 3, 1, 1]);
        Ok(Self {
            normalise: normalised.then(|| mean.to_device(vp.device()).to_kind(vp.kind())),
            conv_1: FoldedConv::load(&vp.pp("conv_1"), channels, features)?,
            blocks,
            conv_cat: (
                cat.get("weight", &[features, 4 * features, 1, 1])?,
                cat.get("bias", &[features])?,
            ),
            conv_2: FoldedConv::load(&vp.pp("conv_2"), features, features)?,
            upsampler: (
                up.get("weight", &[shuffled, features, 3, 3])?,
                up.get("bias", &[shuffled])?,
            ),
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let x = match &self.normalise {
            Some(mean) => (image - mean) * IMAGE_RANGE,
            None => image.shallow_clone(),
        };
        let features = self.conv_1.forward(&x);
        let mut y = features.shallow_clone();
        let mut first_block = None;
        let mut last_first_conv = None;
        for (i, block) in self.blocks.iter().enumerate() {
            between()?;
            let (out, first) = block.forward(&y);
            if i == 0 {
                first_block = Some(out.shallow_clone());
            }
            last_first_conv = Some(first);
            y = out;
        }
        let y = self.conv_2.forward(&y);
        let (Some(b1), Some(b5_2)) = (first_block, last_first_conv) else {
            unreachable!("SPAN has six blocks");
        };
        let joined = Tensor::cat(&[&features, &y, &b1, &b5_2], 1);
        let (w, b) = &self.conv_cat;
        let out = joined.conv2d(w, Some(b), [1, 1], [0, 0], [1, 1], 1);
        let (w, b) = &self.upsampler;
        Ok(out
            .conv2d(w, Some(b), [1, 1], [1, 1], [1, 1], 1)
            .pixel_shuffle(self.scale))
    }
}
