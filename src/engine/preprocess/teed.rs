//! controlnet_aux's TEED edge network (`TED`, the tiny and efficient edge detector of
//! A1111's `softedge_teed`): two double-convolution blocks (the first at half
//! resolution), a max-pooled dense block at a quarter, each brought back to full
//! resolution by 1×1 convolutions and transposed convolutions, and a depthwise "double
//! fusion" of the three; Smish activations (x·tanh(ln(1 + sigmoid x))). RGB input in
//! [0, 255], not normalised. Widths, the dense block's depth and the up-sampling steps are
//! read from the weights.

use std::path::Path;

use image::{GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::{in_turn, Between};
use crate::engine::error::{EngineError, Result};
use crate::engine::weights::{read_shapes, Shapes, VarPath, Weights};

/// The network's sides must be multiples of it: its three branches meet again at the
/// input's size only then.
pub const SIDE_MULTIPLE: u32 = 4;

/// Smish, as controlnet_aux computes it.
fn smish(x: &Tensor) -> Tensor {
    x * (x.sigmoid() + 1.0).log().tanh()
}

/// A convolution with its bias; its groups are the input's channels over the
/// weight's.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    groups: i64,
}

impl Conv {
    fn out(&self) -> i64 {
        self.weight.size()[0]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (s, p) = (self.stride, self.padding);
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [s, s],
            [p, p],
            [1, 1],
            self.groups,
        )
    }
}

/// Two convolutions in a row (a double-convolution block, a dense layer).
struct Pair {
    first: Conv,
    second: Conv,
}

/// Reads tensors at the shapes the file stores.
struct Loader<'a> {
    path: &'a Path,
    shapes: Shapes,
    root: VarPath<'a>,
}

impl Loader<'_> {
    /// The tensor `name` at its stored shape.
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let shape = self
            .shapes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.path.to_path_buf(),
                name: name.to_string(),
            })?;
        self.root.get(name, &shape)
    }

    /// A file whose shapes do not fit together, refused naming the tensor.
    fn refuse(&self, name: &str, message: String) -> EngineError {
        EngineError::WeightFile {
            path: self.path.to_path_buf(),
            message: format!("`{name}` {message}"),
        }
    }

    /// The convolution `name` on `inputs` channels (grouped when its weight takes
    /// fewer).
    fn conv(&self, name: &str, stride: i64, padding: i64, inputs: i64) -> Result<Conv> {
        let key = format!("{name}.weight");
        let weight = self.tensor(&key)?;
        let size = weight.size();
        let groups = if size.len() == 4 && size[1] > 0 && inputs % size[1] == 0 {
            inputs / size[1]
        } else {
            0
        };
        if groups == 0 || size[0] % groups != 0 {
            return Err(self.refuse(&key, format!("{size:?} does not take {inputs} channels")));
        }
        let bias = self.root.get(&format!("{name}.bias"), &[size[0]])?;
        Ok(Conv {
            groups,
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// `name.conv1` (`stride`, padding `paddings.0`) then `name.conv2` (padding
    /// `paddings.1`).
    fn pair(&self, name: &str, stride: i64, paddings: (i64, i64), inputs: i64) -> Result<Pair> {
        let first = self.conv(&format!("{name}.conv1"), stride, paddings.0, inputs)?;
        let second = self.conv(&format!("{name}.conv2"), 1, paddings.1, first.out())?;
        Ok(Pair { first, second })
    }

    fn has(&self, name: &str) -> bool {
        self.shapes.iter().any(|(n, _)| n == name)
    }
}

/// `UpConvBlock`: per step a 1×1 convolution, Smish and a stride-2 transposed
/// convolution (kernel 2^steps, padding half the kernel less one).
struct UpBlock {
    steps: Vec<(Conv, Tensor, Tensor)>,
}

impl UpBlock {
    /// The block `name` on `inputs` channels, doubling the size `doublings` times.
    fn load(loader: &Loader, name: &str, mut inputs: i64, doublings: usize) -> Result<Self> {
        let mut steps = Vec::new();
        while loader.has(&format!("{name}.features.{}.weight", 3 * steps.len())) {
            let i = 3 * steps.len();
            let conv = loader.conv(&format!("{name}.features.{i}"), 1, 0, inputs)?;
            let key = format!("{name}.features.{}.weight", i + 2);
            let weight = loader.tensor(&key)?;
            let size = weight.size();
            // An even kernel of 2 or more, padded by half less one, exactly doubles.
            let doubles = size.len() == 4 && size[2] == size[3] && size[2] >= 2 && size[2] % 2 == 0;
            if !doubles || size[0] != conv.out() {
                let message = format!("{size:?} is no doubling of {} channels", conv.out());
                return Err(loader.refuse(&key, message));
            }
            inputs = size[1];
            let bias = loader
                .root
                .get(&format!("{name}.features.{}.bias", i + 2), &[inputs])?;
            steps.push((conv, weight, bias));
        }
        if steps.len() != doublings {
            let message = format!(
                "has {} up-sampling steps; its branch needs {doublings}",
                steps.len()
            );
            return Err(loader.refuse(name, message));
        }
        Ok(Self { steps })
    }

    /// The channels it brings back.
    fn out(&self) -> i64 {
        self.steps
            .last()
            .map_or(0, |(_, weight, _)| weight.size()[1])
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (conv, weight, bias) in &self.steps {
            let padding = weight.size()[2] / 2 - 1;
            h = smish(&conv.forward(&h)).conv_transpose2d(
                weight,
                Some(bias),
                [2, 2],
                [padding, padding],
                [0, 0],
                1,
                [1, 1],
            );
        }
        h
    }
}

/// The TEED network.
pub struct Teed {
    block_1: Pair,
    block_2: Pair,
    side_1: Conv,
    pre_dense: Conv,
    dense: Vec<Pair>,
    up: [UpBlock; 3],
    fusion: [Conv; 2],
    device: Device,
    kind: Kind,
}

impl Teed {
    /// Loads the network from its state dict at `path`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let loader = Loader {
            path,
            shapes,
            root: weights.root(),
        };
        let block_1 = loader.pair("block_1", 2, (1, 1), 3)?;
        let width_1 = block_1.second.out();
        let block_2 = loader.pair("block_2", 1, (1, 1), width_1)?;
        let width_2 = block_2.second.out();
        let side_1 = loader.conv("side_1.conv", 2, 0, width_1)?;
        if side_1.out() != width_2 {
            let message = format!("gives {} channels to add to {width_2}", side_1.out());
            return Err(loader.refuse("side_1.conv.weight", message));
        }
        let pre_dense = loader.conv("pre_dense_3.conv", 1, 0, width_2)?;
        let mut dense = Vec::new();
        let mut inputs = width_2;
        while loader.has(&format!(
            "dblock_3.denselayer{}.conv1.weight",
            dense.len() + 1
        )) {
            let layer = format!("dblock_3.denselayer{}", dense.len() + 1);
            let pair = loader.pair(&layer, 1, (2, 0), inputs)?;
            inputs = pair.second.out();
            if inputs != pre_dense.out() {
                let message = format!("gives {inputs} channels to add to {}", pre_dense.out());
                return Err(loader.refuse(&format!("{layer}.conv2.weight"), message));
            }
            dense.push(pair);
        }
        let up = [
            UpBlock::load(&loader, "up_block_1", width_1, 1)?,
            UpBlock::load(&loader, "up_block_2", width_2, 1)?,
            UpBlock::load(&loader, "up_block_3", inputs, 2)?,
        ];
        let branches = up.iter().map(UpBlock::out).sum();
        let spread = loader.conv("block_cat.DWconv1", 1, 1, branches)?;
        let refine = loader.conv("block_cat.DWconv2", 1, 1, spread.out())?;
        if refine.out() != spread.out() {
            let message = format!("gives {} channels to add to {}", refine.out(), spread.out());
            return Err(loader.refuse("block_cat.DWconv2.weight", message));
        }
        weights.check_all_used(|_| false)?;
        Ok(Self {
            block_1,
            block_2,
            side_1,
            pre_dense,
            dense,
            up,
            fusion: [spread, refine],
            device,
            kind,
        })
    }

    /// The three branches' edge logits and the fused one, each [N, 1, H, W] (float32),
    /// of an input [N, 3, H, W] (RGB in [0, 255]) whose sides are multiples of 4;
    /// `between` is asked before each block and each step of the fusion (most of the
    /// pass at full resolution), and its error ends the pass.
    pub fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Vec<Tensor>> {
        let size = x.size();
        let multiple = i64::from(SIDE_MULTIPLE);
        let fits = size.len() == 4 && size[1] == 3 && size[2] > 0 && size[3] > 0;
        if !fits || size[2] % multiple != 0 || size[3] % multiple != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "TEED takes [N, 3, H, W] with sides that are multiples of {multiple}, not {size:?}"
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let x = x.to_device(self.device).to_kind(self.kind);
        between()?;
        let Pair { first, second } = &self.block_1;
        let block_1 = smish(&second.forward(&smish(&first.forward(&x))));
        between()?;
        let Pair { first, second } = &self.block_2;
        let block_2 = second.forward(&smish(&first.forward(&block_1)));
        let down = block_2.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let start = &down + self.side_1.forward(&block_1);
        let shortcut = self.pre_dense.forward(&down);
        let dense = in_turn(
            start,
            &self.dense,
            between,
            |Pair { first, second }, dense| {
                let new = second.forward(&smish(&first.forward(&smish(dense))));
                (new + &shortcut) * 0.5
            },
        )?;
        let mut edges = Vec::with_capacity(self.up.len() + 1);
        for (h, up) in [&block_1, &block_2, &dense].iter().zip(&self.up) {
            between()?;
            edges.push(up.forward(h));
        }
        between()?;
        let [spread, refine] = &self.fusion;
        let attention = spread.forward(&smish(&Tensor::cat(&edges, 1)));
        between()?;
        let refined = refine.forward(&smish(&attention));
        between()?;
        let fused = smish(&(refined + attention).sum_dim_intlist([1].as_slice(), true, None));
        edges.push(fused);
        Ok(edges.into_iter().map(|e| e.to_kind(Kind::Float)).collect())
    }

    /// `TEEDdetector`'s map of an RGB image at the detection size: the RGB pixels as
    /// they are (channels last, as its numpy input lies), the four edge maps' float32
    /// mean, a float64 sigmoid, quantised in `safe_steps` steps (0: not at all), 8 bits;
    /// `between` is asked before each block.
    pub fn detect(
        &self,
        image: &RgbImage,
        safe_steps: u32,
        between: &mut Between<'_>,
    ) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let pixels = Tensor::from_slice(image.as_raw())
            .view([1, i64::from(height), i64::from(width), 3])
            .to_kind(Kind::Float)
            .permute([0, 3, 1, 2]);
        let edges = self.forward(&pixels, between)?;
        let planes = edges
            .iter()
            .map(|e| Vec::<f32>::try_from(e.to_device(Device::Cpu).contiguous().view(-1)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let count = planes.len() as f32;
        let map = (0..(width as usize * height as usize))
            .map(|i| {
                let sum = planes.iter().fold(0f32, |sum, plane| sum + plane[i]);
                super::hed::edge_byte(sum / count, safe_steps)
            })
            .collect();
        GrayImage::from_raw(width, height, map)
            .ok_or_else(|| EngineError::Internal("an edge map of the wrong size".into()))
    }
}
