//! ATD (Adaptive Token Dictionary), as spandrel runs it (`ATD/__arch/atd_arch.py`, in
//! eval mode): the image mirrored to whole windows, a first convolution, residual groups
//! of ATD layers each closed by a convolution, a layer norm, then SwinIR's upsamplers.
//! Every layer adds three attentions over one q/k/v projection: within shifted windows
//! (SwinIR's), across the group's token dictionary (cosine similarity of reduced queries
//! and keys), and within categories (pixels sorted by their most similar dictionary
//! token, attending in groups of the category size); then a convolutional feed-forward,
//! and the dictionary refined from the pixels it attracted.

use tch::Tensor;

use crate::engine::checkpoint::Between;
use crate::engine::error::Result;
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::upscale::layout::{atd::UPSAMPLE_FEATURES, Architecture, SwinUpsampler};
use crate::engine::upscale::same_conv::SameConv;
use crate::engine::upscale::swin::{
    attend, embed, gather_bias, partition, relative_position_index, reverse, through_groups,
    unembed, Windows, LAYER_NORM_EPS,
};
use crate::engine::upscale::swinir::{image_mean, ResidualConv, SwinShape, Tail};
use crate::engine::upscale::unit_norm::unit_norm;
use crate::engine::weights::VarPath;

/// `nn.InstanceNorm1d`'s epsilon (the dictionary refinement's norm).
const INSTANCE_NORM_EPS: f64 = 1e-5;
/// The category attention's largest logit scale (`log(1 / 0.01)`, clamped in float32).
const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// The attention over the group's token dictionary (`ATD_CA`).
struct DictionaryAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// `1 + clamp(scale, 0, 1) · ln(tokens)` per token, computed at load.
    token_scale: Tensor,
}

impl DictionaryAttention {
    fn load(vp: &VarPath, dim: i64, [tokens, reduced]: [i64; 2], bias: bool) -> Result<Self> {
        let scale = vp.get("scale", &[tokens])?;
        Ok(Self {
            query: Linear::load(&vp.pp("wq"), dim, reduced, bias)?,
            key: Linear::load(&vp.pp("wk"), dim, reduced, bias)?,
            value: Linear::load(&vp.pp("wv"), dim, dim, bias)?,
            token_scale: scale.clamp(0.0, 1.0) * (tokens as f64).ln() + 1.0,
        })
    }

    /// The attended values and the [B, N, tokens] attention of the normed [B, N, C]
    /// tokens over the [B, tokens, C] dictionary.
    fn forward(&self, normed: &Tensor, dictionary: &Tensor) -> (Tensor, Tensor) {
        let q = unit_norm(&self.query.forward(normed));
        let k = unit_norm(&self.key.forward(dictionary));
        let scores = q.matmul(&k.transpose(1, 2)) * &self.token_scale;
        let attention = scores.softmax(-1, scores.kind());
        (attention.matmul(&self.value.forward(dictionary)), attention)
    }
}

/// The attention within categories (`AC_MSA`): each pixel's category is its most
/// similar dictionary token; pixels sorted by category attend in groups of `size`, the
/// last group filled with the sorted pixels before it, mirrored.
struct CategoryAttention {
    proj: Linear,
    /// `exp(min(logit_scale, log 100))`, read at load.
    logit_scale: f64,
    heads: i64,
    size: i64,
}

impl CategoryAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, size: i64, bias: bool) -> Result<Self> {
        let logit_scale = vp.get("logit_scale", &[1, 1])?.double_value(&[0, 0]) as f32;
        Ok(Self {
            proj: Linear::load(&vp.pp("proj"), dim, dim, bias)?,
            logit_scale: f64::from(logit_scale.min(MAX_LOGIT_SCALE).exp()),
            heads,
            size,
        })
    }

    /// On the [B, N, 3C] q/k/v and the [B, N, tokens] dictionary attention.
    fn forward(&self, qkv: &Tensor, similarity: &Tensor) -> Tensor {
        let size = qkv.size();
        let (b, n, c3) = (size[0], size[1], size[2]);
        let c = c3 / 3;
        let group = n.min(self.size);
        let groups = (n + group - 1) / group;
        let fill = groups * group - n;
        // torch's sort, unstable as the reference asks: the same order of equal
        // categories, hence the same groups.
        let (_, order) = similarity.argmax(-1, false).sort(-1, false);
        let order = order.unsqueeze(-1).expand([b, n, c3], false);
        let sorted = qkv.gather(1, &order, false);
        let sorted = match fill {
            0 => sorted,
            _ => Tensor::cat(&[&sorted, &sorted.narrow(1, n - fill, fill).flip([1])], 1),
        };
        let qkv = sorted
            .reshape([b, groups, group, 3, self.heads, c / self.heads])
            .permute([3, 0, 1, 4, 2, 5])
            .reshape([3, b * groups, self.heads, group, c / self.heads]);
        let attended = Tensor::scaled_dot_product_attention(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            None::<&Tensor>,
            0.0,
            false,
            self.logit_scale,
            false,
        );
        let y = attended
            .view([b, groups, self.heads, group, c / self.heads])
            .permute([0, 1, 3, 2, 4])
            .reshape([b, groups * group, c])
            .narrow(1, 0, n);
        let order = order.narrow(2, 0, c);
        self.proj
            .forward(&Tensor::zeros_like(&y).scatter(1, &order, &y))
    }
}

/// Shifted-window attention over the layer's q/k/v with a relative position bias.
struct WindowAttention {
    proj: Linear,
    /// The bias gathered from the table once: [heads, N, N].
    bias: Tensor,
    heads: i64,
}

impl WindowAttention {
    fn load(vp: &VarPath, dim: i64, heads: i64, window: i64) -> Result<Self> {
        let (pixels, side) = (window * window, 2 * window - 1);
        let table = vp.get("relative_position_bias_table", &[side * side, heads])?;
        let index = relative_position_index([window, window]);
        Ok(Self {
            proj: Linear::load(&vp.pp("proj"), dim, dim, true)?,
            bias: gather_bias(&table, &index, pixels, pixels),
            heads,
        })
    }

    /// On the [B, N, 3C] q/k/v of an image over `windows`, shifted where `shifted`.
    fn forward(&self, qkv: &Tensor, windows: &Windows, shifted: bool) -> Tensor {
        let size = qkv.size();
        let (b, c3) = (size[0], size[2]);
        let c = c3 / 3;
        let (h, w, window) = (windows.height, windows.width, windows.window);
        let shift = if shifted { windows.shift } else { 0 };
        let qkv = qkv.view([b, h, w, c3]);
        let qkv = match shift {
            0 => qkv,
            s => qkv.roll([-s, -s], [1, 2]),
        };
        let parts = partition(&qkv, [window; 2]).view([-1, window * window, c3]);
        let pixels = window * window;
        let qkv = parts
            .reshape([-1, pixels, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let mask = windows.mask.as_ref().filter(|_| shift > 0);
        let attended = attend(&qkv.get(0), &qkv.get(1), &qkv.get(2), &self.bias, mask);
        let y = self.proj.forward(&attended).view([-1, window, window, c]);
        let y = reverse(&y, [window; 2], h, w);
        let y = match shift {
            0 => y,
            s => y.roll([s, s], [1, 2]),
        };
        y.view([b, h * w, c])
    }
}

/// The convolutional feed-forward (`ConvFFN`): a linear layer and GELU, plus its
/// depthwise convolution through GELU, a linear layer back.
struct ConvFeedForward {
    fc1: Linear,
    depthwise: SameConv,
    fc2: Linear,
}

impl ConvFeedForward {
    fn load(vp: &VarPath, dim: i64, hidden: i64, kernel: i64) -> Result<Self> {
        let depthwise = vp.pp("dwconv").pp("depthwise_conv").pp(0);
        Ok(Self {
            fc1: Linear::load(&vp.pp("fc1"), dim, hidden, true)?,
            depthwise: SameConv::depthwise(&depthwise, hidden, kernel, true)?,
            fc2: Linear::load(&vp.pp("fc2"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, height: i64, width: i64) -> Tensor {
        let hidden = self.fc1.forward(x).gelu("none");
        let spatial = self.depthwise.forward(&unembed(&hidden, height, width));
        self.fc2.forward(&(&hidden + embed(&spatial.gelu("none"))))
    }
}

/// The dictionary's refinement after a layer (`norm3`, `sigma`; every layer of a group
/// but its last): each token keeps `sigmoid(sigma)` of itself and takes the rest from the
/// pixels, weighted by its similarity to them, instance-normed and softmaxed over them.
struct Refinement {
    norm_weight: Tensor,
    norm_bias: Tensor,
    /// `sigmoid(sigma)`, [tokens, 1].
    keep: Tensor,
}

impl Refinement {
    fn load(vp: &VarPath, tokens: i64) -> Result<Self> {
        Ok(Self {
            norm_weight: vp.get("norm3.weight", &[tokens])?,
            norm_bias: vp.get("norm3.bias", &[tokens])?,
            keep: vp.get("sigma", &[tokens, 1])?.sigmoid(),
        })
    }

    /// The refined [B, tokens, C] dictionary from the [B, N, tokens] similarity and the
    /// layer's [B, N, C] output.
    fn forward(&self, dictionary: &Tensor, similarity: &Tensor, x: &Tensor) -> Tensor {
        let normed = similarity.transpose(1, 2).instance_norm(
            Some(&self.norm_weight),
            Some(&self.norm_bias),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.0,
            INSTANCE_NORM_EPS,
            false,
        );
        let attracted = normed.softmax(-1, normed.kind()).matmul(x);
        dictionary * &self.keep + attracted * (1.0 - &self.keep)
    }
}

/// One ATD transformer layer.
struct Layer {
    norm1: LayerNorm,
    qkv: Linear,
    windows: WindowAttention,
    dictionary: DictionaryAttention,
    categories: CategoryAttention,
    norm2: LayerNorm,
    ffn: ConvFeedForward,
    refinement: Option<Refinement>,
    shifted: bool,
}

impl Layer {
    fn load(
        vp: &VarPath,
        shape: &AtdShape,
        heads: i64,
        [index, depth]: [usize; 2],
    ) -> Result<Self> {
        let dim = shape.features;
        let bias = shape.qkv_bias;
        Ok(Self {
            norm1: LayerNorm::load(&vp.pp("norm1"), dim, LAYER_NORM_EPS)?,
            qkv: Linear::load(&vp.pp("wqkv"), dim, 3 * dim, bias)?,
            windows: WindowAttention::load(&vp.pp("attn_win"), dim, heads, shape.window)?,
            dictionary: DictionaryAttention::load(
                &vp.pp("attn_atd"),
                dim,
                [shape.tokens, shape.reduced],
                bias,
            )?,
            categories: CategoryAttention::load(
                &vp.pp("attn_aca"),
                dim,
                heads,
                shape.category,
                bias,
            )?,
            norm2: LayerNorm::load(&vp.pp("norm2"), dim, LAYER_NORM_EPS)?,
            ffn: ConvFeedForward::load(&vp.pp("convffn"), dim, shape.mlp_hidden, shape.kernel)?,
            refinement: (index + 1 < depth)
                .then(|| Refinement::load(vp, shape.tokens))
                .transpose()?,
            shifted: index % 2 == 1,
        })
    }

    /// The layer on [B, N, C] tokens with the [B, tokens, C] dictionary: the tokens
    /// out and the dictionary the next layer takes.
    fn forward(&self, x: &Tensor, dictionary: &Tensor, windows: &Windows) -> (Tensor, Tensor) {
        let normed = self.norm1.forward(x);
        let qkv = self.qkv.forward(&normed);
        let (from_dictionary, similarity) = self.dictionary.forward(&normed, dictionary);
        let from_categories = self.categories.forward(&qkv, &similarity);
        let from_windows = self.windows.forward(&qkv, windows, self.shifted);
        let x = x + from_windows + from_dictionary + from_categories;
        let ffn = self
            .ffn
            .forward(&self.norm2.forward(&x), windows.height, windows.width);
        let x = x + ffn;
        let dictionary = match &self.refinement {
            Some(refinement) => refinement.forward(dictionary, &similarity, &x),
            None => dictionary.shallow_clone(),
        };
        (x, dictionary)
    }
}

/// A residual group (`ATDB`): its layers over the group's dictionary, closed by a
/// convolution.
struct Group {
    /// The token dictionary, [tokens, C].
    dictionary: Tensor,
    layers: Vec<Layer>,
    conv: ResidualConv,
}

impl Group {
    fn load(vp: &VarPath, shape: &AtdShape) -> Result<Self> {
        let group = vp.pp("residual_group");
        let layers_path = group.pp("layers");
        let depth = (0..)
            .take_while(|l| layers_path.pp(l).contains("norm1.weight"))
            .count();
        let heads = layers_path
            .pp(0)
            .pp("attn_win")
            .shape("relative_position_bias_table")
            .and_then(|s| s.get(1).copied())
            .unwrap_or(1);
        Ok(Self {
            dictionary: group.get("td", &[shape.tokens, shape.features])?,
            layers: (0..depth)
                .map(|l| Layer::load(&layers_path.pp(l), shape, heads, [l, depth]))
                .collect::<Result<_>>()?,
            conv: ResidualConv::load(&vp.pp("conv"), shape.features, shape.three_conv)?,
        })
    }

    fn forward(&self, x: &Tensor, windows: &Windows, between: &mut Between<'_>) -> Result<Tensor> {
        let size = self.dictionary.size();
        let batch = x.size()[0];
        let mut dictionary = self
            .dictionary
            .unsqueeze(0)
            .expand([batch, size[0], size[1]], false);
        let mut y = x.shallow_clone();
        for layer in &self.layers {
            between()?;
            (y, dictionary) = layer.forward(&y, &dictionary, windows);
        }
        Ok(self.conv.close_group(&y, x, windows.height, windows.width))
    }
}

/// The hyperparameters the layers are built from.
struct AtdShape {
    features: i64,
    window: i64,
    mlp_hidden: i64,
    tokens: i64,
    reduced: i64,
    kernel: i64,
    category: i64,
    three_conv: bool,
    qkv_bias: bool,
}

/// ATD.
pub struct Atd {
    first: Conv2d,
    embed_norm: Option<LayerNorm>,
    groups: Vec<Group>,
    norm: LayerNorm,
    after_body: ResidualConv,
    tail: Tail,
    /// The image mean subtracted and added back (none under `no_norm`).
    mean: Option<Tensor>,
    window: i64,
    scale: i64,
}

impl Atd {
    pub fn load(vp: &VarPath, architecture: Architecture) -> Result<Self> {
        let Architecture::Atd {
            channels,
            features,
            groups,
            window,
            mlp_hidden,
            tokens,
            reduced,
            kernel,
            category,
            upsampler,
            scale,
            three_conv,
            patch_norm,
            mean_shift,
            ..
        } = architecture
        else {
            unreachable!("an ATD architecture");
        };
        let first_layer = vp
            .pp("layers")
            .pp(0)
            .pp("residual_group")
            .pp("layers")
            .pp(0);
        let shape = AtdShape {
            features,
            window,
            mlp_hidden,
            tokens,
            reduced,
            kernel,
            category,
            three_conv,
            qkv_bias: first_layer.pp("wqkv").contains("bias"),
        };
        let upsample_features = match upsampler {
            SwinUpsampler::PixelShuffle | SwinUpsampler::NearestConv => UPSAMPLE_FEATURES,
            _ => 0,
        };
        let tail_shape = SwinShape {
            channels,
            features,
            window,
            mlp_hidden,
            upsampler,
            upsample_features,
            scale,
            three_conv,
        };
        let embed_norm = vp.pp("patch_embed").pp("norm");
        Ok(Self {
            first: Conv2d::load(&vp.pp("conv_first"), channels, features, 3, 1, 1)?,
            embed_norm: patch_norm
                .then(|| LayerNorm::load(&embed_norm, features, LAYER_NORM_EPS))
                .transpose()?,
            groups: (0..groups)
                .map(|g| Group::load(&vp.pp("layers").pp(g), &shape))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(&vp.pp("norm"), features, LAYER_NORM_EPS)?,
            after_body: ResidualConv::load(&vp.pp("conv_after_body"), features, three_conv)?,
            tail: Tail::load(vp, &tail_shape)?,
            mean: mean_shift.then(|| image_mean(channels, vp)),
            window,
            scale,
        })
    }

    pub fn forward(&self, image: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = image.size();
        let (height, width) = (size[2], size[3]);
        let padded = mirror_to_windows(image, self.window);
        let input = match &self.mean {
            Some(mean) => padded - mean,
            None => padded,
        };
        let first = self.first.forward(&input);
        let windows = Windows::of(&first, self.window, self.window / 2);
        let features = through_groups(
            embed(&first),
            self.embed_norm.as_ref(),
            (&self.groups, between),
            |group, x, between| group.forward(x, &windows, between),
            &self.norm,
            &windows,
        )?;
        let body = self.after_body.forward(&features) + &first;
        let output = self.tail.forward(&body, &input, self.scale);
        let output = match &self.mean {
            Some(mean) => output + mean,
            None => output,
        };
        Ok(output
            .narrow(2, 0, height * self.scale)
            .narrow(3, 0, width * self.scale))
    }
}

/// The reference's padding: each side continued by its mirror image (the edge pixel
/// repeated, `cat([x, flip(x)])`) to whole windows; the mirror repeats where a side is
/// shorter than its padding, which the reference cannot pad.
fn mirror_to_windows(image: &Tensor, window: i64) -> Tensor {
    let size = image.size();
    let mirrored = |x: Tensor, dim: i64, length: i64| {
        let target = (length + window - 1) / window * window;
        if target == length {
            return x;
        }
        let index: Vec<i64> = (0..target)
            .map(|i| match i % (2 * length) {
                m if m < length => m,
                m => 2 * length - 1 - m,
            })
            .collect();
        let index = Tensor::from_slice(&index).to_device(x.device());
        x.index_select(dim, &index)
    };
    let rows = mirrored(image.shallow_clone(), 2, size[2]);
    mirrored(rows, 3, size[3])
}
