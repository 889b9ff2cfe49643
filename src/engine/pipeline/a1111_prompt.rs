//! The conditioning of prompts in AUTOMATIC1111's syntax, as A1111 builds it for SDXL:
//! each text encoder encodes its prompt in chunks with A1111's emphasis, the chunks
//! joined along the tokens and both encoders' along the width; the pooled embedding is
//! the second encoder's of the first chunk. An empty negative prompt is zeros, as A1111
//! makes it for SDXL; another is encoded the same way, and the shorter of prompt and
//! negative is padded with the empty prompt's chunks, as A1111 pads them with "Pad
//! prompt/negative prompt to be same length" on. A prompt with edits or alternations
//! is one such conditioning per text it reads, each from the step A1111 reads it at.

use std::collections::HashMap;

use tch::Tensor;

use super::prompt::{LaterTexts, PromptEmbeds, PromptTokens, TextEmbeds};
use super::weighted_prompt::{join_padded, pair, Texts};
use crate::engine::error::{EngineError, Result};
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};
use crate::engine::prompt_syntax::a1111;
use crate::engine::prompt_syntax::a1111_schedule::{text_at, Schedule, StepClock};
use crate::engine::prompt_syntax::weighting::WeightedEncoder;

/// One pair's hidden states per encoder and its pooled embedding.
struct Encoded {
    first: Option<Tensor>,
    second: Tensor,
    pooled: Tensor,
}

/// The schedules of a request's texts: prompt and negative, each for both encoders
/// (the second encoder's is `prompt_2`'s where that is given, else the prompt's).
struct RequestSchedules {
    prompt: [Schedule; 2],
    negative: [Schedule; 2],
}

impl RequestSchedules {
    fn new(p: &GenerateParams, clock: StepClock) -> Result<Self> {
        let schedule = |text: &str| {
            a1111::schedule(text, clock)
                .map_err(|e| EngineError::InvalidRequest(format!("the prompt {e}")))
        };
        let negative = p.negative_prompt.as_deref().unwrap_or("");
        let prompt = pair(&p.prompt, p.prompt_2.as_deref());
        let negative = pair(negative, p.negative_prompt_2.as_deref());
        Ok(Self {
            prompt: [schedule(prompt.first)?, schedule(prompt.second)?],
            negative: [schedule(negative.first)?, schedule(negative.second)?],
        })
    }

    /// The first step of each stretch of steps in which no text changes.
    fn stretches(&self) -> Vec<usize> {
        let mut lasts: Vec<usize> = self
            .prompt
            .iter()
            .chain(&self.negative)
            .flat_map(|s| s.iter().map(|(last, _)| *last))
            .collect();
        lasts.sort_unstable();
        lasts.dedup();
        lasts.pop();
        std::iter::once(0)
            .chain(lasts.into_iter().map(|last| last + 1))
            .collect()
    }

    /// The texts read at `step`: the prompt's and the negative's.
    fn at(&self, step: usize) -> [Texts<'_>; 2] {
        [&self.prompt, &self.negative].map(|s| Texts {
            first: text_at(&s[0], step),
            second: text_at(&s[1], step),
        })
    }
}

/// The encoders and the embeddings of the texts they encoded so far.
struct CachedEncoders<'a> {
    first: Option<WeightedEncoder<'a>>,
    second: WeightedEncoder<'a>,
    /// By encoder (0, 1) and text: hidden states and pooled embedding.
    cache: HashMap<(usize, String), (Tensor, Option<Tensor>)>,
}

impl CachedEncoders<'_> {
    /// One encoder's embeddings of `text`, encoded once per text.
    fn encode(&mut self, encoder: usize, text: &str) -> Result<(Tensor, Option<Tensor>)> {
        let key = (encoder, text.to_string());
        if let Some((hidden, pooled)) = self.cache.get(&key) {
            return Ok((
                hidden.shallow_clone(),
                pooled.as_ref().map(Tensor::shallow_clone),
            ));
        }
        let fragments = a1111::parse(text)
            .map_err(|e| EngineError::InvalidRequest(format!("the prompt {e}")))?;
        let model = match (encoder, &self.first) {
            (0, Some(first)) => first,
            _ => &self.second,
        };
        let (hidden, pooled) = model.a1111_prompt(&fragments)?;
        let copy = (
            hidden.shallow_clone(),
            pooled.as_ref().map(Tensor::shallow_clone),
        );
        self.cache.insert(key, copy);
        Ok((hidden, pooled))
    }

    /// Each encoder's embeddings of its text (the second encoder reads the first text
    /// when it is the only one, as diffusers pairs them).
    fn pair(&mut self, texts: &Texts<'_>) -> Result<Encoded> {
        let (first, second_text) = match self.first {
            Some(_) => (Some(self.encode(0, texts.first)?.0), texts.second),
            None => (None, texts.first),
        };
        let (second, pooled) = self.encode(1, second_text)?;
        let pooled = pooled.ok_or_else(|| {
            EngineError::InvalidRequest("text_encoder_2 has no pooled projection".into())
        })?;
        Ok(Encoded {
            first,
            second,
            pooled,
        })
    }

    /// The conditioning of one stretch's prompt and (under guidance) negative texts.
    fn text_embeds(
        &mut self,
        [prompt, negative]: [Texts<'_>; 2],
        guided: bool,
    ) -> Result<TextEmbeds> {
        // A1111 conditions SDXL on zeros where the negative prompt is empty (its
        // `force_zero_negative_prompt`); the texts the encoders read decide.
        let zero_negative =
            negative.first.is_empty() && (self.first.is_none() || negative.second.is_empty());
        let mut encoded = vec![self.pair(&prompt)?];
        if guided && !zero_negative {
            encoded.push(self.pair(&negative)?);
        }
        let pooled: Vec<Tensor> = encoded.iter().map(|e| e.pooled.shallow_clone()).collect();
        let hidden = encoded.into_iter().map(|e| (e.first, e.second)).collect();
        let mut joined = join_padded(self.first.as_ref(), &self.second, hidden).into_iter();
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
        Ok(TextEmbeds {
            embeds,
            pooled: pooled_prompt,
            negative,
        })
    }
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
        let schedules = RequestSchedules::new(p, self.prompt_clock(p)?)?;
        let mut encoders = CachedEncoders {
            first,
            second,
            cache: HashMap::new(),
        };
        // Each stretch's conditioning, the same tensors for the same texts.
        let mut texts: Vec<TextEmbeds> = Vec::new();
        let mut index_of: HashMap<[&str; 4], usize> = HashMap::new();
        let mut switches: Vec<(usize, usize)> = Vec::new();
        for step in schedules.stretches() {
            let read = schedules.at(step);
            let key = [read[0].first, read[0].second, read[1].first, read[1].second];
            let index = match index_of.get(&key) {
                Some(&index) => index,
                None => {
                    texts.push(encoders.text_embeds(read, guided)?);
                    index_of.insert(key, texts.len() - 1);
                    texts.len() - 1
                }
            };
            if switches.last().is_none_or(|&(_, last)| last != index) {
                switches.push((step, index));
            }
        }
        let mut texts = texts.into_iter();
        let first = texts
            .next()
            .ok_or_else(|| EngineError::Internal("no prompt embeddings".into()))?;
        let later = if switches.len() > 1 {
            LaterTexts {
                texts: texts.collect(),
                switches,
            }
        } else {
            LaterTexts::default()
        };
        Ok(PromptEmbeds {
            embeds: first.embeds,
            pooled: first.pooled,
            negative: first.negative,
            images: Vec::new(),
            later,
        })
    }

    /// How a run of `p` counts the steps its prompt's edits name: its scheduler's model
    /// calls (two a step for a second-order scheduler, as A1111 counts them).
    fn prompt_clock(&self, p: &GenerateParams) -> Result<StepClock> {
        let order = p
            .scheduler_overrides
            .apply(&self.scheduler)?
            .build(p.steps)?
            .order();
        Ok(StepClock {
            steps: p.steps * order,
            first_pass_steps: p.first_pass_steps,
        })
    }
}
