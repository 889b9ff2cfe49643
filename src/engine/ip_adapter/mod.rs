//! IP-Adapters: images as prompts. An adapter file (tencent-ailab's layout, as shared for
//! SDXL: `image_proj.*` and `ip_adapter.<n>.to_k_ip/to_v_ip.weight`) holds a projection
//! from a CLIP image encoder's output to a few tokens, and for every cross-attention layer
//! of the UNet a key and a value projection of those tokens. Each layer then attends to
//! the image tokens beside the prompt's and adds the result, times the adapter's scale,
//! as diffusers' `IPAdapterAttnProcessor2_0` does. Nothing on the UNet changes: the keys
//! and values travel with the request ([`ImageKeys`]). A prompt with masks (one per
//! image, diffusers' `ip_adapter_masks`) attends to each image alone and keeps its
//! result only where the image's mask is white.

pub mod mask;
pub mod pixels;
pub mod projection;

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::guidance::BatchLayout;
use crate::engine::models::attention::{CrossAttentionLayer, ImageKeys, ImageKv};
use crate::engine::models::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::engine::models::nn::Linear;
use crate::engine::models::region::RegionMask;
use crate::engine::weights::{numbered_children, read_shapes, Shapes, Weights};

use projection::ImageProjection;
pub use projection::ProjectionShape;

/// One cross-attention layer's projections of the image tokens.
struct LayerProjections {
    key: Linear,
    value: Linear,
}

/// An IP-Adapter's weights.
pub struct IpAdapter {
    device: Device,
    shape: ProjectionShape,
    projection: ImageProjection,
    /// The inner width of each layer it projects for, by slot.
    widths: Vec<i64>,
    layers: Vec<LayerProjections>,
}

/// An adapter file's projection shape and the inner width of each attention layer it
/// projects for, from its tensor names and shapes; else why it is not an IP-Adapter
/// sdxld runs.
pub fn adapter_shape(shapes: &Shapes) -> std::result::Result<(ProjectionShape, Vec<i64>), String> {
    let shape_of = |name: &str| {
        shapes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_slice())
    };
    let has = |name: &str| shape_of(name).is_some();
    let projection = if let Some(&[out, embed]) = shape_of("image_proj.proj.weight") {
        if out % 4 != 0 {
            return Err(format!(
                "`image_proj.proj.weight` has {out} rows, not four tokens' worth"
            ));
        }
        ProjectionShape::Plain {
            embed,
            cross: out / 4,
        }
    } else if let Some(&[1, queries, hidden]) = shape_of("image_proj.latents") {
        let (Some(&[_, embed]), Some(&[cross, _]), Some(&[ff_inner, _])) = (
            shape_of("image_proj.proj_in.weight"),
            shape_of("image_proj.proj_out.weight"),
            shape_of("image_proj.layers.0.1.1.weight"),
        ) else {
            return Err("its resampler lacks `proj_in`, `proj_out` or a feed-forward".into());
        };
        if hidden % 64 != 0 {
            return Err(format!(
                "its resampler is {hidden} wide, not a multiple of its 64-wide heads"
            ));
        }
        let depth = numbered_children(shapes.iter().map(|(n, _)| n.as_str()), "image_proj.layers.");
        ProjectionShape::Resampler {
            embed,
            hidden,
            cross,
            queries,
            depth,
            ff_inner,
        }
    } else if has("image_proj.perceiver_resampler.proj_in.weight") || has("image_proj.norm.weight")
    {
        return Err("it is a FaceID adapter, which reads InsightFace face embeddings rather than images; FaceID adapters are not supported".into());
    } else if has("image_proj.proj.3.weight") {
        return Err("it is a Full Face adapter (257 tokens of the encoder's hidden states); Full Face adapters are not supported".into());
    } else {
        return Err("it has no `image_proj.proj.weight` or `image_proj.latents`: not an IP-Adapter in the shared (tencent-ailab) layout".into());
    };
    let mut widths = Vec::new();
    loop {
        let id = 2 * widths.len() + 1;
        let key = shape_of(&format!("ip_adapter.{id}.to_k_ip.weight"));
        let value = shape_of(&format!("ip_adapter.{id}.to_v_ip.weight"));
        match (key, value) {
            (Some(&[inner, cross]), Some(v))
                if cross == projection.cross() && v == [inner, cross] =>
            {
                widths.push(inner)
            }
            (None, None) => break,
            _ => {
                return Err(format!(
                "`ip_adapter.{id}` does not hold a key and a value projection from {}-wide tokens",
                projection.cross()
            ))
            }
        }
    }
    if widths.is_empty() {
        return Err("it has no `ip_adapter.1.to_k_ip.weight`: no attention layers".into());
    }
    Ok((projection, widths))
}

impl IpAdapter {
    /// Loads an adapter file onto `device` in `kind`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let incompatible = |why: String| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            EngineError::Incompatible(format!("`{name}` is not an IP-Adapter sdxld runs: {why}"))
        };
        let (shapes, _) = read_shapes(path)?;
        let (shape, widths) = adapter_shape(&shapes).map_err(incompatible)?;
        let weights = Weights::open(&[path.to_path_buf()], device, kind)?;
        let root = weights.root();
        let projection = ImageProjection::load(&root.pp("image_proj"), shape)?;
        let cross = shape.cross();
        let layers = widths
            .iter()
            .enumerate()
            .map(|(slot, &inner)| {
                let vp = root.pp("ip_adapter").pp(2 * slot + 1);
                Ok(LayerProjections {
                    key: Linear::load(&vp.pp("to_k_ip"), cross, inner, false)?,
                    value: Linear::load(&vp.pp("to_v_ip"), cross, inner, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        weights.check_all_used(|_| false)?;
        Ok(Self {
            device,
            shape,
            projection,
            widths,
            layers,
        })
    }

    /// Its projection's shape.
    pub fn shape(&self) -> ProjectionShape {
        self.shape
    }

    /// Why it cannot condition a UNet with these cross-attention layers (by slot) and text
    /// width, if it cannot.
    pub fn misfit_unet(
        &self,
        layers: &[CrossAttentionLayer],
        cross_attention_dim: i64,
    ) -> Option<String> {
        let widths: Vec<i64> = layers.iter().map(|l| l.width).collect();
        if self.shape.cross() != cross_attention_dim {
            return Some(format!(
                "its image tokens are {} wide, the UNet's cross-attention reads {cross_attention_dim}",
                self.shape.cross()
            ));
        }
        if self.widths.len() != widths.len() {
            return Some(format!(
                "it has {} cross-attention layers, the UNet {}",
                self.widths.len(),
                widths.len()
            ));
        }
        let (slot, (ours, theirs)) = self
            .widths
            .iter()
            .zip(&widths)
            .enumerate()
            .find(|(_, (a, b))| a != b)?;
        Some(format!(
            "its cross-attention layer {slot} is {ours} wide, the UNet's `{}` {theirs}",
            layers[slot].attention
        ))
    }

    /// Why it cannot read this image encoder's output, if it cannot.
    pub fn misfit_encoder(&self, encoder: &ClipVisionConfig) -> Option<String> {
        let (what, width) = if self.shape.reads_hidden_states() {
            ("hidden states", encoder.hidden_size)
        } else {
            ("image embeddings", encoder.projection_dim)
        };
        (self.shape.embed() != width).then(|| {
            format!(
                "it reads {}-wide {what}, the image encoder's are {width} wide",
                self.shape.embed()
            )
        })
    }

    /// The image tokens of `images` (the encoder's input, [images, 3, size, size]) and of
    /// the negative image diffusers pairs them with (zero image embeddings; for
    /// resamplers, the hidden states of an all-zero input), each [1, images × tokens,
    /// cross] in the encoder's kind.
    pub fn image_tokens(&self, encoder: &ClipVisionModel, pixels: &Tensor) -> (Tensor, Tensor) {
        let images = pixels.size()[0];
        let read = |pixels: &Tensor| {
            let out = encoder.forward(pixels);
            if self.shape.reads_hidden_states() {
                out.penultimate
            } else {
                out.image_embeds
            }
        };
        let positive = read(pixels);
        let negative = if self.shape.reads_hidden_states() {
            read(&pixels.narrow(0, 0, 1).zeros_like()).repeat([images, 1, 1])
        } else {
            positive.zeros_like()
        };
        let flat = |t: Tensor| t.reshape([1, -1, self.shape.cross()]);
        (
            flat(self.projection.forward(&positive)),
            flat(self.projection.forward(&negative)),
        )
    }
}

/// The attentions an image prompt acts in: all of them, or InstantStyle's layers of SDXL
/// (diffusers' `set_ip_adapter_scale` with a per-block dict; InvokeAI's "style" and
/// "composition" methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptLayers {
    /// Every cross-attention layer.
    #[default]
    All,
    /// `up_blocks.0.attentions.1` only: the image's style.
    Style,
    /// `down_blocks.2.attentions.1` only: the image's layout.
    Composition,
    /// Both.
    StyleAndComposition,
}

impl PromptLayers {
    /// The attentions it is limited to; `None` for all.
    pub fn attentions(self) -> Option<&'static [&'static str]> {
        const STYLE: &str = "up_blocks.0.attentions.1";
        const COMPOSITION: &str = "down_blocks.2.attentions.1";
        match self {
            PromptLayers::All => None,
            PromptLayers::Style => Some(&[STYLE]),
            PromptLayers::Composition => Some(&[COMPOSITION]),
            PromptLayers::StyleAndComposition => Some(&[COMPOSITION, STYLE]),
        }
    }

    /// Whether it acts in the attention at `path`.
    fn includes(self, path: &str) -> bool {
        self.attentions().is_none_or(|only| only.contains(&path))
    }
}

/// One adapter's image prompt of a request, encoded.
pub struct ImagePrompt {
    /// The adapter.
    pub adapter: Rc<IpAdapter>,
    /// [1, image tokens, cross]: each image's tokens in turn.
    pub tokens: Tensor,
    /// The negative image's tokens, the same shape.
    pub negative: Tensor,
    /// How many images the tokens are of.
    pub images: i64,
    /// Its weight in the layers it acts in.
    pub scale: f64,
    /// The layers it acts in.
    pub layers: PromptLayers,
    /// Where each image acts (any size; resized to the output's), or none: everywhere.
    pub masks: Vec<Arc<RgbImage>>,
}

impl Clone for ImagePrompt {
    fn clone(&self) -> Self {
        Self {
            adapter: self.adapter.clone(),
            tokens: self.tokens.shallow_clone(),
            negative: self.negative.shallow_clone(),
            images: self.images,
            scale: self.scale,
            layers: self.layers,
            masks: self.masks.clone(),
        }
    }
}

impl ImagePrompt {
    /// Encodes `images` (composited RGB) with `encoder` for `adapter`.
    pub fn encode(
        adapter: Rc<IpAdapter>,
        encoder: &ClipVisionModel,
        images: &[&RgbImage],
        scale: f64,
        layers: PromptLayers,
    ) -> Self {
        let _guard = tch::no_grad_guard();
        let size = encoder.config().image_size;
        let device = adapter.device;
        let pixels: Vec<Tensor> = images
            .iter()
            .map(|image| pixels::clip_pixels(image, size, device))
            .collect();
        let (tokens, negative) = adapter.image_tokens(encoder, &Tensor::cat(&pixels, 0));
        Self {
            adapter,
            tokens,
            negative,
            images: images.len() as i64,
            scale,
            layers,
            masks: Vec::new(),
        }
    }

    /// The prompt acting only where each image's mask is white (one mask per image).
    pub fn with_masks(self, masks: Vec<Arc<RgbImage>>) -> Self {
        Self { masks, ..self }
    }

    /// Its images' key and value entries in one layer of the adapter, from the batch's
    /// image tokens: all images attended together, or with masks each alone in its
    /// region (`regions`, one per image).
    fn layer_entries(
        &self,
        slot: usize,
        tokens: &Tensor,
        regions: &[Rc<RegionMask>],
        kind: Kind,
    ) -> Vec<ImageKv> {
        let Some(layer) = self.adapter.layers.get(slot) else {
            return Vec::new();
        };
        let key = layer.key.forward(tokens).to_kind(kind);
        let value = layer.value.forward(tokens).to_kind(kind);
        let scale = self.scale;
        if regions.is_empty() {
            let region = None;
            return vec![ImageKv {
                key,
                value,
                scale,
                region,
            }];
        }
        let per_image = key.size()[1] / self.images.max(1);
        regions
            .iter()
            .enumerate()
            .map(|(i, region)| ImageKv {
                key: key.narrow(1, i as i64 * per_image, per_image),
                value: value.narrow(1, i as i64 * per_image, per_image),
                scale,
                region: Some(region.clone()),
            })
            .collect()
    }
}

/// The keys and values of `prompts` for every layer of `unet_layers` (the UNet's, by
/// slot) each acts in, for `copies` images per part of `layout` of a `size` (width,
/// height) output, in `kind` (what the UNet's cross-attention layers add).
pub fn layer_keys(
    prompts: &[ImagePrompt],
    unet_layers: &[CrossAttentionLayer],
    (copies, size): (i64, (u32, u32)),
    layout: BatchLayout,
    kind: Kind,
) -> ImageKeys {
    let _guard = tch::no_grad_guard();
    let batches: Vec<Tensor> = prompts
        .iter()
        .map(|p| {
            let positive = p.tokens.repeat([copies, 1, 1]);
            let negative = p.negative.repeat([copies, 1, 1]);
            layout.assemble(&negative, &positive).to_kind(kind)
        })
        .collect();
    let regions: Vec<Vec<Rc<RegionMask>>> = prompts
        .iter()
        .map(|p| {
            let device = p.tokens.device();
            let region = |m: &Arc<RgbImage>| {
                let full = mask::output_mask(m, size.0, size.1).to_device(device);
                Rc::new(RegionMask::new(full, kind))
            };
            p.masks.iter().map(region).collect()
        })
        .collect();
    let layers = unet_layers
        .iter()
        .enumerate()
        .map(|(slot, layer)| {
            prompts
                .iter()
                .zip(batches.iter().zip(&regions))
                // diffusers skips an adapter of scale 0 in a layer.
                .filter(|(p, _)| p.scale != 0.0 && p.layers.includes(&layer.attention))
                .flat_map(|(p, (tokens, regions))| p.layer_entries(slot, tokens, regions, kind))
                .collect()
        })
        .collect();
    ImageKeys { layers }
}
