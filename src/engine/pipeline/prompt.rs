//! The conditioning of a request: diffusers' `encode_prompt` for the SDXL pipelines and
//! SDXL's micro-conditioning time ids.

use tch::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::ip_adapter::ImagePrompt;
use crate::engine::models::clip::{ClipTextModel, TextEncoderOutput};
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};
use crate::engine::profile;
use crate::engine::prompt_syntax::{second_text, PromptSyntax};
use crate::engine::textual_inversion::{Embedding, EncoderTokens};

/// The conditioning of one request on one pipeline (its prompts' embeddings and its
/// image prompts), computed once and used for every image of the request.
pub struct PromptEmbeds {
    /// The embeddings of its (first) text.
    pub text: TextEmbeds,
    /// IP-Adapter image prompts (the job adds them once encoded).
    pub images: Vec<ImagePrompt>,
    /// The texts a prompt changes to during sampling (A1111's prompt editing and
    /// alternation); none for a prompt that does not change.
    pub later: LaterTexts,
    /// The weights that scale each prompt part's guidance (A1111's composable prompts),
    /// one per row of the texts' embeddings.
    pub weights: Vec<f64>,
}

impl PromptEmbeds {
    /// The conditioning of one text whose prompt is one part of weight 1.
    pub fn of(text: TextEmbeds) -> Self {
        Self {
            text,
            images: Vec::new(),
            later: LaterTexts::default(),
            weights: vec![1.0],
        }
    }
}

/// One text's embeddings: the prompt's (a row per prompt part) and the negative's.
pub struct TextEmbeds {
    /// [parts, tokens, cross_attention_dim] hidden states of the prompt (one row per
    /// sub-prompt of a composable prompt, else one).
    pub embeds: Tensor,
    /// [parts, projection_dim] pooled embeddings of the prompt.
    pub pooled: Tensor,
    /// The negative pair ([1, tokens, width], [1, width]), with classifier-free guidance
    /// only.
    pub negative: Option<(Tensor, Tensor)>,
    /// Where prompt and negative were encoded to different lengths and the shorter padded
    /// to the longer, the tokens each attends to (A1111 runs the two apart); `None`: all.
    pub attended: Option<Attended>,
}

/// How many of their tokens the prompt's and the negative's rows attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attended {
    pub prompt: i64,
    pub negative: i64,
}

/// The texts after the first of a prompt that changes during sampling, and when each
/// applies.
#[derive(Default)]
pub struct LaterTexts {
    /// Their embeddings.
    pub texts: Vec<TextEmbeds>,
    /// In step order, from which step on which text applies: 0 the first text, `k` the
    /// k-th of `texts`. Steps count from the run's first, as A1111 counts them (its
    /// sampler's model calls); a run continuing another at `denoising_start` counts
    /// from the schedule's first.
    pub switches: Vec<(usize, usize)>,
}

/// A job's textual inversion embeddings for one pipeline's text encoders (absent for an
/// encoder the pipeline does not have).
#[derive(Default)]
pub struct PromptTokens {
    pub(super) first: Option<EncoderTokens>,
    pub(super) second: Option<EncoderTokens>,
}

impl SdxlPipeline {
    /// The tokens of `embeddings` for this pipeline's text encoders.
    pub fn prompt_tokens(&self, embeddings: &[Embedding]) -> Result<PromptTokens> {
        if embeddings.is_empty() {
            return Ok(PromptTokens::default());
        }
        let first = match (&self.tokenizer, &self.text_encoder) {
            (Some(tok), Some(enc)) => Some(EncoderTokens::new(tok, enc, 0, embeddings)?),
            _ => None,
        };
        let second = EncoderTokens::new(&self.tokenizer_2, &self.text_encoder_2, 1, embeddings)?;
        Ok(PromptTokens {
            first,
            second: Some(second),
        })
    }

    /// Whether a pass at `guidance_scale` runs classifier-free guidance: above 1, unless
    /// the UNet is guidance-distilled (diffusers' `do_classifier_free_guidance`).
    pub fn classifier_free(&self, guidance_scale: f64) -> bool {
        guidance_scale > 1.0 && self.unet.time_cond_proj_dim().is_none()
    }

    /// diffusers' `encode_prompt`: positive and (with classifier-free guidance) negative
    /// embeddings.
    pub fn encode_prompt(&self, p: &GenerateParams) -> Result<PromptEmbeds> {
        self.encode_prompt_with(p, &PromptTokens::default())
    }

    /// [`Self::encode_prompt`] with a job's textual inversion `tokens`.
    pub fn encode_prompt_with(
        &self,
        p: &GenerateParams,
        tokens: &PromptTokens,
    ) -> Result<PromptEmbeds> {
        let _no_grad = tch::no_grad_guard();
        let _stage = profile::span("text_encoders");
        match p.prompt_syntax {
            PromptSyntax::Compel => return self.encode_weighted_prompt(p, tokens),
            PromptSyntax::A1111 => return self.encode_a1111_prompt(p, tokens),
            PromptSyntax::Plain => {}
        }
        let prompt_2 = second_text(&p.prompt, p.prompt_2.as_deref());
        let clip_skip = p.clip_skip.unwrap_or(0);
        let (embeds, pooled) = self.encode_pair(&p.prompt, prompt_2, clip_skip, tokens)?;
        if !self.classifier_free(p.guidance_scale) {
            return Ok(PromptEmbeds::of(TextEmbeds {
                embeds,
                pooled,
                negative: None,
                attended: None,
            }));
        }
        let negative = if p.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            (embeds.zeros_like(), pooled.zeros_like())
        } else {
            let negative = p.negative_prompt.as_deref().unwrap_or("");
            let negative_2 = second_text(negative, p.negative_prompt_2.as_deref());
            // diffusers encodes negatives at the penultimate layer whatever clip_skip is.
            self.encode_pair(negative, negative_2, 0, tokens)?
        };
        Ok(PromptEmbeds::of(TextEmbeds {
            embeds,
            pooled,
            negative: Some(negative),
            attended: None,
        }))
    }

    /// Runs the text encoders on one (prompt, prompt_2) pair: the concatenated hidden
    /// states [1, 77, cross_dim] and the pooled embedding [1, projection_dim].
    fn encode_pair(
        &self,
        prompt: &str,
        prompt_2: &str,
        clip_skip: i64,
        tokens: &PromptTokens,
    ) -> Result<(Tensor, Tensor)> {
        let mut hidden = Vec::with_capacity(2);
        let second_text = match (&self.tokenizer, &self.text_encoder) {
            (Some(tok), Some(enc)) => {
                let out = self.encode_text(tok, enc, tokens.first.as_ref(), prompt, clip_skip)?;
                hidden.push(out.hidden);
                prompt_2
            }
            // diffusers pairs the prompts with the encoders present: a pipeline with only
            // the second encoder (the refiner) gives it the first prompt.
            _ => prompt,
        };
        let out = self.encode_text(
            &self.tokenizer_2,
            &self.text_encoder_2,
            tokens.second.as_ref(),
            second_text,
            clip_skip,
        )?;
        hidden.push(out.hidden);
        let pooled = out.pooled.ok_or_else(|| {
            EngineError::InvalidRequest("text_encoder_2 has no pooled projection".into())
        })?;
        Ok((Tensor::cat(&hidden, -1), pooled))
    }

    /// One text encoder on `text`, with the job's tokens for it when it has embeddings.
    pub(super) fn encode_text(
        &self,
        tokenizer: &ClipTokenizer,
        encoder: &ClipTextModel,
        tokens: Option<&EncoderTokens>,
        text: &str,
        clip_skip: i64,
    ) -> Result<TextEncoderOutput> {
        let ids = match tokens {
            Some(t) => t.ids(text)?,
            None => tokenizer.encode(text)?,
        };
        let ids = Tensor::from_slice(&ids)
            .unsqueeze(0)
            .to_device(self.placement.device);
        encoder.forward_with(&ids, clip_skip, tokens.map(EncoderTokens::added))
    }

    /// Tokens of `prompt` beyond what the tokenizers keep (0 when it fits), after the
    /// expansion of `tokens`' multi-vector tokens.
    pub fn prompt_overflow(&self, prompt: &str, tokens: &PromptTokens) -> Result<usize> {
        let count = |tok: &ClipTokenizer, added: Option<&EncoderTokens>| match added {
            Some(t) => t.overflow(prompt),
            None => Ok(tok.overflow(prompt)),
        };
        let first = match &self.tokenizer {
            Some(t) => count(t, tokens.first.as_ref())?,
            None => 0,
        };
        Ok(first.max(count(&self.tokenizer_2, tokens.second.as_ref())?))
    }

    /// The deepest `clip_skip` the text encoders take: their shallowest depth less one
    /// (diffusers reads `hidden_states[-(clip_skip + 2)]` of each encoder).
    pub fn max_clip_skip(&self) -> i64 {
        let second = self.text_encoder_2.config().num_hidden_layers;
        let first = self
            .text_encoder
            .as_ref()
            .map_or(second, |t| t.config().num_hidden_layers);
        first.min(second) - 1
    }

    /// The micro-conditioning (positive, negative) time ids. Text to image uses the
    /// negative sizes only when both are given; image-based starts default each negative
    /// to its positive, and models with `requires_aesthetics_score` take an aesthetic
    /// score in place of the target size, as diffusers' img2img pipeline does.
    pub(super) fn time_ids(&self, p: &GenerateParams, image_based: bool) -> (Tensor, Tensor) {
        let ids = |values: [f64; 6]| Tensor::from_slice(&values.map(|v| v as f32)).unsqueeze(0);
        let ids5 = |values: [f64; 5]| Tensor::from_slice(&values.map(|v| v as f32)).unsqueeze(0);
        let size = (p.height, p.width);
        let original = p.original_size.unwrap_or(size);
        let target = p.target_size.unwrap_or(size);
        let crop = p.crops_coords_top_left;
        let f = |v: i64| v as f64;
        let positive = [original.0, original.1, crop.0, crop.1, target.0, target.1].map(f);
        if !image_based {
            let negative = match (p.negative_original_size, p.negative_target_size) {
                (Some(o), Some(t)) => {
                    let c = p.negative_crops_coords_top_left;
                    [o.0, o.1, c.0, c.1, t.0, t.1].map(f)
                }
                _ => positive,
            };
            return (ids(positive), ids(negative));
        }
        let negative_original = p.negative_original_size.unwrap_or(original);
        let negative_target = p.negative_target_size.unwrap_or(target);
        if self.requires_aesthetics_score {
            let c = p.negative_crops_coords_top_left;
            (
                ids5([
                    f(original.0),
                    f(original.1),
                    f(crop.0),
                    f(crop.1),
                    p.aesthetic_score,
                ]),
                ids5([
                    f(negative_original.0),
                    f(negative_original.1),
                    f(c.0),
                    f(c.1),
                    p.negative_aesthetic_score,
                ]),
            )
        } else {
            // diffusers' img2img and inpainting pipelines pair the negative sizes with
            // the positive crop.
            let (o, t) = (negative_original, negative_target);
            (
                ids(positive),
                ids([o.0, o.1, crop.0, crop.1, t.0, t.1].map(f)),
            )
        }
    }
}
