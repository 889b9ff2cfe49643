//! controlnet_aux's M-LSD line-segment detector (`MobileV2_MLSD_Large`, the network of
//! its `mlsd_large_512_fp32.pth`): a MobileNetV2 backbone of five stages (ReLU6, the
//! stride-2 convolutions padded on the right and bottom as TensorFlow does) read at the
//! end of each stage, a decoder that joins each level to the one below (1×1 projections,
//! ×2 bilinear with aligned corners, residual 3×3 convolutions) and a dilated head. Its
//! output at half the image's resolution holds, from channel 7, a centre score and the
//! two end displacements of a segment per pixel, which `mlsd_lines` decodes and draws
//! as `MLSDdetector` does. Widths, depths and expansions are read from the weights; batch
//! norms run as PyTorch runs them (not folded), so the decoded segments match its own.

use std::path::Path;

use image::{GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::preprocess::mlsd_lines::{line_map, LineThresholds, CANDIDATES};
use crate::engine::weights::{numbered_children, read_shapes, Shapes, VarPath, Weights};

/// BatchNorm2d's epsilon.
const BN_EPS: f64 = 1e-5;
/// The backbone's stages' strides (the last keeps the resolution of the one before).
const STAGE_STRIDES: [i64; 5] = [1, 2, 2, 2, 1];
/// The first output channel the detector reads (`x[:, 7:]`): the centre score, then the
/// displacements of the start (x, y) and end (x, y).
const FIRST_OUTPUT: i64 = 7;
/// The side every image side must be a multiple of: four halvings meet their ×2 again.
pub const SIDE_MULTIPLE: u32 = 16;

/// An inference batch norm.
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    var: Tensor,
}

impl BatchNorm {
    fn load(vp: &VarPath, channels: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &[channels])?,
            bias: vp.get("bias", &[channels])?,
            mean: vp.get("running_mean", &[channels])?,
            var: vp.get("running_var", &[channels])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.mean),
            Some(&self.var),
            false,
            0.1,
            BN_EPS,
            true,
        )
    }
}

/// What follows a convolution's batch norm.
#[derive(Clone, Copy)]
enum Activation {
    Relu6,
    Relu,
    Linear,
}

/// A convolution, its batch norm and activation.
struct ConvNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    norm: BatchNorm,
    stride: i64,
    dilation: i64,
    groups: i64,
    activation: Activation,
}

impl ConvNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kernel = self.weight.size()[2];
        // The backbone's stride-2 convolutions pad one pixel right and bottom, not around.
        let (x, padding) = if self.stride == 2 {
            (x.constant_pad_nd([0, 1, 0, 1]), 0)
        } else {
            (x.shallow_clone(), (kernel - 1) / 2 * self.dilation)
        };
        let y = x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 2],
            [padding; 2],
            [self.dilation; 2],
            self.groups,
        );
        let mut y = self.norm.forward(&y);
        match self.activation {
            Activation::Relu6 => y.relu6_(),
            Activation::Relu => y.relu_(),
            Activation::Linear => y,
        }
    }
}

/// The file's tensor shapes and its weights, read together.
struct Loader<'a> {
    path: &'a Path,
    shapes: &'a Shapes,
    vp: VarPath<'a>,
}

impl Loader<'_> {
    fn shape(&self, key: &str) -> Result<Vec<i64>> {
        self.shapes
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, shape)| shape.clone())
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.path.to_path_buf(),
                name: key.to_string(),
            })
    }

    /// The output channels of the convolution at `conv`.
    fn width(&self, conv: &str) -> Result<i64> {
        Ok(self.shape(&format!("{conv}.weight"))?[0])
    }

    /// The convolution at `conv` taking `input` channels (`input / groups` a group) with
    /// a square `kernel`, its batch norm at `norm`.
    fn conv_norm(&self, conv: &str, norm: &str, layer: Layer) -> Result<ConvNorm> {
        let out = self.width(conv)?;
        let per_group = layer.input / layer.groups;
        let shape = [out, per_group, layer.kernel, layer.kernel];
        Ok(ConvNorm {
            weight: self.vp.get(&format!("{conv}.weight"), &shape)?,
            bias: if layer.bias {
                Some(self.vp.get(&format!("{conv}.bias"), &[out])?)
            } else {
                None
            },
            norm: BatchNorm::load(&self.vp.pp(norm), out)?,
            stride: layer.stride,
            dilation: layer.dilation,
            groups: layer.groups,
            activation: layer.activation,
        })
    }
}

/// A convolution's geometry as the network builds it.
#[derive(Clone, Copy)]
struct Layer {
    input: i64,
    kernel: i64,
    stride: i64,
    dilation: i64,
    groups: i64,
    bias: bool,
    activation: Activation,
}

impl Layer {
    /// A 1×1 or 3×3 convolution of stride 1 without bias.
    fn plain(input: i64, kernel: i64, activation: Activation) -> Self {
        Self {
            input,
            kernel,
            stride: 1,
            dilation: 1,
            groups: 1,
            bias: false,
            activation,
        }
    }

    /// The decoder's convolutions, with biases.
    fn biased(input: i64, kernel: i64, activation: Activation) -> Self {
        Self {
            bias: true,
            ..Self::plain(input, kernel, activation)
        }
    }
}

/// One MobileNetV2 inverted residual block.
struct InvertedResidual {
    expand: Option<ConvNorm>,
    depthwise: ConvNorm,
    project: ConvNorm,
    residual: bool,
}

impl InvertedResidual {
    /// The block at `prefix` (`backbone.features.{i}.conv`) taking `input` channels, with
    /// `stride` for its depthwise convolution.
    fn load(loader: &Loader, prefix: &str, input: i64, stride: i64) -> Result<Self> {
        let first = loader.shape(&format!("{prefix}.0.0.weight"))?;
        // Without expansion the first convolution is the depthwise one.
        let expands = first.get(1) != Some(&1);
        let (expand, dw) = if expands {
            let layer = Layer::plain(input, 1, Activation::Relu6);
            let conv =
                loader.conv_norm(&format!("{prefix}.0.0"), &format!("{prefix}.0.1"), layer)?;
            (Some(conv), 1)
        } else {
            (None, 0)
        };
        let hidden = expand.as_ref().map_or(input, |e| e.weight.size()[0]);
        let layer = Layer {
            stride,
            groups: hidden,
            ..Layer::plain(hidden, 3, Activation::Relu6)
        };
        let depthwise = loader.conv_norm(
            &format!("{prefix}.{dw}.0"),
            &format!("{prefix}.{dw}.1"),
            layer,
        )?;
        let layer = Layer::plain(hidden, 1, Activation::Linear);
        let project = loader.conv_norm(
            &format!("{prefix}.{}", dw + 1),
            &format!("{prefix}.{}", dw + 2),
            layer,
        )?;
        let output = project.weight.size()[0];
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: stride == 1 && input == output,
        })
    }

    fn output_channels(&self) -> i64 {
        self.project.weight.size()[0]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = match &self.expand {
            Some(expand) => expand.forward(x),
            None => x.shallow_clone(),
        };
        let h = self.project.forward(&self.depthwise.forward(&h));
        if self.residual {
            x + h
        } else {
            h
        }
    }
}

/// The backbone: the stem, then the blocks, each stage's last output kept.
struct Backbone {
    stem: ConvNorm,
    blocks: Vec<InvertedResidual>,
    /// The index of each stage's last block.
    taps: Vec<usize>,
}

impl Backbone {
    /// A stage starts where a block's width differs from the one before; there must be
    /// five, as the decoder joins five levels.
    fn load(loader: &Loader, names: &[&str]) -> Result<Self> {
        let stem_layer = Layer {
            stride: 2,
            ..Layer::plain(4, 3, Activation::Relu6)
        };
        let stem =
            loader.conv_norm("backbone.features.0.0", "backbone.features.0.1", stem_layer)?;
        let count = numbered_children(names.iter().copied(), "backbone.features.");
        let (mut blocks, mut taps) = (Vec::new(), Vec::new());
        let mut input = stem.weight.size()[0];
        for i in 1..count {
            let prefix = format!("backbone.features.{i}.conv");
            let width = loader.width(&format!("{prefix}.{}", last_conv(names, &prefix)))?;
            let new_stage = blocks.is_empty() || width != input;
            if new_stage {
                if !blocks.is_empty() {
                    taps.push(blocks.len() - 1);
                }
                if taps.len() >= STAGE_STRIDES.len() {
                    break;
                }
            }
            let stride = if new_stage {
                STAGE_STRIDES[taps.len()]
            } else {
                1
            };
            let block = InvertedResidual::load(loader, &prefix, input, stride)?;
            input = block.output_channels();
            blocks.push(block);
        }
        taps.push(blocks.len().saturating_sub(1));
        if taps.len() != STAGE_STRIDES.len() || blocks.len() + 1 != count as usize {
            return Err(EngineError::WeightFile {
                path: loader.path.to_path_buf(),
                message: format!(
                    "an M-LSD backbone has {} stages of distinct widths, this one {} blocks in {} stages",
                    STAGE_STRIDES.len(),
                    count - 1,
                    taps.len()
                ),
            });
        }
        Ok(Self { stem, blocks, taps })
    }

    /// Each stage's output, shallowest first; `between` asked before each block.
    fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Vec<Tensor>> {
        let mut h = self.stem.forward(x);
        let mut levels = Vec::with_capacity(self.taps.len());
        for (i, block) in self.blocks.iter().enumerate() {
            between()?;
            h = block.forward(&h);
            if self.taps.contains(&i) {
                levels.push(h.shallow_clone());
            }
        }
        Ok(levels)
    }

    fn widths(&self) -> Vec<i64> {
        self.taps
            .iter()
            .map(|&i| self.blocks[i].output_channels())
            .collect()
    }
}

/// The index of the last convolution in a block's `conv` Sequential (the projection;
/// the batch norm after it is the last entry).
fn last_conv(names: &[&str], prefix: &str) -> i64 {
    numbered_children(names.iter().copied(), &format!("{prefix}.")) - 2
}

/// A decoder join (`BlockTypeA`): the shallower level and the deeper result, each
/// projected by a 1×1 convolution, side by side; the deeper one doubled in size (with
/// aligned corners) at every join but the first, where both are at 1/16.
struct Join {
    shallow: ConvNorm,
    deep: ConvNorm,
    upscale: bool,
}

impl Join {
    fn forward(&self, shallow: &Tensor, deep: &Tensor) -> Tensor {
        let mut deep = self.deep.forward(deep);
        let shallow = self.shallow.forward(shallow);
        if self.upscale {
            let size = deep.size();
            deep = deep.upsample_bilinear2d([size[2] * 2, size[3] * 2], true, Some(2.0), Some(2.0));
        }
        Tensor::cat(&[shallow, deep], 1)
    }

    fn width(&self) -> i64 {
        self.shallow.weight.size()[0] + self.deep.weight.size()[0]
    }
}

/// A decoder refinement (`BlockTypeB`): a residual 3×3 convolution, then one to its
/// output width.
struct Refine {
    residual: ConvNorm,
    out: ConvNorm,
}

impl Refine {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.residual.forward(x) + x;
        self.out.forward(&h)
    }
}

/// The head (`BlockTypeC`): a 3×3 convolution dilated by 5, a 3×3 one, then a 1×1
/// projection to the outputs.
struct Head {
    dilated: ConvNorm,
    conv: ConvNorm,
    projection: (Tensor, Tensor),
}

/// The M-LSD network.
pub struct Mlsd {
    backbone: Backbone,
    decoder: Vec<(Join, Refine)>,
    head: Head,
    device: Device,
    kind: Kind,
}

/// A file whose convolution at `conv` is not `want` wide where a residual needs it.
fn check_width(loader: &Loader, conv: &ConvNorm, name: &str, want: i64) -> Result<()> {
    let got = conv.weight.size()[0];
    if got == want {
        return Ok(());
    }
    Err(EngineError::ShapeMismatch {
        path: loader.path.to_path_buf(),
        name: format!("{name}.weight"),
        expected: vec![want],
        actual: vec![got],
    })
}

impl Mlsd {
    /// Loads the network from its state dict at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let names: Vec<&str> = shapes.iter().map(|(name, _)| name.as_str()).collect();
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let loader = Loader {
            path,
            shapes: &shapes,
            vp: weights.root(),
        };
        let backbone = Backbone::load(&loader, &names)?;
        let widths = backbone.widths();
        let mut deeper = widths[4];
        let mut decoder = Vec::with_capacity(4);
        for k in 0..4 {
            let (a, b) = (15 + 2 * k, 16 + 2 * k);
            let conv = |block: usize, conv: usize, layer: Layer| {
                let at = format!("block{block}.conv{conv}");
                loader.conv_norm(&format!("{at}.0"), &format!("{at}.1"), layer)
            };
            let join = Join {
                deep: conv(a, 1, Layer::biased(deeper, 1, Activation::Relu))?,
                shallow: conv(a, 2, Layer::biased(widths[3 - k], 1, Activation::Relu))?,
                upscale: k > 0,
            };
            let joined = join.width();
            let residual = conv(b, 1, Layer::biased(joined, 3, Activation::Relu))?;
            check_width(&loader, &residual, &format!("block{b}.conv1.0"), joined)?;
            let out = conv(b, 2, Layer::biased(joined, 3, Activation::Relu))?;
            deeper = out.weight.size()[0];
            decoder.push((join, Refine { residual, out }));
        }
        let head = Self::load_head(&loader, deeper)?;
        let network = Self {
            backbone,
            decoder,
            head,
            device,
            kind,
        };
        weights.check_all_used(|name| name.ends_with("num_batches_tracked"))?;
        Ok(network)
    }

    fn load_head(loader: &Loader, width: i64) -> Result<Head> {
        let layer = Layer {
            dilation: 5,
            ..Layer::biased(width, 3, Activation::Relu)
        };
        let dilated = loader.conv_norm("block23.conv1.0", "block23.conv1.1", layer)?;
        check_width(loader, &dilated, "block23.conv1.0", width)?;
        let layer = Layer::biased(width, 3, Activation::Relu);
        let conv = loader.conv_norm("block23.conv2.0", "block23.conv2.1", layer)?;
        let inner = conv.weight.size()[0];
        let outputs = loader.width("block23.conv3")?;
        if outputs < FIRST_OUTPUT + 5 {
            return Err(EngineError::WeightFile {
                path: loader.path.to_path_buf(),
                message: format!(
                    "block23.conv3 has {outputs} outputs; M-LSD reads a score and four displacements from output {FIRST_OUTPUT}"
                ),
            });
        }
        let projection = (
            loader
                .vp
                .get("block23.conv3.weight", &[outputs, inner, 1, 1])?,
            loader.vp.get("block23.conv3.bias", &[outputs])?,
        );
        Ok(Head {
            dilated,
            conv,
            projection,
        })
    }

    /// The outputs the detector reads (`x[:, 7:]`) [1, C, H/2, W/2] in float32 of a
    /// network input [1, 4, H, W] whose sides are multiples of 16; `between` is asked
    /// before each backbone block and decoder stage, and its error ends the pass.
    pub fn forward(&self, input: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let size = input.size();
        let side = i64::from(SIDE_MULTIPLE);
        if size.len() != 4 || size[1] != 4 || size[2] % side != 0 || size[3] % side != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "M-LSD takes [N, 4, H, W] with sides that are multiples of {side}, not {size:?}"
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let x = input.to_device(self.device).to_kind(self.kind);
        let levels = self.backbone.forward(&x, between)?;
        let mut h = levels[4].shallow_clone();
        for (k, (join, refine)) in self.decoder.iter().enumerate() {
            between()?;
            h = refine.forward(&join.forward(&levels[3 - k], &h));
        }
        let h = self.head.conv.forward(&self.head.dilated.forward(&h));
        let (weight, bias) = &self.head.projection;
        let out = h.conv2d(weight, Some(bias), [1, 1], [0, 0], [1, 1], 1);
        let outputs = out.size()[1];
        Ok(out
            .narrow(1, FIRST_OUTPUT, outputs - FIRST_OUTPUT)
            .to_kind(Kind::Float))
    }

    /// `MLSDdetector`'s line map of an RGB image at the detection size (sides multiples
    /// of 16, at least 200 pixels of output): white segments on black; `between` is
    /// asked between the network's blocks.
    pub fn detect(
        &self,
        image: &RgbImage,
        thresholds: LineThresholds,
        between: &mut Between<'_>,
    ) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        check_size(width, height).map_err(EngineError::InvalidRequest)?;
        let tpmap = self.forward(&network_input(image), between)?;
        line_map(&tpmap, width, height, thresholds)
    }
}

/// Why an image of `width`×`height` cannot be detected at its size, if it cannot: its
/// sides must be multiples of 16 and its half-size output must hold the 200 candidates.
pub fn check_size(width: u32, height: u32) -> std::result::Result<(), String> {
    let grid = u64::from(width / 2) * u64::from(height / 2);
    let multiple = |side: u32| side > 0 && side.is_multiple_of(SIDE_MULTIPLE);
    if !(multiple(width) && multiple(height)) {
        return Err(format!(
            "M-LSD needs sides that are positive multiples of {SIDE_MULTIPLE}, not {width}x{height}"
        ));
    }
    if grid < CANDIDATES as u64 {
        return Err(format!(
            "M-LSD needs at least {} pixels ({CANDIDATES} candidates at half size), not {width}x{height}",
            CANDIDATES * 4
        ));
    }
    Ok(())
}

/// `pred_lines`' input: the pixels and a channel of ones, each `v / 127.5 - 1` in float32,
/// laid out as its numpy transpose leaves them (channels last), which picks libtorch's
/// channels-last convolutions as it does there.
fn network_input(image: &RgbImage) -> Tensor {
    let (width, height) = image.dimensions();
    let mut values = Vec::with_capacity((width * height * 4) as usize);
    for pixel in image.pixels() {
        values.extend(pixel.0.iter().map(|&v| f32::from(v) / 127.5 - 1.0));
        values.push(1.0 / 127.5 - 1.0);
    }
    Tensor::from_slice(&values)
        .view([1, i64::from(height), i64::from(width), 4])
        .permute([0, 3, 1, 2])
}
