//! compel's `EmbeddingsProvider` with `truncate_long_prompts=False` and SDXL's settings
//! (`CompelForSDXL`: penultimate hidden states, not normalised): a prompt's token ids in
//! chunks of 75 between BOS and EOS (split at the last sentence end, else phrase end,
//! else word end that fits), each chunk encoded alone; weights above 1 scale a token's
//! offset from the empty prompt's embedding, weights below 1 lerp towards the prompt
//! encoded with that fragment's tokens masked out.

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use super::{Fragment, Part, WeightedPrompt};
use crate::engine::error::{EngineError, Result};
use crate::engine::models::clip::ClipTextModel;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::textual_inversion::EncoderTokens;

/// Punctuation compel splits long prompts after: sentence ends first, then phrase ends.
const SENTENCE_ENDS: &[&str] = &[".</w>"];
const PHRASE_ENDS: &[&str] = &[".</w>", ",</w>", ";</w>", ":</w>"];

/// A prompt's tokens in chunks of the tokenizer's length, with per-token weights and
/// attention mask.
struct Chunked {
    ids: Vec<i64>,
    weights: Vec<f32>,
    keep: Vec<bool>,
}

/// One text encoder with its tokenizer, encoding weighted prompts.
pub struct WeightedEncoder<'a> {
    pub(super) tokenizer: &'a ClipTokenizer,
    pub(super) encoder: &'a ClipTextModel,
    /// A job's textual inversion tokens for this encoder: its tokenizer (with their
    /// tokens, multi-vector ones expanded) and their vectors.
    pub(super) tokens: Option<&'a EncoderTokens>,
    pub(super) device: Device,
    /// compel's `empty_z`: the empty prompt's chunk [1, 77, width].
    empty: Tensor,
}

impl<'a> WeightedEncoder<'a> {
    /// The encoder with its tokenizer (the job's copy with its textual inversion tokens
    /// when `tokens` is given), its empty prompt encoded once.
    pub fn new(
        tokenizer: &'a ClipTokenizer,
        encoder: &'a ClipTextModel,
        tokens: Option<&'a EncoderTokens>,
        device: Device,
    ) -> Self {
        let tokenizer = tokens.map_or(tokenizer, EncoderTokens::tokenizer);
        let mut this = Self {
            tokenizer,
            encoder,
            tokens,
            device,
            empty: Tensor::new(),
        };
        let (bos, eos, pad) = tokenizer.special_ids();
        let mut ids = vec![bos, eos];
        ids.resize(this.chunk_len(), pad);
        let keep = vec![true; ids.len()];
        this.empty = this.encode_chunk(&ids, &keep);
        this
    }

    /// Tokens per chunk, BOS and EOS included (77 for CLIP).
    pub(super) fn chunk_len(&self) -> usize {
        self.tokenizer.max_length()
    }

    /// The empty prompt's embedding, `chunks` times along the tokens.
    pub fn empty(&self, chunks: i64) -> Tensor {
        self.empty.repeat([1, chunks, 1])
    }

    /// [1, tokens, width] embeddings of `prompt` (compel's conjunction: each part's
    /// embeddings, a part weighted w as `empty + (part - empty) * w`, concatenated).
    pub fn prompt(&self, prompt: &WeightedPrompt) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(prompt.parts.len());
        for (part, weight) in &prompt.parts {
            let mut embeds = match part {
                Part::Fragments(fragments) => self.fragments(fragments)?,
                Part::Blend {
                    prompts,
                    weights,
                    normalize,
                } => self.blend(prompts, weights, *normalize)?,
            };
            if *weight != 1.0 {
                let empty = self.empty(embeds.size()[1] / self.chunk_len() as i64);
                embeds = &empty + (&embeds - &empty) * *weight;
            }
            parts.push(embeds);
        }
        Ok(Tensor::cat(&parts, 1))
    }

    /// Pads each of `embeds` with empty chunks to the longest (compel's
    /// `pad_conditioning_tensors_to_same_length`).
    pub fn pad_to(&self, embeds: &Tensor, tokens: i64) -> Tensor {
        let missing = (tokens - embeds.size()[1]) / self.chunk_len() as i64;
        if missing <= 0 {
            return embeds.shallow_clone();
        }
        let empty = self.empty(missing);
        let empty = empty.expand([embeds.size()[0], -1, -1], false);
        Tensor::cat(&[embeds.shallow_clone(), empty], 1)
    }

    /// compel's `_get_conditioning_for_blend`: the prompts padded to one length and summed
    /// by weight (normalised to sum 1 when `normalize`).
    fn blend(&self, prompts: &[Vec<Fragment>], weights: &[f64], normalize: bool) -> Result<Tensor> {
        let embeds = prompts
            .iter()
            .map(|p| self.fragments(p))
            .collect::<Result<Vec<_>>>()?;
        let longest = embeds.iter().map(|e| e.size()[1]).max().unwrap_or(0);
        let padded: Vec<Tensor> = embeds.iter().map(|e| self.pad_to(e, longest)).collect();
        Ok(mix(&Tensor::stack(&padded, 1), weights, normalize))
    }

    /// compel's `get_embeddings_for_weighted_prompt_fragments` for one flattened prompt.
    fn fragments(&self, fragments: &[Fragment]) -> Result<Tensor> {
        let empty = [Fragment {
            text: String::new(),
            weight: 1.0,
        }];
        let fragments = if fragments.is_empty() {
            &empty[..]
        } else {
            fragments
        };
        let per_fragment = fragments
            .iter()
            .map(|f| match self.tokens {
                Some(tokens) => tokens.untruncated_ids(&f.text),
                None => self.tokenizer.untruncated_ids(&f.text),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        for (fragment_ids, fragment) in per_fragment.iter().zip(fragments) {
            ids.extend(fragment_ids);
            weights.extend(std::iter::repeat_n(
                fragment.weight as f32,
                fragment_ids.len(),
            ));
        }
        let chunked = self.chunk(&ids, &weights);
        let mut embeddings = vec![self.weighted(&chunked, &chunked.keep)];
        let mut lerp = vec![1.0];
        let ranges = self.fragment_ranges(&chunked.ids, &per_fragment)?;
        for (range, fragment) in ranges.iter().zip(fragments) {
            // A fragment without tokens changes nothing when removed (compel fails on it).
            let (Some((start, end)), true) = (range, fragment.weight < 1.0) else {
                continue;
            };
            let mut keep = chunked.keep.clone();
            keep[*start..=*end].iter_mut().for_each(|k| *k = false);
            let n = self.chunk_len();
            for chunk in keep.chunks_mut(n) {
                chunk[0] = true;
                chunk[n - 1] = true;
            }
            embeddings.push(self.weighted(&chunked, &keep));
            // tan((1 - w) π/2): 0 at w = 1, 1 at w = 0.5, towards infinity at 0.
            let w = fragment.weight.max(1e-5);
            lerp.push(((1.0 - w) * PI / 2.0).tan());
        }
        Ok(mix(&Tensor::stack(&embeddings, 1), &lerp, true))
    }

    /// The tokens in chunks: BOS, at most 75 tokens, EOS, padding; every token kept.
    fn chunk(&self, ids: &[i64], weights: &[f32]) -> Chunked {
        let (bos, eos, pad) = self.tokenizer.special_ids();
        let n = self.chunk_len();
        let mut out = Chunked {
            ids: Vec::new(),
            weights: Vec::new(),
            keep: Vec::new(),
        };
        let mut start = 0;
        loop {
            let split = self.split_point(&ids[start..], n - 2);
            let end = (start + split).min(ids.len());
            let content = end - start;
            out.ids.push(bos);
            out.ids.extend(&ids[start..end]);
            out.ids.push(eos);
            out.ids.extend(std::iter::repeat_n(pad, n - 2 - content));
            out.weights.push(1.0);
            out.weights.extend(&weights[start..end]);
            out.weights
                .extend(std::iter::repeat_n(1.0, n - 1 - content));
            out.keep.extend(std::iter::repeat_n(true, n));
            start = end;
            if start >= ids.len() {
                return out;
            }
        }
    }

    /// compel's `_find_next_best_split_point` (SENTENCES, falling back to phrases, then
    /// words, then a hard cut at `max`).
    fn split_point(&self, ids: &[i64], max: usize) -> usize {
        if ids.len() <= max {
            return max;
        }
        let texts: Vec<String> = ids[..max]
            .iter()
            .map(|&id| self.tokenizer.token_text(id).unwrap_or_default())
            .collect();
        let last = |wanted: &dyn Fn(&str) -> bool| texts.iter().rposition(|t| wanted(t));
        last(&|t| SENTENCE_ENDS.contains(&t))
            .or_else(|| last(&|t| PHRASE_ENDS.contains(&t)))
            .or_else(|| last(&|t| t.ends_with("</w>")))
            .map_or(max, |i| i + 1)
    }

    /// The chunks encoded with `keep` as attention mask, each token's offset from the
    /// empty prompt's scaled by its weight (chunks of weight 1 left as encoded).
    fn weighted(&self, chunked: &Chunked, keep: &[bool]) -> Tensor {
        let n = self.chunk_len();
        let chunks: Vec<Tensor> = (0..chunked.ids.len() / n)
            .map(|c| {
                let range = c * n..(c + 1) * n;
                let z = self.encode_chunk(&chunked.ids[range.clone()], &keep[range.clone()]);
                let weights = &chunked.weights[range];
                if weights.iter().all(|&w| w == 1.0) {
                    return z;
                }
                let w = Tensor::from_slice(weights)
                    .to_device(self.device)
                    .to_kind(z.kind())
                    .view([1, n as i64, 1]);
                let scaled = &self.empty + (&z - &self.empty) * &w;
                z.where_self(&w.eq(1.0), &scaled)
            })
            .collect();
        Tensor::cat(&chunks, 1)
    }

    /// One chunk's penultimate hidden states [1, 77, width].
    fn encode_chunk(&self, ids: &[i64], keep: &[bool]) -> Tensor {
        let ids = Tensor::from_slice(ids).unsqueeze(0).to_device(self.device);
        let keep = Tensor::from_slice(keep).unsqueeze(0).to_device(self.device);
        self.encoder
            .penultimate_masked(&ids, &keep, self.tokens.map(EncoderTokens::added))
    }

    /// compel's `_get_token_ranges_for_fragments`: where each fragment's tokens lie in
    /// the chunked ids (first and last index; `None` for a fragment without tokens).
    fn fragment_ranges(
        &self,
        chunked: &[i64],
        per_fragment: &[Vec<i64>],
    ) -> Result<Vec<Option<(usize, usize)>>> {
        let (bos, eos, pad) = self.tokenizer.special_ids();
        let lost = |i: usize| {
            EngineError::InvalidRequest(format!(
                "cannot place the tokens of prompt fragment {i} among the prompt's tokens"
            ))
        };
        let last = chunked.len().saturating_sub(1);
        let mut start = 0;
        let mut ranges = Vec::with_capacity(per_fragment.len());
        for (i, tokens) in per_fragment.iter().enumerate() {
            let Some(&first) = tokens.first() else {
                ranges.push(None);
                continue;
            };
            while chunked.get(start) != Some(&first) || start >= last {
                if start >= last {
                    return Err(lost(i));
                }
                start += 1;
            }
            let mut end = start;
            let mut matched = 0;
            loop {
                if end >= last {
                    return Err(lost(i));
                }
                if chunked[end] == tokens[matched] {
                    matched += 1;
                    if matched == tokens.len() {
                        break;
                    }
                    end += 1;
                } else if [eos, pad, bos].contains(&chunked[end]) {
                    end += 1;
                } else {
                    return Err(lost(i));
                }
            }
            ranges.push(Some((start, end)));
            start = end + 1;
        }
        Ok(ranges)
    }
}

/// compel's `apply_embedding_weights`: [1, n, tokens, width] summed over n by weight
/// (float32 weights, normalised to sum 1 when `normalize`).
fn mix(stacked: &Tensor, weights: &[f64], normalize: bool) -> Tensor {
    let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut w = Tensor::from_slice(&weights).to_device(stacked.device());
    if normalize {
        w = &w / w.sum(Kind::Float);
    }
    let w = w.to_kind(stacked.kind()).view([-1, 1, 1]);
    (stacked * w).sum_dim_intlist(1, false, stacked.kind())
}
