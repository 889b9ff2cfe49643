//! What the UNet is conditioned on at every call of a denoising run: the prompts'
//! embeddings and micro-conditioning, image prompts, ControlNet units, laid out for the
//! run's guidance; and the prompt's part alone for the calls a guider leaves unguided,
//! which diffusers' guiders run without the negative prompt's batch.

use tch::Tensor;

use crate::engine::guidance::BatchLayout;
use crate::engine::guider::GuiderRun;
use crate::engine::ip_adapter::layer_keys;
use crate::engine::models::attention::ImageKeys;
use crate::engine::models::embeddings::guidance_scale_embedding;
use crate::engine::pipeline::control::Controls;
use crate::engine::pipeline::{GenerateParams, PromptEmbeds, SdxlPipeline};

/// The UNet's conditioning for every call of one run, its batch laid out by `layout`.
pub(super) struct Conditioning<'a> {
    /// The prompts' token embeddings, [batch, tokens, width].
    pub context: Tensor,
    /// The pooled embeddings of the second text encoder, [batch, width].
    pub text_embeds: Tensor,
    /// Micro-conditioning, [batch, 6] (5 with aesthetic scores).
    pub time_ids: Tensor,
    /// The batch's parts.
    pub layout: BatchLayout,
    /// With perturbed-attention guidance: by cross-attention slot, whether that block's
    /// self-attention is perturbed.
    pub perturbed_slots: Option<Vec<bool>>,
    /// The image prompts' keys and values per cross-attention layer, when there are any.
    pub images: Option<ImageKeys>,
    /// The ControlNet units.
    pub controls: Controls<'a>,
    /// A guidance-distilled UNet's guidance-scale embedding ([1, dim]).
    pub timestep_cond: Option<Tensor>,
}

impl SdxlPipeline {
    /// The prompt embeddings and micro-conditioning of every image of `p`, at the
    /// placement, laid out by `layout`.
    pub(super) fn conditioning<'a>(
        &self,
        p: &GenerateParams,
        prompt: &PromptEmbeds,
        image_based: bool,
        (layout, controls): (BatchLayout, Controls<'a>),
    ) -> Conditioning<'a> {
        let n = p.num_images as i64;
        let (add_time_ids, negative_time_ids) = self.time_ids(p, image_based);
        let repeat = |t: &Tensor| t.repeat([n, 1, 1][..t.dim()].to_vec());
        let place = |t: Tensor| {
            t.to_device(self.placement.device)
                .to_kind(self.placement.kind)
        };
        let (embeds, pooled) = (repeat(&prompt.embeds), repeat(&prompt.pooled));
        let time_ids = add_time_ids.repeat([n, 1]);
        let (context, text_embeds, time_ids) = match &prompt.negative {
            Some((neg_embeds, neg_pooled)) => (
                layout.assemble(&repeat(neg_embeds), &embeds),
                layout.assemble(&repeat(neg_pooled), &pooled),
                layout.assemble(&negative_time_ids.repeat([n, 1]), &time_ids),
            ),
            None => (
                layout.repeat(&embeds),
                layout.repeat(&pooled),
                layout.repeat(&time_ids),
            ),
        };
        let layers = self.unet.cross_attention_layers();
        let size = (p.width as u32, p.height as u32);
        let images = (!prompt.images.is_empty()).then(|| {
            layer_keys(
                &prompt.images,
                layers,
                (n, size),
                layout,
                self.placement.kind,
            )
        });
        let perturbed_slots = p.pag.as_ref().map(|pag| {
            let names = self.unet.self_attentions();
            names.iter().map(|name| pag.perturbs(name)).collect()
        });
        // diffusers embeds guidance_scale - 1 for a guidance-distilled UNet.
        let timestep_cond = self
            .unet
            .time_cond_proj_dim()
            .map(|dim| place(guidance_scale_embedding(p.guidance_scale - 1.0, dim)));
        Conditioning {
            context: place(context),
            text_embeds: place(text_embeds),
            time_ids: place(time_ids),
            layout,
            perturbed_slots,
            images,
            controls,
            timestep_cond,
        }
    }
}

impl<'a> Conditioning<'a> {
    /// The conditioning of the prompt's part of the batch alone (views of this one's
    /// tensors), when the batch has a negative part and no perturbed one.
    fn prompt_only(&self) -> Option<Conditioning<'a>> {
        let layout = self.layout;
        if !layout.negative || layout.perturbed {
            return None;
        }
        let part = |t: &Tensor| layout.prompt_part(t);
        Some(Conditioning {
            context: part(&self.context),
            text_embeds: part(&self.text_embeds),
            time_ids: part(&self.time_ids),
            layout: BatchLayout::PROMPT_ONLY,
            perturbed_slots: None,
            images: self.images.as_ref().map(|keys| keys.with_batches(part)),
            controls: self.controls.prompt_only(),
            timestep_cond: self.timestep_cond.as_ref().map(Tensor::shallow_clone),
        })
    }
}

/// A run's conditioning for its guided calls, and for the calls its guider leaves
/// unguided: those see the prompt's part alone, so the negative prompt's half of the
/// batch is not computed only to be discarded.
pub(super) struct RunConditioning<'a> {
    guided: Conditioning<'a>,
    unguided: Option<Conditioning<'a>>,
}

impl<'a> RunConditioning<'a> {
    /// `guided`, and its prompt's part for a run with a guider.
    pub fn new(guided: Conditioning<'a>, guider: Option<&GuiderRun>) -> Self {
        let unguided = guider.and_then(|_| guided.prompt_only());
        Self { guided, unguided }
    }

    /// The conditioning of the model call at schedule index `index`.
    pub fn at(&self, index: usize, guider: Option<&GuiderRun>) -> &Conditioning<'a> {
        match (&self.unguided, guider) {
            (Some(unguided), Some(run)) if !run.guides_call(index) => unguided,
            _ => &self.guided,
        }
    }
}
