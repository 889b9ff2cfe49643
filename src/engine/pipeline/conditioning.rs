//! What the UNet is conditioned on at every call of a denoising run: the prompts'
//! embeddings and micro-conditioning, image prompts, ControlNet units, laid out for the
//! run's guidance; and the prompt's part alone for the calls a guider leaves unguided,
//! which diffusers' guiders run without the negative prompt's batch.

use tch::{Device, Kind, Tensor};

use crate::engine::guidance::BatchLayout;
use crate::engine::guider::GuiderRun;
use crate::engine::ip_adapter::layer_keys;
use crate::engine::models::attention::ImageKeys;
use crate::engine::models::embeddings::guidance_scale_embedding;
use crate::engine::pipeline::control::Controls;
use crate::engine::pipeline::prompt::Attended;
use crate::engine::pipeline::{GenerateParams, PromptEmbeds, SdxlPipeline, TextEmbeds};

/// The UNet's conditioning for every call of one run, its batch laid out by `layout`.
pub(super) struct Conditioning<'a> {
    /// The prompts' token embeddings, [batch, tokens, width].
    pub context: Tensor,
    /// The pooled embeddings of the second text encoder, [batch, width].
    pub text_embeds: Tensor,
    /// Where the rows attend to token counts of their own: [batch, 1, 1, tokens], true
    /// where a row attends.
    pub text_mask: Option<Tensor>,
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
    /// The prompt parts' guidance weights.
    pub weights: Vec<f64>,
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
        let place = |t: Tensor| {
            t.to_device(self.placement.device)
                .to_kind(self.placement.kind)
        };
        let (context, text_embeds, text_mask) = self.text_conditioning(&prompt.text, n, layout);
        let time_ids = add_time_ids.repeat([n, 1]);
        let time_ids = match &prompt.text.negative {
            Some(_) => layout.assemble(&negative_time_ids.repeat([n, 1]), &time_ids),
            None => layout.repeat(&time_ids),
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
            context,
            text_embeds,
            text_mask,
            time_ids: place(time_ids),
            layout,
            perturbed_slots,
            images,
            controls,
            timestep_cond,
            weights: prompt.weights.clone(),
        }
    }

    /// One text's token and pooled embeddings for every image, laid out by `layout`, on
    /// the placement: each prompt part (a row of the text's embeddings) for all images;
    /// and where prompt and negative attend to token counts of their own, which tokens
    /// each row attends to.
    fn text_conditioning(
        &self,
        text: &TextEmbeds,
        n: i64,
        layout: BatchLayout,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let per_image = |t: &Tensor| t.repeat_interleave_self_int(n, Some(0), None);
        let place = |t: Tensor| {
            t.to_device(self.placement.device)
                .to_kind(self.placement.kind)
        };
        let (embeds, pooled) = (per_image(&text.embeds), per_image(&text.pooled));
        let (context, text_embeds) = match &text.negative {
            Some((neg_embeds, neg_pooled)) => (
                layout.assemble_prompts(&per_image(neg_embeds), &embeds),
                layout.assemble_prompts(&per_image(neg_pooled), &pooled),
            ),
            None => (
                layout.assemble_prompts(&embeds, &embeds),
                layout.assemble_prompts(&pooled, &pooled),
            ),
        };
        let tokens = context.size()[1];
        let mask = text
            .attended
            .filter(|_| layout.negative)
            .map(|attended| attention_mask(attended, (n, tokens), layout))
            .map(|mask| mask.to_device(self.placement.device));
        (place(context), place(text_embeds), mask)
    }

    /// The conditioning of a run on `prompt`: `first` (for its first text) with the
    /// prompt's later texts swapped in from their steps on, counted from schedule index
    /// `origin`.
    pub(super) fn run_conditioning<'a>(
        &self,
        first: Conditioning<'a>,
        prompt: &PromptEmbeds,
        (n, origin): (i64, usize),
        guider: Option<&GuiderRun>,
    ) -> RunConditioning<'a> {
        let later: Vec<Conditioning<'a>> = prompt
            .later
            .texts
            .iter()
            .map(|text| first.with_text(self.text_conditioning(text, n, first.layout)))
            .collect();
        let texts = std::iter::once(first)
            .chain(later)
            .map(|guided| {
                let unguided = guider.and_then(|_| guided.prompt_only());
                (guided, unguided)
            })
            .collect();
        RunConditioning {
            texts,
            switches: prompt.later.switches.clone(),
            origin,
        }
    }
}

impl<'a> Conditioning<'a> {
    /// This conditioning with another text's embeddings and mask (views of the rest).
    fn with_text(
        &self,
        (context, text_embeds, text_mask): (Tensor, Tensor, Option<Tensor>),
    ) -> Conditioning<'a> {
        Conditioning {
            context,
            text_embeds,
            text_mask,
            time_ids: self.time_ids.shallow_clone(),
            layout: self.layout,
            perturbed_slots: self.perturbed_slots.clone(),
            images: self
                .images
                .as_ref()
                .map(|keys| keys.with_batches(Tensor::shallow_clone)),
            controls: self.controls.view(),
            timestep_cond: self.timestep_cond.as_ref().map(Tensor::shallow_clone),
            weights: self.weights.clone(),
        }
    }

    /// The conditioning of the prompt's part of the batch alone (views of this one's
    /// tensors), when the batch has a negative part, one prompt part and no perturbed
    /// one.
    fn prompt_only(&self) -> Option<Conditioning<'a>> {
        let layout = self.layout;
        if !layout.negative || layout.perturbed || layout.prompts > 1 {
            return None;
        }
        let part = |t: &Tensor| layout.prompt_part(t);
        Some(Conditioning {
            context: part(&self.context),
            text_embeds: part(&self.text_embeds),
            text_mask: self.text_mask.as_ref().map(part),
            time_ids: part(&self.time_ids),
            layout: BatchLayout::PROMPT_ONLY,
            perturbed_slots: None,
            images: self.images.as_ref().map(|keys| keys.with_batches(part)),
            controls: self.controls.prompt_only(),
            timestep_cond: self.timestep_cond.as_ref().map(Tensor::shallow_clone),
            weights: self.weights.iter().take(1).copied().collect(),
        })
    }
}

/// A run's conditioning for its guided calls, and for the calls its guider leaves
/// unguided: those see the prompt's part alone, so the negative prompt's half of the
/// batch is not computed only to be discarded. A prompt that changes during sampling
/// has both for each of its texts.
pub(super) struct RunConditioning<'a> {
    /// Per text: guided, and the prompt's part for a run with a guider.
    texts: Vec<(Conditioning<'a>, Option<Conditioning<'a>>)>,
    /// From which step on which text applies (none: the first throughout).
    switches: Vec<(usize, usize)>,
    /// The schedule index the steps count from.
    origin: usize,
}

impl<'a> RunConditioning<'a> {
    /// The conditioning of the model call at schedule index `index`.
    pub fn at(&self, index: usize, guider: Option<&GuiderRun>) -> &Conditioning<'a> {
        let step = index.saturating_sub(self.origin);
        let text = self
            .switches
            .iter()
            .rev()
            .find(|(from, _)| *from <= step)
            .map_or(0, |(_, text)| *text);
        let (guided, unguided) = &self.texts[text.min(self.texts.len() - 1)];
        match (unguided, guider) {
            (Some(unguided), Some(run)) if !run.guides_call(index) => unguided,
            _ => guided,
        }
    }
}

/// Which of `tokens` tokens each row of a batch of `n` images a part, laid out by
/// `layout`, attends to: the negative's rows to its own count, the prompt's to theirs
/// ([rows, 1, 1, tokens], true where a row attends).
fn attention_mask(attended: Attended, (n, tokens): (i64, i64), layout: BatchLayout) -> Tensor {
    let counts = |count: i64, rows: i64| Tensor::full([rows], count, (Kind::Int64, Device::Cpu));
    let rows = layout.assemble_prompts(
        &counts(attended.negative, n),
        &counts(attended.prompt, n * layout.prompts),
    );
    let positions = Tensor::arange(tokens, (Kind::Int64, Device::Cpu));
    positions
        .unsqueeze(0)
        .lt_tensor(&rows.unsqueeze(1))
        .view([-1, 1, 1, tokens])
}
