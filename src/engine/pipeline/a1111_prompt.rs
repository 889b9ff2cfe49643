//! The conditioning of prompts in AUTOMATIC1111's syntax, as A1111 builds it for SDXL:
//! each text encoder encodes its prompt in chunks with A1111's emphasis, the chunks
//! joined along the tokens and both encoders' along the width; the pooled embedding is
//! the second encoder's of the first chunk. An empty negative prompt is zeros, as A1111
//! makes it for SDXL; another is encoded the same way, and the shorter of prompt and
//! negative is padded with the empty prompt's chunks to batch them, each attending to
//! its own tokens only, as A1111 runs the two apart by default. A prompt with edits or
//! alternations is one such conditioning per text it reads, each from the step A1111
//! reads it at. A prompt that `AND` splits into sub-prompts is one row per sub-prompt,
//! each encoded as a prompt of its own, combined by guidance with its weight.

use std::collections::HashMap;

use tch::Tensor;

use super::prompt::{Attended, LaterTexts, PromptEmbeds, PromptTokens, TextEmbeds};
use super::weighted_prompt::{join_padded, Texts};
use crate::engine::error::{EngineError, Result};
use crate::engine::pipeline::{GenerateParams, SdxlPipeline};
use crate::engine::prompt_syntax::a1111_compose::{self, PartsError, PromptPart};
use crate::engine::prompt_syntax::a1111_schedule::{Schedule, StepClock};
use crate::engine::prompt_syntax::weighting::WeightedEncoder;
use crate::engine::prompt_syntax::Emphasis;
use crate::engine::prompt_syntax::{a1111, PromptSyntax};

/// One pair's hidden states per encoder and its pooled embedding.
struct Encoded {
    first: Option<Tensor>,
    second: Tensor,
    pooled: Tensor,
}

/// The schedules of a request's texts: each sub-prompt's, then the negative's, each for
/// both encoders in turn (the second encoder's is `prompt_2`'s where that is given, else
/// the prompt's).
struct RequestSchedules {
    schedules: Vec<Schedule>,
    clock: StepClock,
}

impl RequestSchedules {
    /// The schedules of `p`'s texts under `clock`, and its sub-prompts' weights.
    fn new(p: &GenerateParams, clock: StepClock) -> Result<(Self, Vec<f64>)> {
        let parts = prompt_parts(p)?;
        let negative = p.negative_prompt.as_deref().unwrap_or("");
        let negative = (negative, p.negative_prompt_2.as_deref());
        let schedules = a1111::run_schedules(&parts, negative, clock).map_err(syntax_error)?;
        let weights = parts.iter().map(|part| part.weight).collect();
        Ok((Self { schedules, clock }, weights))
    }

    /// Each stretch of steps in which no text changes: its first step, and the texts read
    /// in it: each sub-prompt's and the negative's.
    fn stretches(&self) -> Result<Vec<(usize, Vec<&str>)>> {
        a1111::conditionings(&self.schedules, self.clock).map_err(syntax_error)
    }
}

/// A stretch's texts (a pair per sub-prompt, then the negative's pair) as pairs.
fn read_pairs<'t>(read: &[&'t str]) -> (Vec<Texts<'t>>, Texts<'t>) {
    let mut pairs: Vec<Texts<'t>> = read
        .chunks(2)
        .map(|pair| Texts {
            first: pair[0],
            second: pair[pair.len() - 1],
        })
        .collect();
    let negative = pairs.pop().unwrap_or(Texts {
        first: "",
        second: "",
    });
    (pairs, negative)
}

fn syntax_error(e: crate::engine::prompt_syntax::SyntaxError) -> EngineError {
    EngineError::InvalidRequest(format!("the prompt {e}"))
}

/// `p`'s sub-prompts paired with `prompt_2`'s.
fn prompt_parts(p: &GenerateParams) -> Result<Vec<PromptPart<'_>>> {
    a1111_compose::prompt_parts(&p.prompt, p.prompt_2.as_deref()).map_err(|e| {
        EngineError::InvalidRequest(match e {
            PartsError::Prompt(e) => format!("the prompt {e}"),
            PartsError::Prompt2(e) => format!("prompt_2 {e}"),
        })
    })
}

/// The encoders and the embeddings of the texts they encoded so far.
struct CachedEncoders<'a> {
    first: Option<WeightedEncoder<'a>>,
    second: WeightedEncoder<'a>,
    /// By encoder (0, 1) and text: hidden states and pooled embedding.
    cache: HashMap<(usize, String), (Tensor, Option<Tensor>)>,
    /// How the weights apply.
    emphasis: Emphasis,
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
        let fragments = a1111::read(text, self.emphasis)
            .map_err(|e| EngineError::InvalidRequest(format!("the prompt {e}")))?;
        let model = match (encoder, &self.first) {
            (0, Some(first)) => first,
            _ => &self.second,
        };
        let (hidden, pooled) = model.a1111_prompt(&fragments, self.emphasis)?;
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

    /// The conditioning of one stretch's sub-prompts and (under guidance) negative
    /// texts: each sub-prompt's encoders padded to one length with empty chunks, the
    /// shorter sub-prompts then repeating their last token's vector to the longest (A1111's
    /// `stack_conds`), and prompt and negative padded to one length with empty chunks.
    fn text_embeds(
        &mut self,
        (prompts, negative): (Vec<Texts<'_>>, Texts<'_>),
        guided: bool,
    ) -> Result<TextEmbeds> {
        // A1111 conditions SDXL on zeros where the negative prompt is empty (its
        // `force_zero_negative_prompt`); the texts the encoders read decide.
        let zero_negative =
            negative.first.is_empty() && (self.first.is_none() || negative.second.is_empty());
        let parts = prompts
            .iter()
            .map(|texts| self.pair(texts))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&parts.iter().map(|e| &e.pooled).collect::<Vec<_>>(), 0);
        let mut hidden = vec![self.stacked(parts)];
        let mut negative_pooled = None;
        if guided && !zero_negative {
            let encoded = self.pair(&negative)?;
            negative_pooled = Some(encoded.pooled);
            hidden.push((encoded.first, encoded.second));
        }
        // Each text's own length, which its rows attend to once the shorter is padded.
        let lengths: Vec<i64> = hidden.iter().map(|(a, b)| longest(a.as_ref(), b)).collect();
        let attended = match lengths[..] {
            [prompt, negative] if prompt != negative => Some(Attended { prompt, negative }),
            _ => None,
        };
        let mut joined = join_padded(self.first.as_ref(), &self.second, hidden).into_iter();
        let embeds = joined
            .next()
            .ok_or_else(|| EngineError::Internal("no prompt embeddings".into()))?;
        let negative = match joined.next().zip(negative_pooled) {
            Some(encoded) => Some(encoded),
            // Zero keys and values: the same attention whatever the length.
            None if guided => Some((
                embeds.narrow(0, 0, 1).zeros_like(),
                pooled.narrow(0, 0, 1).zeros_like(),
            )),
            None => None,
        };
        Ok(TextEmbeds {
            embeds,
            pooled,
            negative,
            attended,
        })
    }

    /// Sub-prompts' hidden states stacked along the batch, per encoder: each padded to
    /// its longest encoder's length with empty chunks, then to the longest sub-prompt's
    /// by repeating its last token's vector.
    fn stacked(&self, parts: Vec<Encoded>) -> (Option<Tensor>, Tensor) {
        let first = self.first.as_ref();
        let aligned: Vec<(Option<Tensor>, Tensor)> = parts
            .into_iter()
            .map(|e| {
                let longest = longest(e.first.as_ref(), &e.second);
                let first = e.first.zip(first).map(|(t, enc)| enc.pad_to(&t, longest));
                (first, self.second.pad_to(&e.second, longest))
            })
            .collect();
        let tokens = aligned.iter().map(|(_, t)| t.size()[1]).max().unwrap_or(0);
        let stack = |ts: Vec<Tensor>| {
            let ts: Vec<Tensor> = ts.iter().map(|t| repeat_last_to(t, tokens)).collect();
            Tensor::cat(&ts, 0)
        };
        let (firsts, seconds): (Vec<Option<Tensor>>, Vec<Tensor>) = aligned.into_iter().unzip();
        let firsts: Option<Vec<Tensor>> = firsts.into_iter().collect();
        (firsts.map(stack), stack(seconds))
    }
}

/// The longer of two encoders' token counts.
fn longest(first: Option<&Tensor>, second: &Tensor) -> i64 {
    let second = second.size()[1];
    first.map_or(second, |first| first.size()[1].max(second))
}

/// `t` ([1, L, D]) lengthened to `tokens` by repeating its last token's vector.
fn repeat_last_to(t: &Tensor, tokens: i64) -> Tensor {
    let length = t.size()[1];
    if length >= tokens {
        return t.shallow_clone();
    }
    let last = t.narrow(1, length - 1, 1).repeat([1, tokens - length, 1]);
    Tensor::cat(&[t.shallow_clone(), last], 1)
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
        let (schedules, weights) = RequestSchedules::new(p, self.prompt_clock(p)?)?;
        let mut encoders = CachedEncoders {
            first,
            second,
            cache: HashMap::new(),
            emphasis: p.emphasis,
        };
        // Each stretch's conditioning, the same tensors for the same texts.
        let mut texts: Vec<TextEmbeds> = Vec::new();
        let mut index_of: HashMap<Vec<&str>, usize> = HashMap::new();
        let mut switches: Vec<(usize, usize)> = Vec::new();
        let stretches = schedules.stretches()?;
        for (step, read) in &stretches {
            let step = *step;
            let index = match index_of.get(read) {
                Some(&index) => index,
                None => {
                    texts.push(encoders.text_embeds(read_pairs(read), guided)?);
                    index_of.insert(read.clone(), texts.len() - 1);
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
            text: first,
            images: Vec::new(),
            later,
            weights,
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

    /// A composable prompt's needs of `p`'s guidance: classifier-free guidance (its weights
    /// scale it), and with several sub-prompts no guider, PAG or guidance rescale.
    pub(super) fn check_composition(&self, p: &GenerateParams) -> Result<()> {
        if p.prompt_syntax != PromptSyntax::A1111 {
            return Ok(());
        }
        let parts = prompt_parts(p)?;
        if !a1111_compose::composes(&parts) {
            return Ok(());
        }
        let bad = |m: &str| Err(EngineError::InvalidRequest(m.into()));
        if !self.classifier_free(p.guidance_scale) {
            return bad("a prompt of sub-prompts joined by AND, or with a `:weight` at its end, scales classifier-free guidance: `guidance_scale` must be above 1, on a UNet that is not guidance-distilled");
        }
        if parts.len() > 1 && (p.guider.is_some() || p.pag.is_some() || p.guidance_rescale > 0.0) {
            return bad("a prompt of sub-prompts joined by AND is combined by classifier-free guidance alone: no guider, PAG or guidance rescale");
        }
        Ok(())
    }
}
