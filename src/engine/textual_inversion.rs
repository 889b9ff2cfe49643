//! Textual inversion embeddings (A1111's `embeddings`): vectors learned for a token, one
//! set per text encoder (`clip_l` for SDXL's first, `clip_g` for its second). A job's
//! embeddings reach the text encoders as diffusers' `load_textual_inversion` puts them
//! there (the tokens added to the tokenizer, the vectors at their ids) and its prompts are
//! expanded as `maybe_convert_prompt` expands them; the tokens go to a copy of each
//! tokenizer and the vectors beside the encoder's table, so the loaded models never
//! change and nothing outlives the job.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::models::clip::{AddedRows, ClipTextModel};
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::weights::{read_all, read_shapes};

/// Most vectors one embedding may hold: a CLIP prompt has room for 75 tokens.
pub const MAX_VECTORS: i64 = 75;

/// The file keys of SDXL's two encoders' vectors, as A1111 and model sites store them.
const KEYS: [&str; 2] = ["clip_l", "clip_g"];

/// The token an embedding named `name` has by default (A1111's rule): its file's name
/// without folders and extension.
pub fn default_token(name: &str) -> &str {
    let file = name.rsplit('/').next().unwrap_or_default();
    file.strip_suffix(".safetensors").unwrap_or(file)
}

/// One embedding file's vectors and the token a request gave it.
pub struct Embedding {
    /// Its index in the request (errors about its token name it).
    pub index: usize,
    /// Its model name.
    pub name: String,
    /// The token that stands for it in the prompts.
    pub token: String,
    /// `clip_l` and `clip_g` [vectors, width] in float32 on the host, as the file has them.
    vectors: [Option<Tensor>; 2],
}

/// What an embedding file holds for each text encoder: (vectors, width), `None` where it
/// has no vectors for that encoder.
pub type VectorShapes = [Option<(i64, i64)>; 2];

/// The vector counts and widths of the embedding file at `path` (its header only), or
/// why it is not an SDXL embedding: it holds `clip_l` and `clip_g` tensors of 1 to
/// [`MAX_VECTORS`] vectors (a 1-d tensor is one vector), nothing else.
pub fn vector_shapes(path: &Path, name: &str) -> Result<VectorShapes> {
    let (shapes, _) = read_shapes(path)?;
    let incompatible = |what: String| {
        EngineError::Incompatible(format!(
            "the embedding `{name}` is not an SDXL textual inversion: {what}"
        ))
    };
    let mut found = [None, None];
    for (key, shape) in &shapes {
        let Some(slot) = KEYS.iter().position(|k| k == key) else {
            return Err(incompatible(format!(
                "it holds `{key}`; SDXL embeddings hold `clip_l` and `clip_g`"
            )));
        };
        let (count, width) = match shape.as_slice() {
            [width] => (1, *width),
            [count, width] => (*count, *width),
            _ => {
                return Err(incompatible(format!(
                    "`{key}` has shape {shape:?}, not [vectors, width]"
                )))
            }
        };
        if !(1..=MAX_VECTORS).contains(&count) {
            return Err(incompatible(format!(
                "`{key}` has {count} vectors; 1 to {MAX_VECTORS} fit a prompt"
            )));
        }
        found[slot] = Some((count, width));
    }
    if found.iter().all(Option::is_none) {
        return Err(incompatible(
            "it holds neither `clip_l` nor `clip_g`".into(),
        ));
    }
    Ok(found)
}

impl Embedding {
    /// Reads the embedding file at `path`: shapes as [`vector_shapes`] checks them (from
    /// the header, before any tensor is read), and finite values.
    pub fn read(path: &Path, index: usize, name: &str, token: &str) -> Result<Self> {
        vector_shapes(path, name)?;
        let mut tensors = read_all(path, Device::Cpu, Kind::Float)?;
        let mut vectors = [None, None];
        for (slot, key) in vectors.iter_mut().zip(KEYS) {
            let Some(tensor) = tensors.remove(key) else {
                continue;
            };
            if !bool::try_from(tensor.isfinite().all()).unwrap_or(false) {
                return Err(EngineError::Incompatible(format!(
                    "the embedding `{name}` is not an SDXL textual inversion: `{key}` holds NaN or infinite values"
                )));
            }
            *slot = Some(if tensor.dim() == 1 {
                tensor.unsqueeze(0)
            } else {
                tensor
            });
        }
        Ok(Self {
            index,
            name: name.to_string(),
            token: token.to_string(),
            vectors,
        })
    }

    /// The vectors for text encoder `encoder` (0: the first, 1: the second).
    fn vectors(&self, encoder: usize) -> Option<&Tensor> {
        self.vectors[encoder].as_ref()
    }
}

/// One text encoder's view of a job's embeddings: its tokenizer with their tokens and
/// the vectors at their ids.
pub struct EncoderTokens {
    tokenizer: Arc<ClipTokenizer>,
    added: AddedRows,
    /// Each token of several vectors and the words it expands to (`t t_1 t_2`).
    expansions: HashMap<String, String>,
    /// The id of each embedding's first token and its number of vectors.
    heads: HashMap<i64, usize>,
}

impl EncoderTokens {
    /// The tokens of `embeddings` added to `tokenizer` and their vectors for `encoder`
    /// (text encoder `which`, 0 or 1), as diffusers' `load_textual_inversion` adds them
    /// in request order: a token of n vectors as `t`, `t_1`, ..., `t_{n-1}`.
    pub fn new(
        tokenizer: &ClipTokenizer,
        encoder: &ClipTextModel,
        which: usize,
        embeddings: &[Embedding],
    ) -> Result<Self> {
        let width = encoder.config().hidden_size;
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut expansions = HashMap::new();
        let mut offsets = Vec::with_capacity(embeddings.len());
        for embedding in embeddings {
            let vectors = encoder_vectors(embedding, which, width)?;
            let count = vectors.size()[0];
            offsets.push((tokens.len() as i64, count as usize));
            let names: Vec<String> = std::iter::once(embedding.token.clone())
                .chain((1..count).map(|i| format!("{}_{i}", embedding.token)))
                .collect();
            for name in &names {
                check_new_token(tokenizer, embedding, name, &tokens)?;
            }
            if count > 1 {
                expansions.insert(embedding.token.clone(), names.join(" "));
            }
            tokens.extend(names);
            rows.push(vectors.shallow_clone());
        }
        let (tokenizer, ids) = tokenizer.with_added_tokens(&tokens)?;
        let first_id = ids.first().copied().unwrap_or(0);
        if ids
            .iter()
            .enumerate()
            .any(|(i, &id)| id != first_id + i as i64)
        {
            return Err(EngineError::Internal(format!(
                "the added tokens got ids {ids:?}, not consecutive ones"
            )));
        }
        Ok(Self {
            tokenizer,
            added: encoder.added_rows(first_id, &Tensor::cat(&rows, 0)),
            expansions,
            heads: offsets
                .into_iter()
                .map(|(offset, count)| (first_id + offset, count))
                .collect(),
        })
    }

    /// diffusers' `maybe_convert_prompt`: each token of several vectors that the
    /// tokenizer finds in `prompt` (a token piece equal to it, so only a lower-case one)
    /// replaced everywhere in the text by its expansion.
    pub fn expand(&self, prompt: &str) -> Result<String> {
        let mut expanded = prompt.to_string();
        if self.expansions.is_empty() {
            return Ok(expanded);
        }
        let mut seen = HashSet::new();
        for piece in self.tokenizer.pieces(prompt)? {
            if let Some(words) = self.expansions.get(&piece) {
                if seen.insert(piece.clone()) {
                    expanded = expanded.replace(&piece, words);
                }
            }
        }
        Ok(expanded)
    }

    /// The token ids of `prompt` after its expansion (BOS, tokens, EOS, padding).
    pub fn ids(&self, prompt: &str) -> Result<Vec<i64>> {
        self.tokenizer.encode(&self.expand(prompt)?)
    }

    /// The tokens of `text` after its expansion, without BOS, EOS, padding or
    /// truncation.
    pub fn untruncated_ids(&self, text: &str) -> Result<Vec<i64>> {
        self.tokenizer.untruncated_ids(&self.expand(text)?)
    }

    /// The tokenizer with the embeddings' tokens.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Tokens of `prompt`, expanded, beyond what fits.
    pub fn overflow(&self, prompt: &str) -> Result<usize> {
        Ok(self.tokenizer.overflow(&self.expand(prompt)?))
    }

    /// The number of vectors of the embedding whose first token is `id`; `None` for
    /// any other id.
    pub fn vectors_from(&self, id: i64) -> Option<usize> {
        self.heads.get(&id).copied()
    }

    /// The added tokens' vectors, for the encoder.
    pub fn added(&self) -> &AddedRows {
        &self.added
    }
}

/// `embedding`'s vectors for text encoder `which`, checked against its width.
fn encoder_vectors(embedding: &Embedding, which: usize, width: i64) -> Result<&Tensor> {
    let key = KEYS[which];
    let ordinal = ["first", "second"][which];
    let vectors = embedding.vectors(which).ok_or_else(|| {
        EngineError::Incompatible(format!(
            "the embedding `{}` has no `{key}` vectors for the model's {ordinal} text encoder",
            embedding.name
        ))
    })?;
    let found = vectors.size()[1];
    if found != width {
        return Err(EngineError::Incompatible(format!(
            "the embedding `{}` has `{key}` vectors {found} wide; the model's {ordinal} text encoder takes {width}",
            embedding.name
        )));
    }
    Ok(vectors)
}

/// Refuses `name` (a token or one of its `_i` forms) when the tokenizer has it or an
/// earlier embedding of the job took it, as `load_textual_inversion` refuses it.
fn check_new_token(
    tokenizer: &ClipTokenizer,
    embedding: &Embedding,
    name: &str,
    taken: &[String],
) -> Result<()> {
    let problem = if tokenizer.knows(name) {
        format!("is already a token of the model's tokenizer (`{name}`); choose another token")
    } else if taken.iter().any(|t| t == name) {
        format!("`{name}` is also another embedding's token in this request")
    } else {
        return Ok(());
    };
    Err(EngineError::EmbeddingToken {
        index: embedding.index,
        message: format!("`{}` {problem}", embedding.token),
    })
}
