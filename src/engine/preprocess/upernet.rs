//! UperNet semantic segmentation with a ConvNeXt backbone, as transformers'
//! `UperNetForSemanticSegmentation` runs it (openmmlab's `upernet-convnext-*`): a 4×4
//! stride-4 stem, stages of ConvNeXt blocks (7×7 depthwise convolution, layer norm, MLP,
//! layer scale) behind norm + 2×2 stride-2 downsamplings, each stage's output normalised;
//! the UperNet head: a pyramid pooling module on the coarsest level, lateral 1×1 and FPN
//! 3×3 convolution modules (convolution, batch norm in inference, ReLU), the levels summed
//! top-down with bilinear upsampling, concatenated and fused, and a 1×1 classifier; the
//! logits resized to the input. The sizes come from the model folder's `config.json`;
//! the auxiliary head, used only in training, is not loaded.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::engine::checkpoint::Between;
use crate::engine::error::{EngineError, Result};
use crate::engine::models::nn::{Conv2d, LayerNorm, Linear};
use crate::engine::weights::{VarPath, Weights};

/// ConvNextConfig's values, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct BackboneConfig {
    num_channels: i64,
    patch_size: i64,
    hidden_sizes: Vec<i64>,
    depths: Vec<i64>,
    layer_scale_init_value: f64,
    hidden_act: String,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            num_channels: 3,
            patch_size: 4,
            hidden_sizes: vec![96, 192, 384, 768],
            depths: vec![3, 3, 9, 3],
            layer_scale_init_value: 1e-6,
            hidden_act: "gelu".into(),
        }
    }
}

/// UperNetConfig's values, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct UperNetConfig {
    backbone_config: BackboneConfig,
    hidden_size: i64,
    pool_scales: Vec<i64>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    num_labels: Option<i64>,
}

impl Default for UperNetConfig {
    fn default() -> Self {
        Self {
            backbone_config: BackboneConfig::default(),
            hidden_size: 512,
            pool_scales: vec![1, 2, 3, 6],
            id2label: None,
            num_labels: None,
        }
    }
}

/// The ConvNeXt layer norm's epsilon (its stem, downsamplings, blocks and stage norms).
const EPS: f64 = 1e-6;
/// BatchNorm2d's epsilon.
const BN_EPS: f64 = 1e-5;

/// A layer norm over the channels of an NCHW tensor.
fn channels_first(norm: &LayerNorm, x: &Tensor) -> Tensor {
    norm.forward(&x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
}

/// One ConvNeXt block.
struct Block {
    depthwise: Tensor,
    depthwise_bias: Tensor,
    norm: LayerNorm,
    up: Linear,
    down: Linear,
    scale: Option<Tensor>,
}

impl Block {
    fn load(vp: &VarPath, dim: i64, layer_scale: bool) -> Result<Self> {
        Ok(Self {
            depthwise: vp.get("dwconv.weight", &[dim, 1, 7, 7])?,
            depthwise_bias: vp.get("dwconv.bias", &[dim])?,
            norm: LayerNorm::load(&vp.pp("layernorm"), dim, EPS)?,
            up: Linear::load(&vp.pp("pwconv1"), dim, 4 * dim, true)?,
            down: Linear::load(&vp.pp("pwconv2"), 4 * dim, dim, true)?,
            scale: if layer_scale {
                Some(vp.get("layer_scale_parameter", &[dim])?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.depthwise.size()[0];
        let h = x.conv2d(
            &self.depthwise,
            Some(&self.depthwise_bias),
            [1, 1],
            [3, 3],
            [1, 1],
            dim,
        );
        let h = self.norm.forward(&h.permute([0, 2, 3, 1]));
        let mut h = self.up.forward(&h);
        let _ = h.gelu_("none");
        let mut h = self.down.forward(&h);
        if let Some(scale) = &self.scale {
            h *= scale;
        }
        h.permute([0, 3, 1, 2]) + x
    }
}

/// A stage: an optional downsampling, then its blocks.
struct Stage {
    downsample: Option<(LayerNorm, Conv2d)>,
    blocks: Vec<Block>,
    /// The norm of its output feature map.
    out_norm: LayerNorm,
}

/// A convolution, batch norm (inference) and ReLU, the norm folded into the weights.
struct ConvModule {
    weight: Tensor,
    bias: Tensor,
    padding: i64,
}

impl ConvModule {
    fn load(vp: &VarPath, input: i64, output: i64, kernel: i64) -> Result<Self> {
        let weight = vp.get("conv.weight", &[output, input, kernel, kernel])?;
        let bn = vp.pp("batch_norm");
        let (gamma, beta) = (bn.get("weight", &[output])?, bn.get("bias", &[output])?);
        let (mean, var) = (
            bn.get("running_mean", &[output])?,
            bn.get("running_var", &[output])?,
        );
        let scale = gamma / (var + BN_EPS).sqrt();
        Ok(Self {
            weight: weight * scale.view([output, 1, 1, 1]),
            bias: beta - mean * scale,
            padding: kernel / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let p = self.padding;
        let mut y = x.conv2d(&self.weight, Some(&self.bias), [1, 1], [p, p], [1, 1], 1);
        let _ = y.relu_();
        y
    }
}

/// UperNet with a ConvNeXt backbone.
pub struct UperNet {
    stem: (Conv2d, LayerNorm),
    stages: Vec<Stage>,
    pyramid: Vec<(i64, ConvModule)>,
    bottleneck: ConvModule,
    laterals: Vec<ConvModule>,
    fpn: Vec<ConvModule>,
    fpn_bottleneck: ConvModule,
    classifier: Conv2d,
    device: Device,
    kind: Kind,
}

impl UperNet {
    /// Loads the model folder at `dir` (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let c: UperNetConfig = crate::engine::files::read_json(&dir.join("config.json"))?;
        let b = &c.backbone_config;
        if b.hidden_sizes.len() != b.depths.len()
            || b.hidden_sizes.is_empty()
            || b.hidden_act != "gelu"
        {
            return Err(EngineError::InvalidRequest(format!(
                "{}: a ConvNeXt of {} widths, {} depths and `{}` is not one sdxld serves",
                dir.join("config.json").display(),
                b.hidden_sizes.len(),
                b.depths.len(),
                b.hidden_act
            )));
        }
        let labels = c
            .num_labels
            .or_else(|| c.id2label.as_ref().map(|m| m.len() as i64))
            .unwrap_or(150);
        let weights = Weights::open(&[dir.join("model.safetensors")], device, kind)?;
        let network = Self::build(&weights.root(), &c, labels, device, kind)?;
        weights.check_all_used(|name| {
            name.starts_with("auxiliary_head.") || name.ends_with("num_batches_tracked")
        })?;
        Ok(network)
    }

    fn build(
        vp: &VarPath,
        c: &UperNetConfig,
        labels: i64,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let b = &c.backbone_config;
        let widths = &b.hidden_sizes;
        let backbone = vp.pp("backbone");
        let e = backbone.pp("embeddings");
        let stem = (
            Conv2d::load(
                &e.pp("patch_embeddings"),
                b.num_channels,
                widths[0],
                b.patch_size,
                b.patch_size,
                0,
            )?,
            LayerNorm::load(&e.pp("layernorm"), widths[0], EPS)?,
        );
        let mut stages = Vec::with_capacity(widths.len());
        for (i, (&width, &depth)) in widths.iter().zip(&b.depths).enumerate() {
            let stage = backbone.pp(format!("encoder.stages.{i}"));
            let downsample = if i > 0 {
                let d = stage.pp("downsampling_layer");
                Some((
                    LayerNorm::load(&d.pp(0), widths[i - 1], EPS)?,
                    Conv2d::load(&d.pp(1), widths[i - 1], width, 2, 2, 0)?,
                ))
            } else {
                None
            };
            let blocks = (0..depth)
                .map(|j| {
                    Block::load(
                        &stage.pp(format!("layers.{j}")),
                        width,
                        b.layer_scale_init_value > 0.0,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let out_norm = LayerNorm::load(
                &backbone.pp(format!("hidden_states_norms.stage{}", i + 1)),
                width,
                EPS,
            )?;
            stages.push(Stage {
                downsample,
                blocks,
                out_norm,
            });
        }
        let head = vp.pp("decode_head");
        let h = c.hidden_size;
        let top = *widths.last().unwrap_or(&h);
        let pyramid = c
            .pool_scales
            .iter()
            .enumerate()
            .map(|(i, &scale)| {
                Ok((
                    scale,
                    ConvModule::load(&head.pp(format!("psp_modules.{i}.1")), top, h, 1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let levels = widths.len() - 1;
        let laterals = (0..levels)
            .map(|i| ConvModule::load(&head.pp(format!("lateral_convs.{i}")), widths[i], h, 1))
            .collect::<Result<Vec<_>>>()?;
        let fpn = (0..levels)
            .map(|i| ConvModule::load(&head.pp(format!("fpn_convs.{i}")), h, h, 3))
            .collect::<Result<Vec<_>>>()?;
        let pooled = top + c.pool_scales.len() as i64 * h;
        Ok(Self {
            stem,
            stages,
            pyramid,
            bottleneck: ConvModule::load(&head.pp("bottleneck"), pooled, h, 3)?,
            laterals,
            fpn,
            fpn_bottleneck: ConvModule::load(
                &head.pp("fpn_bottleneck"),
                widths.len() as i64 * h,
                h,
                3,
            )?,
            classifier: Conv2d::load(&head.pp("classifier"), h, labels, 1, 1, 0)?,
            device,
            kind,
        })
    }

    /// The backbone's normalised stage outputs, `between` asked before each block.
    fn features(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Vec<Tensor>> {
        let (conv, norm) = &self.stem;
        let mut x = channels_first(norm, &conv.forward(pixels));
        let mut out = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                x = conv.forward(&channels_first(norm, &x));
            }
            for block in &stage.blocks {
                between()?;
                x = block.forward(&x);
            }
            out.push(channels_first(&stage.out_norm, &x));
        }
        Ok(out)
    }

    /// The class logits [N, classes, H, W] (float32) of normalised pixels [N, 3, H, W];
    /// `between` is asked before each backbone block and the head's full-width
    /// convolutions, and its error ends the pass.
    pub fn forward(&self, pixels: &Tensor, between: &mut Between<'_>) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let pixels = pixels.to_device(self.device).to_kind(self.kind);
        let size = [pixels.size()[2], pixels.size()[3]];
        let features = self.features(&pixels, between)?;
        let resize = |x: &Tensor, like: &Tensor| {
            let s = like.size();
            x.upsample_bilinear2d([s[2], s[3]], false, None, None)
        };
        let mut laterals: Vec<Tensor> = self
            .laterals
            .iter()
            .zip(&features)
            .map(|(conv, f)| conv.forward(f))
            .collect();
        let top = &features[features.len() - 1];
        let mut pooled = vec![top.shallow_clone()];
        for (scale, conv) in &self.pyramid {
            pooled.push(resize(
                &conv.forward(&top.adaptive_avg_pool2d([*scale, *scale])),
                top,
            ));
        }
        laterals.push(self.bottleneck.forward(&Tensor::cat(&pooled, 1)));
        for i in (1..laterals.len()).rev() {
            let up = resize(&laterals[i], &laterals[i - 1]);
            laterals[i - 1] = &laterals[i - 1] + up;
        }
        // The head's convolutions at a quarter of the input's size weigh as much as the
        // backbone: asked before each as well.
        let mut outs = Vec::with_capacity(laterals.len());
        for (conv, lateral) in self.fpn.iter().zip(&laterals) {
            between()?;
            outs.push(conv.forward(lateral));
        }
        outs.push(laterals[laterals.len() - 1].shallow_clone());
        let first = outs[0].shallow_clone();
        for out in outs.iter_mut().skip(1) {
            *out = resize(out, &first);
        }
        between()?;
        let fused = self.fpn_bottleneck.forward(&Tensor::cat(&outs, 1));
        Ok(self
            .classifier
            .forward(&fused)
            .upsample_bilinear2d(size, false, None, None)
            .to_kind(Kind::Float))
    }
}
