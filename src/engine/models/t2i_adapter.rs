//! `T2IAdapter` as diffusers defines it (`models/adapter.py`): a small convolutional
//! network that turns a control map into one feature map per level, which the UNet adds
//! inside its down blocks (diffusers' `down_intrablock_additional_residuals`). It runs
//! once per generation, not once per step as a ControlNet does.
//!
//! Three layouts: `full_adapter_xl` (SDXL's: pixel unshuffle, a convolution, four blocks
//! of which only the third halves the size), `full_adapter` (SD 1.5's: every block after
//! the first halves it) and `light_adapter` (narrow blocks between 1×1 convolutions).

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::engine::config_check::{read_config, CheckedConfig, ConfigCheck};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::Conv2d;
use crate::engine::weights::{VarPath, Weights};

/// A T2I-Adapter's `config.json`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T2IAdapterConfig {
    /// Channels of the control map: 3 (RGB) or 1 (grey).
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Width of each block's output.
    #[serde(default = "full_channels")]
    pub channels: Vec<i64>,
    /// Residual blocks per block.
    #[serde(default = "two")]
    pub num_res_blocks: i64,
    /// The pixel unshuffle's factor (the first features are the map this much smaller).
    #[serde(default = "eight")]
    pub downscale_factor: i64,
    /// `full_adapter`, `full_adapter_xl` or `light_adapter`.
    #[serde(default = "full_adapter")]
    pub adapter_type: String,
}

fn three() -> i64 {
    3
}
fn two() -> i64 {
    2
}
fn eight() -> i64 {
    8
}
fn full_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn full_adapter() -> String {
    "full_adapter".into()
}

/// The largest pixel unshuffle factor accepted (SDXL's adapters use 16, SD 1.5's 8).
const MAX_DOWNSCALE: i64 = 64;

/// The adapter layouts diffusers defines.
const LAYOUTS: [&str; 3] = ["full_adapter", "full_adapter_xl", "light_adapter"];

impl CheckedConfig for T2IAdapterConfig {
    fn check(&self, check: &mut ConfigCheck) {
        if ![1, 3].contains(&self.in_channels) {
            check.problem(
                "in_channels",
                format!(
                    "is {}: control maps are RGB (3) or grey (1)",
                    self.in_channels
                ),
            );
        }
        if self.channels.is_empty() {
            check.problem("channels", "is empty");
        }
        check.all_positive("channels", &self.channels);
        check.not_negative("num_res_blocks", self.num_res_blocks);
        if !(1..=MAX_DOWNSCALE).contains(&self.downscale_factor) {
            check.problem(
                "downscale_factor",
                format!(
                    "is {}; it must be in [1, {MAX_DOWNSCALE}]",
                    self.downscale_factor
                ),
            );
        }
        check.one_of("adapter_type", &self.adapter_type, &LAYOUTS);
        if self.adapter_type == "full_adapter_xl" {
            // Its blocks after the third take the width of the one before as their own.
            for i in 3..self.channels.len() {
                if self.channels[i] != self.channels[i - 1] {
                    check.problem(
                        "channels",
                        format!("of a full_adapter_xl must not change after the third block (entry {i})"),
                    );
                }
            }
        }
        if self.adapter_type == "light_adapter" && self.channels.iter().any(|&c| c < 4) {
            check.problem(
                "channels",
                "of a light_adapter must be at least 4 (a quarter is its inner width)",
            );
        }
    }
}

/// One block's shape: its input and output widths and whether it halves its input first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down: bool,
}

/// One feature map an adapter makes: its width, and how many times smaller than the
/// control map it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub channels: i64,
    pub factor: i64,
}

impl T2IAdapterConfig {
    /// Reads and checks a T2I-Adapter's `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        read_config(path)
    }

    /// Whether it is the light layout.
    fn light(&self) -> bool {
        self.adapter_type == "light_adapter"
    }

    /// Width of what the pixel unshuffle makes of the control map.
    fn unshuffled(&self) -> i64 {
        self.in_channels * self.downscale_factor * self.downscale_factor
    }

    /// Its blocks' shapes, as diffusers builds them for its layout.
    pub fn blocks(&self) -> Vec<BlockShape> {
        let c = &self.channels;
        let block = |in_channels, out_channels, down| BlockShape {
            in_channels,
            out_channels,
            down,
        };
        match self.adapter_type.as_str() {
            "full_adapter_xl" => (0..c.len())
                .map(|i| match i {
                    1 => block(c[0], c[1], false),
                    2 => block(c[1], c[2], true),
                    _ => block(c[i], c[i], false),
                })
                .collect(),
            "light_adapter" => {
                let last = c[c.len() - 1];
                std::iter::once(block(self.unshuffled(), c[0], false))
                    .chain(c.windows(2).map(|w| block(w[0], w[1], true)))
                    .chain(std::iter::once(block(last, last, true)))
                    .collect()
            }
            _ => (0..c.len())
                .map(|i| block(if i == 0 { c[0] } else { c[i - 1] }, c[i], i > 0))
                .collect(),
        }
    }

    /// The feature maps it makes, in order.
    pub fn features(&self) -> Vec<Feature> {
        let mut factor = self.downscale_factor;
        self.blocks()
            .into_iter()
            .map(|b| {
                if b.down {
                    factor *= 2;
                }
                Feature {
                    channels: b.out_channels,
                    factor,
                }
            })
            .collect()
    }
}

/// A residual block: a 3×3 convolution, ReLU, a 1×1 (full layouts) or 3×3 (light)
/// convolution, plus its input.
struct ResnetBlock {
    block1: Conv2d,
    block2: Conv2d,
}

impl ResnetBlock {
    fn load(vp: &VarPath, channels: i64, light: bool) -> Result<Self> {
        let (kernel, padding) = if light { (3, 1) } else { (1, 0) };
        Ok(Self {
            block1: Conv2d::load(&vp.pp("block1"), channels, channels, 3, 1, 1)?,
            block2: Conv2d::load(&vp.pp("block2"), channels, channels, kernel, 1, padding)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.block2.forward(&self.block1.forward(x).relu()) + x
    }
}

/// A block: an average pool halving the size (ceil mode) when it downsamples, a 1×1
/// convolution to its width (light blocks: to a quarter of it) where that differs,
/// residual blocks, and for light blocks a 1×1 convolution back out.
struct AdapterBlock {
    down: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<ResnetBlock>,
    out_conv: Option<Conv2d>,
}

impl AdapterBlock {
    fn load(vp: &VarPath, shape: BlockShape, res_blocks: i64, light: bool) -> Result<Self> {
        let (inner, out) = if light {
            (shape.out_channels / 4, shape.out_channels)
        } else {
            (shape.out_channels, shape.out_channels)
        };
        let in_conv = if light || shape.in_channels != inner {
            Some(Conv2d::load(
                &vp.pp("in_conv"),
                shape.in_channels,
                inner,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let resnets = (0..res_blocks)
            .map(|j| ResnetBlock::load(&vp.pp("resnets").pp(j), inner, light))
            .collect::<Result<Vec<_>>>()?;
        let out_conv = if light {
            Some(Conv2d::load(&vp.pp("out_conv"), inner, out, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            down: shape.down,
            in_conv,
            resnets,
            out_conv,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = if self.down {
            x.avg_pool2d([2, 2], [2, 2], [0, 0], true, true, None::<i64>)
        } else {
            x.shallow_clone()
        };
        if let Some(conv) = &self.in_conv {
            h = conv.forward(&h);
        }
        for resnet in &self.resnets {
            h = resnet.forward(&h);
        }
        match &self.out_conv {
            Some(conv) => conv.forward(&h),
            None => h,
        }
    }
}

/// A T2I-Adapter.
pub struct T2IAdapter {
    config: T2IAdapterConfig,
    conv_in: Option<Conv2d>,
    body: Vec<AdapterBlock>,
}

impl T2IAdapter {
    /// Loads a diffusers `T2IAdapter` folder (`config.json` and its weights).
    pub fn load_dir(dir: &Path, placement: Placement) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = T2IAdapterConfig::read(&config_path)?;
        let weights = placement.open_component(dir, "diffusion_pytorch_model")?;
        let model = Self::load(&weights.root(), config)?;
        weights.check_all_used(|_| false)?;
        Ok(model)
    }

    /// Loads a single-file adapter in diffusers key names, its config `config` (inferred
    /// from its tensors).
    pub fn load_file(path: &Path, config: T2IAdapterConfig, placement: Placement) -> Result<Self> {
        let weights = Weights::open(&[path.to_path_buf()], placement.device, placement.kind)?
            .with_layout(placement.layout);
        let model = Self::load(&weights.root(), config)?;
        weights.check_all_used(|_| false)?;
        Ok(model)
    }

    /// Builds the adapter from weights at `vp` (diffusers keys, `adapter.` first).
    pub fn load(vp: &VarPath, config: T2IAdapterConfig) -> Result<Self> {
        let vp = vp.pp("adapter");
        let light = config.light();
        let conv_in = if light {
            None
        } else {
            Some(Conv2d::load(
                &vp.pp("conv_in"),
                config.unshuffled(),
                config.channels[0],
                3,
                1,
                1,
            )?)
        };
        let body = config
            .blocks()
            .into_iter()
            .enumerate()
            .map(|(i, shape)| {
                AdapterBlock::load(&vp.pp("body").pp(i), shape, config.num_res_blocks, light)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            conv_in,
            body,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// The feature maps for `map` ([batch, 3, H, W] RGB in [0, 1]; H and W multiples of
    /// the downscale factor), in the adapter's dtype: a grey adapter sees the map's
    /// luminance as Pillow's `convert("L")` computes it from the 8-bit values.
    pub fn forward(&self, map: &Tensor) -> Result<Vec<Tensor>> {
        let size = map.size();
        let factor = self.config.downscale_factor;
        if size.len() != 4 || size[1] != 3 || size[2] % factor != 0 || size[3] % factor != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "a T2I-Adapter control map is {size:?}: it must be [batch, 3, H, W] with H and W multiples of {factor}"
            )));
        }
        let kind = self.body_kind();
        let input = if self.config.in_channels == 1 {
            grey(map)
        } else {
            map.shallow_clone()
        };
        let mut x = input.to_kind(kind).pixel_unshuffle(factor);
        if let Some(conv) = &self.conv_in {
            x = conv.forward(&x);
        }
        Ok(self
            .body
            .iter()
            .map(|block| {
                x = block.forward(&x);
                x.shallow_clone()
            })
            .collect())
    }

    /// The dtype of its weights.
    fn body_kind(&self) -> Kind {
        self.body
            .first()
            .and_then(|b| b.resnets.first().map(|r| r.block1.weight().kind()))
            .or_else(|| self.conv_in.as_ref().map(|c| c.weight().kind()))
            .unwrap_or(Kind::Float)
    }
}

/// The luminance of an RGB map in [0, 1] holding 8-bit values, [batch, 1, H, W]:
/// Pillow's `convert("L")` (ITU-R 601-2 weights in 16-bit fixed point, rounded).
fn grey(map: &Tensor) -> Tensor {
    let levels = (map.to_kind(Kind::Float) * 255.0)
        .round()
        .to_kind(Kind::Int64);
    let weights = Tensor::from_slice(&[19595i64, 38470, 7471])
        .view([1, 3, 1, 1])
        .to_device(map.device());
    let luma = ((levels * weights).sum_dim_intlist(1, true, Kind::Int64) + 0x8000)
        .floor_divide_scalar(1 << 16);
    luma.to_kind(Kind::Float) / 255.0
}

/// Whether a single file's tensors are a T2I-Adapter's in diffusers key names.
pub fn is_adapter_file(shapes: &[(String, Vec<i64>)]) -> bool {
    shapes.iter().any(|(k, _)| k.starts_with("adapter.body."))
}

/// The config of a single-file T2I-Adapter in diffusers key names (`adapter.conv_in.*`,
/// `adapter.body.*`), inferred from its tensor shapes as ComfyUI reads such files: the
/// pixel unshuffle's output width tells the layout and factor (256 or 768 values: SDXL's
/// `full_adapter_xl` with factor 16; 64 or 192: factor 8, `full_adapter`, or
/// `light_adapter` when it has no `conv_in`), the blocks their widths and depth.
pub fn infer_config(path: &Path, shapes: &[(String, Vec<i64>)]) -> Result<T2IAdapterConfig> {
    let refuse = |why: String| EngineError::Config {
        path: path.to_path_buf(),
        message: format!("{why}: not a single-file T2I-Adapter in diffusers key names"),
    };
    let shape = |key: &str| {
        shapes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s.as_slice())
    };
    let dim = |key: &str, axis: usize| -> Result<i64> {
        shape(key)
            .and_then(|s| s.get(axis).copied())
            .ok_or_else(|| refuse(format!("`{key}` is missing")))
    };
    let names = || shapes.iter().map(|(k, _)| k.as_str());
    let blocks = crate::engine::weights::numbered_children(names(), "adapter.body.");
    let res_blocks = crate::engine::weights::numbered_children(names(), "adapter.body.0.resnets.");
    if blocks == 0 || res_blocks == 0 {
        return Err(refuse("no `adapter.body.0.resnets.0.*` tensors".into()));
    }
    let light = shape("adapter.conv_in.weight").is_none();
    let unshuffled = if light {
        dim("adapter.body.0.in_conv.weight", 1)?
    } else {
        dim("adapter.conv_in.weight", 1)?
    };
    let (adapter_type, downscale_factor) = match (light, unshuffled) {
        (false, 256 | 768) => ("full_adapter_xl", 16),
        (false, 64 | 192) => ("full_adapter", 8),
        (true, 64 | 192) => ("light_adapter", 8),
        _ => {
            return Err(refuse(format!(
                "its first convolution takes {unshuffled} values per position, not a pixel unshuffle of 1 or 3 channels by 8 or 16"
            )))
        }
    };
    let width = |i: i64| {
        if light {
            dim(&format!("adapter.body.{i}.out_conv.weight"), 0)
        } else {
            dim(&format!("adapter.body.{i}.resnets.0.block1.weight"), 0)
        }
    };
    // A light adapter has one block more than widths: its last repeats the last width.
    let widths = if light { blocks - 1 } else { blocks };
    let channels = (0..widths).map(width).collect::<Result<Vec<_>>>()?;
    Ok(T2IAdapterConfig {
        in_channels: unshuffled / (downscale_factor * downscale_factor),
        channels,
        num_res_blocks: res_blocks,
        downscale_factor,
        adapter_type: adapter_type.into(),
    })
}
