//! controlnet_aux's PiDiNet edge network (`pidinet()`, the network of its
//! `table5_pidinet.pth`): pixel-difference convolutions in the `carv4` arrangement (each
//! stage's layers central, angular, radial and vanilla in turn; the differences applied
//! to the stored kernels as the reference applies them at every call), four stages of
//! depthwise-separable residual blocks (max pooling into each stage after the first),
//! then per stage an optional dilation module (four dilated 3×3 convolutions summed) and
//! spatial attention, a 1×1 reduction to one edge map, bilinear back to the image and a
//! 1×1 classifier over the four, sigmoid. Widths and the optional modules are read from
//! the weights.

use std::path::Path;

use image::{GrayImage, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::weights::{read_shapes, VarPath, Weights};

/// The smallest side the network takes: three poolings leave a pixel.
pub const MIN_SIDE: u32 = 8;
/// The dilations of the dilation module's four convolutions.
const DILATIONS: [i64; 4] = [5, 7, 9, 11];

/// A pixel-difference convolution type.
#[derive(Clone, Copy)]
enum Difference {
    /// Central: the kernel's response less the centre pixel's times the kernel's sum.
    Central,
    /// Angular: each tap less its clockwise neighbour.
    Angular,
    /// Radial: a 5×5 kernel, the outer ring less the inner one.
    Radial,
    /// A plain convolution.
    Vanilla,
}

/// The `carv4` arrangement of the 16 convolutions (the first block, then 15 blocks).
const CARV4: [Difference; 4] = [
    Difference::Central,
    Difference::Angular,
    Difference::Radial,
    Difference::Vanilla,
];

/// A pixel-difference convolution with its stored kernel, padding 1 for 3×3 kernels.
struct DifferenceConv {
    kind: Difference,
    weight: Tensor,
    /// The radial kernel, built as the reference builds it.
    radial: Option<Tensor>,
    /// The central kernel's sums.
    sums: Option<Tensor>,
    groups: i64,
}

impl DifferenceConv {
    fn new(kind: Difference, weight: Tensor, groups: i64) -> Self {
        let _no_grad = tch::no_grad_guard();
        let shape = weight.size();
        let (out, per_group) = (shape[0], shape[1]);
        let (radial, sums, weight) = match kind {
            Difference::Central => {
                let sums = weight.sum_dim_intlist([2, 3].as_slice(), true, None);
                (None, Some(sums), weight)
            }
            Difference::Angular => {
                let flat = weight.view([out, per_group, 9]);
                let order =
                    Tensor::from_slice(&[3i64, 0, 1, 6, 4, 2, 7, 8, 5]).to_device(weight.device());
                let turned = (&flat - flat.index_select(2, &order)).view([out, per_group, 3, 3]);
                (None, None, turned)
            }
            Difference::Radial => {
                let flat = weight.view([out, per_group, 9]).narrow(2, 1, 8);
                let buffer = Tensor::zeros([out, per_group, 25], (weight.kind(), weight.device()));
                let outer = Tensor::from_slice(&[0i64, 2, 4, 10, 14, 20, 22, 24])
                    .to_device(weight.device());
                let inner = Tensor::from_slice(&[6i64, 7, 8, 11, 13, 16, 17, 18])
                    .to_device(weight.device());
                let buffer = buffer
                    .index_copy(2, &outer, &flat)
                    .index_copy(2, &inner, &(-&flat));
                (Some(buffer.view([out, per_group, 5, 5])), None, weight)
            }
            Difference::Vanilla => (None, None, weight),
        };
        Self {
            kind,
            weight,
            radial,
            sums,
            groups,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let conv = |weight: &Tensor, padding: i64| {
            x.conv2d::<&Tensor>(
                weight,
                None,
                [1, 1],
                [padding, padding],
                [1, 1],
                self.groups,
            )
        };
        match (self.kind, &self.radial, &self.sums) {
            (Difference::Radial, Some(radial), _) => conv(radial, 2),
            (Difference::Central, _, Some(sums)) => conv(&self.weight, 1) - conv(sums, 0),
            _ => conv(&self.weight, 1),
        }
    }
}

/// A residual block: a depthwise pixel-difference convolution, ReLU, a 1×1 convolution;
/// a stage's first block pools first and projects its shortcut.
struct Block {
    depthwise: DifferenceConv,
    pointwise: Tensor,
    shortcut: Option<(Tensor, Tensor)>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = match self.shortcut {
            Some(_) => x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
            None => x.shallow_clone(),
        };
        let mut y = self.depthwise.forward(&x);
        let y = y
            .relu_()
            .conv2d::<&Tensor>(&self.pointwise, None, [1, 1], [0, 0], [1, 1], 1);
        match &self.shortcut {
            Some((weight, bias)) => y + x.conv2d(weight, Some(bias), [1, 1], [0, 0], [1, 1], 1),
            None => y + x,
        }
    }
}

/// A 1×1 or dilated 3×3 convolution with an optional bias.
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    dilation: i64,
}

impl Conv {
    fn load(vp: &VarPath, shape: [i64; 4], bias: bool, dilation: i64) -> Result<Self> {
        Ok(Self {
            weight: vp.get("weight", &shape)?,
            bias: if bias {
                Some(vp.get("bias", &[shape[0]])?)
            } else {
                None
            },
            dilation,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let padding = (self.weight.size()[2] - 1) / 2 * self.dilation;
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [1, 1],
            [padding, padding],
            [self.dilation, self.dilation],
            1,
        )
    }
}

/// One stage's way to its edge map: dilation module, attention, reduction.
struct Side {
    dilation: Option<(Conv, [Conv; 4])>,
    attention: Option<(Conv, Conv)>,
    reduce: Conv,
}

impl Side {
    fn load(vp: &VarPath, i: usize, width: i64, dil: Option<i64>, sa: bool) -> Result<Self> {
        let dilation = match dil {
            Some(d) => {
                let module = vp.pp(format!("dilations.{i}"));
                let convs = DILATIONS
                    .iter()
                    .enumerate()
                    .map(|(k, &dilation)| {
                        Conv::load(
                            &module.pp(format!("conv2_{}", k + 1)),
                            [d, d, 3, 3],
                            false,
                            dilation,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                let convs: [Conv; 4] = convs
                    .try_into()
                    .map_err(|_| EngineError::Internal("four dilated convolutions".into()))?;
                Some((
                    Conv::load(&module.pp("conv1"), [d, width, 1, 1], true, 1)?,
                    convs,
                ))
            }
            None => None,
        };
        let reduced = dil.unwrap_or(width);
        let attention = if sa {
            let module = vp.pp(format!("attentions.{i}"));
            Some((
                Conv::load(&module.pp("conv1"), [4, reduced, 1, 1], true, 1)?,
                Conv::load(&module.pp("conv2"), [1, 4, 3, 3], false, 1)?,
            ))
        } else {
            None
        };
        let reduce = Conv::load(
            &vp.pp(format!("conv_reduces.{i}.conv")),
            [1, reduced, 1, 1],
            true,
            1,
        )?;
        Ok(Self {
            dilation,
            attention,
            reduce,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        if let Some((project, convs)) = &self.dilation {
            let p = project.forward(&h.relu());
            let [a, b, c, d] = convs;
            h = a.forward(&p) + b.forward(&p) + c.forward(&p) + d.forward(&p);
        }
        if let Some((squeeze, spatial)) = &self.attention {
            let y = spatial.forward(&squeeze.forward(&h.relu())).sigmoid();
            // Not in place: without a dilation module `h` is the stage's own output.
            let attended = &h * y;
            h = attended;
        }
        self.reduce.forward(&h)
    }
}

/// The PiDiNet network.
pub struct PiDiNet {
    init: DifferenceConv,
    /// The four stages' blocks.
    stages: Vec<Vec<Block>>,
    sides: Vec<Side>,
    classifier: Conv,
    device: Device,
    kind: Kind,
}

impl PiDiNet {
    /// Loads the network from its state dict at `path` (`module.` prefixes, as the
    /// published checkpoint's `state_dict` has them, are read as well).
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (shapes, _) = read_shapes(path)?;
        let prefixed = shapes.iter().any(|(n, _)| n.starts_with("module."));
        let key = |name: &str| {
            if prefixed {
                format!("module.{name}")
            } else {
                name.to_string()
            }
        };
        let shape_of = |name: &str| {
            let key = key(name);
            shapes
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| EngineError::MissingTensor {
                    path: path.to_path_buf(),
                    name: key.clone(),
                })
        };
        let has = |name: &str| shapes.iter().any(|(n, _)| *n == key(name));
        let width = shape_of("init_block.weight")?[0];
        let dil = if has("dilations.0.conv1.weight") {
            Some(shape_of("dilations.0.conv1.weight")?[0])
        } else {
            None
        };
        let sa = has("attentions.0.conv1.weight");
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let root = weights.root();
        let vp = if prefixed { root.pp("module") } else { root };
        let init =
            DifferenceConv::new(CARV4[0], vp.get("init_block.weight", &[width, 3, 3, 3])?, 1);
        let stage_widths = [width, 2 * width, 4 * width, 4 * width];
        let mut stages = Vec::with_capacity(4);
        let mut input = width;
        for (s, &out) in stage_widths.iter().enumerate() {
            let count = if s == 0 { 3 } else { 4 };
            let mut blocks = Vec::with_capacity(count);
            for b in 0..count {
                // The 16 layers: the first block, 3 blocks, then 4 a stage.
                let layer = if s == 0 { 1 + b } else { 4 * s + b };
                let block = vp.pp(format!("block{}_{}", s + 1, b + 1));
                let (from, pooled) = (if b == 0 { input } else { out }, b == 0 && s > 0);
                let kernel = block.get("conv1.weight", &[from, 1, 3, 3])?;
                blocks.push(Block {
                    depthwise: DifferenceConv::new(CARV4[layer % 4], kernel, from),
                    pointwise: block.get("conv2.weight", &[out, from, 1, 1])?,
                    shortcut: if pooled {
                        Some((
                            block.get("shortcut.weight", &[out, from, 1, 1])?,
                            block.get("shortcut.bias", &[out])?,
                        ))
                    } else {
                        None
                    },
                });
            }
            input = out;
            stages.push(blocks);
        }
        let sides = stage_widths
            .iter()
            .enumerate()
            .map(|(i, &w)| Side::load(&vp, i, w, dil, sa))
            .collect::<Result<Vec<_>>>()?;
        let classifier = Conv::load(&vp.pp("classifier"), [1, 4, 1, 1], true, 1)?;
        let network = Self {
            init,
            stages,
            sides,
            classifier,
            device,
            kind,
        };
        weights.check_all_used(|_| false)?;
        Ok(network)
    }

    /// The four side edge maps and the classifier's, each [N, 1, H, W] after its sigmoid
    /// (float32), of an input [N, 3, H, W] (BGR in [0, 1]) whose sides are at least 8;
    /// `between` is asked before each block, and its error ends the pass.
    pub fn forward(&self, x: &Tensor, between: &mut Between<'_>) -> Result<Vec<Tensor>> {
        let size = x.size();
        let min = i64::from(MIN_SIDE);
        if size.len() != 4 || size[1] != 3 || size[2] < min || size[3] < min {
            return Err(EngineError::InvalidRequest(format!(
                "PiDiNet takes [N, 3, H, W] with sides of at least {min}, not {size:?}"
            )));
        }
        let _no_grad = tch::no_grad_guard();
        let (height, width) = (size[2], size[3]);
        let mut h = self
            .init
            .forward(&x.to_device(self.device).to_kind(self.kind));
        let mut edges = Vec::with_capacity(5);
        for (blocks, side) in self.stages.iter().zip(&self.sides) {
            for block in blocks {
                between()?;
                h = block.forward(&h);
            }
            let edge = side.forward(&h);
            edges.push(edge.upsample_bilinear2d([height, width], false, None, None));
        }
        let fused = self.classifier.forward(&Tensor::cat(&edges, 1));
        edges.push(fused);
        Ok(edges
            .into_iter()
            .map(|e| e.sigmoid().to_kind(Kind::Float))
            .collect())
    }

    /// `PidiNetDetector`'s soft-edge map of an RGB image at the detection size: the BGR
    /// pixels / 255 (channels last, as its numpy input lies), the classifier's edge
    /// times 255 truncated to 8 bits.
    pub fn detect(&self, image: &RgbImage) -> Result<GrayImage> {
        self.detect_levels(image, 0, &mut || Ok(()))
    }

    /// [`Self::detect`], the edges quantised in `safe_steps` steps (0: not at all);
    /// `between` is asked before each block.
    pub fn detect_levels(
        &self,
        image: &RgbImage,
        safe_steps: u32,
        between: &mut Between<'_>,
    ) -> Result<GrayImage> {
        self.edge_map(image, between, |v| {
            if safe_steps > 0 {
                super::hed::safe_level(v, safe_steps)
            } else {
                (v * 255.0).clamp(0.0, 255.0) as u8
            }
        })
    }

    /// The sketch map (`PidiNetDetector` with `apply_filter=True`, A1111's
    /// `t2ia_sketch_pidi`): an edge probability above 0.5 white, the rest black;
    /// `between` is asked before each block.
    pub fn detect_filtered(
        &self,
        image: &RgbImage,
        between: &mut Between<'_>,
    ) -> Result<GrayImage> {
        self.edge_map(image, between, |v| if v > 0.5 { 255 } else { 0 })
    }

    /// The fused edge probabilities of an RGB image (BGR over 255, as the detector feeds
    /// them), each made a byte by `level`.
    fn edge_map(
        &self,
        image: &RgbImage,
        between: &mut Between<'_>,
        level: impl Fn(f32) -> u8,
    ) -> Result<GrayImage> {
        let (width, height) = image.dimensions();
        let bgr: Vec<u8> = image.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
        let pixels = Tensor::from_slice(&bgr)
            .view([1, i64::from(height), i64::from(width), 3])
            .to_kind(Kind::Float)
            / 255.0;
        let edges = self.forward(&pixels.permute([0, 3, 1, 2]), between)?;
        let fused = edges
            .last()
            .ok_or_else(|| EngineError::Internal("PiDiNet without outputs".into()))?;
        let values = Vec::<f32>::try_from(fused.to_device(Device::Cpu).contiguous().view(-1))?;
        let map = values.into_iter().map(level).collect();
        GrayImage::from_raw(width, height, map)
            .ok_or_else(|| EngineError::Internal("an edge map of the wrong size".into()))
    }
}
