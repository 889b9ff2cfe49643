//! The conditioning of prompts in compel's syntax, as `CompelForSDXL` builds it: each
//! text encoder encodes its prompt and negative prompt with weights and without
//! truncation, all four padded with empty-prompt chunks to one length and joined along
//! the width; the pooled embeddings come from the second encoder on the raw texts
//! (truncated, unweighted), as compel computes them.

use tch::Tensor;

use super::prompt::{PromptEmbeds, PromptTokens, TextEmbeds};
use crate::engine::error::{EngineError, Result};
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};
use crate::engine::prompt_syntax::weighting::WeightedEncoder;
use crate::engine::prompt_syntax::{self, second_text, WeightedPrompt};

/// A (prompt, prompt_2) pair's texts.
pub(super) struct Texts<'a> {
    pub(super) first: &'a str,
    pub(super) second: &'a str,
}

impl SdxlPipeline {
    /// [`Self::encode_prompt_with`] for prompts in compel's syntax (multi-vector tokens
    /// expanded in each fragment, as compel's `DiffusersTextualInversionManager` does).
    pub(super) fn encode_weighted_prompt(
        &self,
        p: &GenerateParams,
        tokens: &PromptTokens,
    ) -> Result<PromptEmbeds> {
        let (first, second) = self.chunk_encoders(p, tokens, "compel's")?;
        let positive = pair(&p.prompt, p.prompt_2.as_deref());
        let guided = self.classifier_free(p.guidance_scale);
        let zeros = p.negative_prompt.is_none() && self.force_zeros_for_empty_prompt;
        let negative = (guided && !zeros).then(|| {
            let text = p.negative_prompt.as_deref().unwrap_or("");
            pair(text, p.negative_prompt_2.as_deref())
        });
        let mut embeds = vec![self.weighted_pair(first.as_ref(), &second, &positive)?];
        if let Some(negative) = &negative {
            embeds.push(self.weighted_pair(first.as_ref(), &second, negative)?);
        }
        let mut joined = join_padded(first.as_ref(), &second, embeds);
        let negative_embeds = if negative.is_some() {
            joined.pop()
        } else {
            None
        };
        let positive_embeds = joined
            .pop()
            .ok_or_else(|| EngineError::Internal("no prompt embeddings".into()))?;
        let pooled = self.raw_pooled(&positive, tokens)?;
        let negative = match (negative, negative_embeds) {
            (Some(texts), Some(embeds)) => Some((embeds, self.raw_pooled(&texts, tokens)?)),
            _ if guided => Some((positive_embeds.zeros_like(), pooled.zeros_like())),
            _ => None,
        };
        Ok(PromptEmbeds::of(TextEmbeds {
            embeds: positive_embeds,
            pooled,
            negative,
            attended: None,
        }))
    }

    /// The text encoders that encode prompts in chunks (the first absent on a refiner),
    /// with the job's textual inversion tokens; `clip_skip` is refused for `syntax`,
    /// whose chunks are read at the penultimate layer.
    pub(super) fn chunk_encoders<'a>(
        &'a self,
        p: &GenerateParams,
        tokens: &'a PromptTokens,
        syntax: &str,
    ) -> Result<(Option<WeightedEncoder<'a>>, WeightedEncoder<'a>)> {
        if p.clip_skip.unwrap_or(0) != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "`clip_skip` does not apply to prompts in {syntax} syntax"
            )));
        }
        let device = self.placement.device;
        let first = match (&self.tokenizer, &self.text_encoder) {
            (Some(t), Some(e)) => Some(WeightedEncoder::new(t, e, tokens.first.as_ref(), device)),
            _ => None,
        };
        let second = WeightedEncoder::new(
            &self.tokenizer_2,
            &self.text_encoder_2,
            tokens.second.as_ref(),
            device,
        );
        Ok((first, second))
    }

    /// Each encoder's embeddings of its text (the second encoder reads the first text
    /// when it is the only one, as diffusers pairs them).
    fn weighted_pair(
        &self,
        first: Option<&WeightedEncoder<'_>>,
        second: &WeightedEncoder<'_>,
        texts: &Texts<'_>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let parse = |text: &str| -> Result<WeightedPrompt> {
            prompt_syntax::parse(text)
                .map_err(|e| EngineError::InvalidRequest(format!("the prompt {e}")))
        };
        match first {
            Some(first) => Ok((
                Some(first.prompt(&parse(texts.first)?)?),
                second.prompt(&parse(texts.second)?)?,
            )),
            None => Ok((None, second.prompt(&parse(texts.first)?)?)),
        }
    }

    /// The pooled embedding of the second encoder's raw text, truncated as diffusers
    /// tokenizes it (compel's `get_pooled_embeddings`).
    fn raw_pooled(&self, texts: &Texts<'_>, tokens: &PromptTokens) -> Result<Tensor> {
        let text = if self.text_encoder.is_some() {
            texts.second
        } else {
            texts.first
        };
        let out = self.encode_text(
            &self.tokenizer_2,
            &self.text_encoder_2,
            tokens.second.as_ref(),
            text,
            0,
        )?;
        out.pooled.ok_or_else(|| {
            EngineError::InvalidRequest("text_encoder_2 has no pooled projection".into())
        })
    }
}

pub(super) fn pair<'a>(text: &'a str, text_2: Option<&'a str>) -> Texts<'a> {
    Texts {
        first: text,
        second: second_text(text, text_2),
    }
}

/// Every encoder's embeddings padded with its empty chunks to the longest, then each
/// pair joined along the width.
pub(super) fn join_padded(
    first: Option<&WeightedEncoder<'_>>,
    second: &WeightedEncoder<'_>,
    embeds: Vec<(Option<Tensor>, Tensor)>,
) -> Vec<Tensor> {
    let longest = embeds
        .iter()
        .flat_map(|(a, b)| a.iter().chain(std::iter::once(b)))
        .map(|t| t.size()[1])
        .max()
        .unwrap_or(0);
    embeds
        .into_iter()
        .map(|(a, b)| {
            let b = second.pad_to(&b, longest);
            match (a, first) {
                (Some(a), Some(first)) => Tensor::cat(&[first.pad_to(&a, longest), b], -1),
                _ => b,
            }
        })
        .collect()
}
