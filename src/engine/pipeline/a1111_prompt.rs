//! The conditioning of prompts in AUTOMATIC1111's syntax, as A1111 builds it for SDXL:
//! each text encoder encodes its prompt in chunks with A1111's emphasis, the chunks
//! joined along the tokens and both encoders' along the width; the pooled embedding is
//! the second encoder's of the first chunk. An empty negative prompt is zeros, as A1111
//! makes it for SDXL; another is encoded the same way, and the shorter of prompt and
//! negative is padded with the empty prompt's chunks, as A1111 pads them with "Pad
//! prompt/negative prompt to be same length" on.

use tch::Tensor;

use super::prompt::{PromptEmbeds, PromptTokens};
use super::weighted_prompt::{join_padded, pair, Texts};
use crate::engine::error::{EngineError, Result};
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};
use crate::engine::prompt_syntax::a1111;
use crate::engine::prompt_syntax::weighting::WeightedEncoder;

/// One pair's hidden states per encoder and its pooled embedding.
struct Encoded {
    first: Option<Tensor>,
    second: Tensor,
    pooled: Tensor,
}

impl SdxlPipeline {
    /// [`Self::encode_prompt_with`] for prompts in A1111's syntax.
    pub(super) fn encode_a1111_prompt(
        &self,
        p: &GenerateParams,
        tokens: &PromptTokens,
    ) -> Result<PromptEmbeds> {
        let (first, second) = self.chunk_encoders(p, tokens, "A1111's")?;
        let guided = self.classifier_free(p.guidance_scale);
        let negative = p.negative_prompt.as_deref().unwrap_or("");
        let negative = pair(negative, p.negative_prompt_2.as_deref());
        // A1111 conditions SDXL on zeros where the negative prompt is empty (its
        // `force_zero_negative_prompt`); the texts the encoders read decide.
        let zero_negative =
            negative.first.is_empty() && (first.is_none() || negative.second.is_empty());
        let mut pairs = vec![pair(&p.prompt, p.prompt_2.as_deref())];
        if guided && !zero_negative {
            pairs.push(negative);
        }
        let mut encoded = Vec::with_capacity(pairs.len());
        for texts in &pairs {
            encoded.push(a1111_pair(first.as_ref(), &second, texts)?);
        }
        let pooled: Vec<Tensor> = encoded.iter().map(|e| e.pooled.shallow_clone()).collect();
        let hidden = encoded.into_iter().map(|e| (e.first, e.second)).collect();
        let mut joined = join_padded(first.as_ref(), &second, hidden).into_iter();
        let embeds = joined
            .next()
            .ok_or_else(|| EngineError::Internal("no prompt embeddings".into()))?;
        let pooled_prompt = pooled[0].shallow_clone();
        let negative = match joined.next().zip(pooled.get(1).map(Tensor::shallow_clone)) {
            Some(encoded) => Some(encoded),
            // Zero keys and values: the same attention whatever the length.
            None if guided => Some((embeds.zeros_like(), pooled_prompt.zeros_like())),
            None => None,
        };
        Ok(PromptEmbeds {
            embeds,
            pooled: pooled_prompt,
            negative,
            images: Vec::new(),
        })
    }
}

/// Each encoder's embeddings of its text (the second encoder reads the first text when
/// it is the only one, as diffusers pairs them).
fn a1111_pair(
    first: Option<&WeightedEncoder<'_>>,
    second: &WeightedEncoder<'_>,
    texts: &Texts<'_>,
) -> Result<Encoded> {
    let parse = |text: &str| {
        a1111::parse(text).map_err(|e| EngineError::InvalidRequest(format!("the prompt {e}")))
    };
    let (first, second_text) = match first {
        Some(first) => (
            Some(first.a1111_prompt(&parse(texts.first)?)?.0),
            texts.second,
        ),
        None => (None, texts.first),
    };
    let (hidden, pooled) = second.a1111_prompt(&parse(second_text)?)?;
    let pooled = pooled.ok_or_else(|| {
        EngineError::InvalidRequest("text_encoder_2 has no pooled projection".into())
    })?;
    Ok(Encoded {
        first,
        second: hidden,
        pooled,
    })
}
