//! AUTOMATIC1111's encoding of a prompt parsed by [`super::a1111`] (its
//! `TextConditionalModel` with the "Original" emphasis): each fragment's tokens in
//! chunks of 75 between BOS and EOS, a `BREAK` or a full chunk starting the next (a
//! chunk that fills within 20 tokens after a comma hands the tokens after the comma to
//! the next, A1111's default `comma_padding_backtrack`; an embedding's vectors stay in
//! one chunk); each chunk encoded alone at the penultimate layer, its hidden states
//! multiplied by the token weights and scaled back to the mean they had.

use tch::Tensor;

use super::a1111::is_break;
use super::weighting::WeightedEncoder;
use super::{Emphasis, Fragment};
use crate::engine::error::{EngineError, Result};
use crate::engine::textual_inversion::EncoderTokens;

/// A1111's default `comma_padding_backtrack`.
const COMMA_BACKTRACK: usize = 20;

/// One chunk's tokens (at most 75, without BOS and EOS) and their weights.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<i64>,
    pub weights: Vec<f32>,
}

/// A1111's `tokenize_line` state: the chunks so far and the one being filled.
struct Chunker {
    capacity: usize,
    done: Vec<Chunk>,
    current: Chunk,
    /// Where the last comma of the current chunk is.
    last_comma: Option<usize>,
}

impl Chunker {
    fn next_chunk(&mut self) {
        self.done.push(std::mem::take(&mut self.current));
        self.last_comma = None;
    }

    fn push(&mut self, ids: &[i64], weight: f32) {
        self.current.ids.extend(ids);
        self.current
            .weights
            .extend(std::iter::repeat_n(weight, ids.len()));
    }

    /// Before a token that is not a comma: a full chunk with a comma among its last 20
    /// tokens gives the tokens after the comma to the next chunk.
    fn backtrack(&mut self) {
        let len = self.current.ids.len();
        let Some(comma) = self.last_comma else {
            return;
        };
        if len == self.capacity && len - comma <= COMMA_BACKTRACK {
            let ids = self.current.ids.split_off(comma + 1);
            let weights = self.current.weights.split_off(comma + 1);
            self.next_chunk();
            self.current = Chunk { ids, weights };
        }
    }
}

impl WeightedEncoder<'_> {
    /// The prompt's chunks, as A1111's `tokenize_line` makes them.
    pub fn a1111_chunks(&self, fragments: &[Fragment]) -> Result<Vec<Chunk>> {
        let capacity = self.chunk_len() - 2;
        let comma = self.tokenizer.token_id(",</w>");
        let mut chunker = Chunker {
            capacity,
            done: Vec::new(),
            current: Chunk::default(),
            last_comma: None,
        };
        for fragment in fragments {
            if is_break(fragment) {
                chunker.next_chunk();
                continue;
            }
            let ids = match self.tokens {
                Some(tokens) => tokens.untruncated_ids(&fragment.text)?,
                None => self.tokenizer.untruncated_ids(&fragment.text)?,
            };
            let weight = fragment.weight as f32;
            let mut at = 0;
            while at < ids.len() {
                let token = ids[at];
                if Some(token) == comma {
                    chunker.last_comma = Some(chunker.current.ids.len());
                } else {
                    chunker.backtrack();
                }
                if chunker.current.ids.len() == capacity {
                    chunker.next_chunk();
                }
                let vectors = self.embedding_at(&ids[at..], capacity)?;
                if vectors > 1 && chunker.current.ids.len() + vectors > capacity {
                    chunker.next_chunk();
                }
                chunker.push(&ids[at..at + vectors], weight);
                at += vectors;
            }
        }
        if !chunker.current.ids.is_empty() || chunker.done.is_empty() {
            chunker.next_chunk();
        }
        Ok(chunker.done)
    }

    /// How many of `ids` (1 for a token, its vector count for an embedding's expanded
    /// tokens) go into a chunk together.
    fn embedding_at(&self, ids: &[i64], capacity: usize) -> Result<usize> {
        let Some(count) = self.tokens.and_then(|t| t.vectors_from(ids[0])) else {
            return Ok(1);
        };
        let whole = count <= ids.len() && (0..count).all(|i| ids[i] == ids[0] + i as i64);
        if !whole {
            return Ok(1);
        }
        if count > capacity {
            return Err(EngineError::InvalidRequest(format!(
                "an embedding of {count} vectors does not fit in a chunk of {capacity} tokens"
            )));
        }
        Ok(count)
    }

    /// [1, 77 x chunks, width] hidden states of the prompt with A1111's `emphasis`, and
    /// the first chunk's pooled embedding (at its end-of-text token) when the encoder has
    /// a projection.
    pub fn a1111_prompt(
        &self,
        fragments: &[Fragment],
        emphasis: Emphasis,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let chunks = self.a1111_chunks(fragments)?;
        let (bos, eos, pad) = self.tokenizer.special_ids();
        let n = self.chunk_len();
        let mut hidden = Vec::with_capacity(chunks.len());
        let mut pooled = None;
        for chunk in &chunks {
            let mut ids = Vec::with_capacity(n);
            ids.push(bos);
            ids.extend(&chunk.ids);
            ids.push(eos);
            ids.resize(n, pad);
            let mut weights = vec![1.0f32];
            weights.extend(&chunk.weights);
            weights.resize(n, 1.0);
            let ids = Tensor::from_slice(&ids).unsqueeze(0).to_device(self.device);
            let end_of_text = 1 + chunk.ids.len() as i64;
            let added = self.tokens.map(EncoderTokens::added);
            let out = self
                .encoder
                .forward_pooled_at(&ids, 0, added, Some(end_of_text))?;
            if pooled.is_none() {
                pooled = out.pooled;
            }
            hidden.push(emphasise(&out.hidden, &weights, emphasis));
        }
        Ok((Tensor::cat(&hidden, 1), pooled))
    }
}

/// A1111's emphasis: "Original" multiplies the hidden states by their token's weight
/// and scales them so that their mean is the one they had, "No norm" only multiplies,
/// the others leave them.
fn emphasise(z: &Tensor, weights: &[f32], emphasis: Emphasis) -> Tensor {
    let applies = matches!(emphasis, Emphasis::Original | Emphasis::NoNorm);
    if !applies || weights.iter().all(|&w| w == 1.0) {
        return z.shallow_clone();
    }
    let kind = z.kind();
    let w = Tensor::from_slice(weights)
        .to_device(z.device())
        .to_kind(kind)
        .view([1, -1, 1]);
    let weighted = z * w;
    if emphasis == Emphasis::NoNorm {
        return weighted;
    }
    let original = z.mean(kind);
    let new = weighted.mean(kind);
    weighted * (original / new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn emphasis_keeps_the_mean_and_leaves_unweighted_chunks_alone() {
        let z = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([1, 3, 2]);
        assert!(emphasise(&z, &[1.0, 1.0, 1.0], Emphasis::Original).equal(&z));
        assert!(emphasise(&z, &[1.0, 2.0, 0.5], Emphasis::Ignore).equal(&z));
        let plain = emphasise(&z, &[1.0, 2.0, 0.5], Emphasis::NoNorm);
        let plain = Vec::<f32>::try_from(plain.flatten(0, -1)).expect("values");
        assert_eq!(plain, [1.0, 2.0, 6.0, 8.0, 2.5, 3.0]);
        let out = emphasise(&z, &[1.0, 2.0, 0.5], Emphasis::Original);
        let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
        assert!((mean(&out) - mean(&z)).abs() < 1e-6);
        let values = Vec::<f32>::try_from(out.flatten(0, -1)).expect("values");
        // Relative to the unweighted first token, the second doubles and the third halves.
        assert!((values[2] / values[0] - 6.0).abs() < 1e-5, "{values:?}");
        assert!((values[4] / values[0] - 2.5).abs() < 1e-5, "{values:?}");
    }
}
