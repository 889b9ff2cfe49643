//! The CLIP BPE tokenizer, configured as transformers' `CLIPTokenizer` configures the
//! `tokenizers` library: NFC, whitespace runs to one space, lower-casing, CLIP's split
//! pattern, byte-level symbols, `</w>` word ends, then BOS/EOS and padding to 77 tokens.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use tokenizers::{AddedToken, Tokenizer};

use crate::engine::error::{EngineError, Result};
use crate::engine::files::{read_bytes, read_text};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's context length.
pub const CLIP_MAX_LENGTH: usize = 77;

/// A CLIP tokenizer that produces fixed-length id sequences, as diffusers requests them.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    max_length: usize,
    /// The last copy with added tokens, for the next job with the same ones (copying
    /// CLIP's vocabulary takes milliseconds; jobs tend to repeat their embeddings).
    last_extended: Mutex<Option<AddedTokens>>,
}

/// A copy of a tokenizer with added tokens, and their ids.
struct AddedTokens {
    tokens: Vec<String>,
    tokenizer: Arc<ClipTokenizer>,
    ids: Vec<i64>,
}

fn tokenizer_error(path: &Path, message: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// GPT-2's reversible byte-to-unicode table, in CLIP's vocabulary order.
pub(crate) fn byte_symbols() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

/// Reads a special-token entry that is either a string or `{"content": ...}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json`, or `vocab.json` and
    /// `merges.txt`; special tokens and the length from `tokenizer_config.json` and
    /// `special_tokens_map.json` where present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut settings = Map::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if path.exists() {
                let text = read_text(&path)?;
                let value: Value =
                    serde_json::from_str(&text).map_err(|e| tokenizer_error(&path, e))?;
                if let Value::Object(map) = value {
                    settings.extend(map);
                }
            }
        }
        let pad = token_text(settings.get("pad_token")).unwrap_or_else(|| EOS.to_string());
        let max_length = settings
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| n > 2 && n <= CLIP_MAX_LENGTH as u64)
            .map(|n| n as usize)
            .unwrap_or(CLIP_MAX_LENGTH);
        let json_path = dir.join("tokenizer.json");
        let inner = if json_path.exists() {
            Tokenizer::from_bytes(read_bytes(&json_path)?)
                .map_err(|e| tokenizer_error(&json_path, e))?
        } else {
            let vocab_path = dir.join("vocab.json");
            let text = read_text(&vocab_path)?;
            let vocab: Map<String, Value> =
                serde_json::from_str(&text).map_err(|e| tokenizer_error(&vocab_path, e))?;
            let merges_path = dir.join("merges.txt");
            let merges = read_text(&merges_path)?;
            let merges = merges
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            build(vocab, merges, &pad).map_err(|e| tokenizer_error(dir, e))?
        };
        Self::new(inner, &pad, max_length).map_err(|e| tokenizer_error(dir, e))
    }

    /// Builds the tokenizer from CLIP's BPE vocabulary file
    /// (`bpe_simple_vocab_16e6.txt.gz`), for models that ship no tokenizer files.
    pub fn from_bpe_gz(path: &Path, pad: &str) -> Result<Self> {
        let bytes = read_bytes(path)?;
        Self::from_bpe_gz_bytes(&bytes, path, pad)
    }

    /// The tokenizer from the CLIP BPE vocabulary built into sdxld (for single-file
    /// checkpoints, which carry no tokenizer files).
    pub fn builtin(pad: &str) -> Result<Self> {
        const VOCABULARY: &[u8] =
            include_bytes!(concat!(env!("OUT_DIR"), "/clip_bpe_vocab.txt.gz"));
        let source = Path::new("<built-in CLIP vocabulary>");
        if VOCABULARY.is_empty() {
            return Err(tokenizer_error(
                source,
                "sdxld was built without open_clip's bpe_simple_vocab_16e6.txt.gz",
            ));
        }
        Self::from_bpe_gz_bytes(VOCABULARY, source, pad)
    }

    /// [`Self::from_bpe_gz`] from the file's bytes; `path` names it in errors.
    pub fn from_bpe_gz_bytes(bytes: &[u8], path: &Path, pad: &str) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| tokenizer_error(path, e))?;
        // The CLIP recipe: merges are lines 1..=48894 of the file.
        let merges: Vec<String> = text
            .split('\n')
            .skip(1)
            .take(49152 - 256 - 2)
            .map(str::to_string)
            .collect();
        let symbols = byte_symbols();
        let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
        tokens.extend(symbols.iter().map(|c| format!("{c}</w>")));
        tokens.extend(
            merges
                .iter()
                .map(|m| m.split_whitespace().collect::<String>()),
        );
        tokens.push(BOS.to_string());
        tokens.push(EOS.to_string());
        let vocab: Map<String, Value> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, json!(i)))
            .collect();
        let inner = build(vocab, merges, pad).map_err(|e| tokenizer_error(path, e))?;
        Self::new(inner, pad, CLIP_MAX_LENGTH).map_err(|e| tokenizer_error(path, e))
    }

    fn new(inner: Tokenizer, pad: &str, max_length: usize) -> std::result::Result<Self, String> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .map(i64::from)
                .ok_or_else(|| format!("the vocabulary has no `{t}` token"))
        };
        Ok(Self {
            bos_id: id(BOS)?,
            eos_id: id(EOS)?,
            pad_id: id(pad)?,
            max_length,
            inner,
            last_extended: Mutex::new(None),
        })
    }

    /// The sequence length every encoding has.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// One more than the largest token id it can produce.
    pub fn id_bound(&self) -> i64 {
        let largest = self
            .inner
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, i64::from);
        largest.max(self.bos_id).max(self.eos_id).max(self.pad_id) + 1
    }

    /// Token ids of `text`: BOS, at most `max_length - 2` tokens, EOS, then padding, as
    /// diffusers asks transformers for them (`padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::InvalidRequest(format!("cannot tokenize prompt: {e}")))?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(
            encoding
                .get_ids()
                .iter()
                .take(self.max_length - 2)
                .map(|&i| i64::from(i)),
        );
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Whether `token` is one of its tokens (a vocabulary entry or an added token), as
    /// transformers' `token in tokenizer.get_vocab()` asks.
    pub fn knows(&self, token: &str) -> bool {
        self.inner.token_to_id(token).is_some()
    }

    /// A copy that also has `tokens`, added as transformers' `add_tokens` adds words
    /// (matched in the normalized text before the BPE, so case-insensitively, anywhere
    /// in a word), in order: the copy and each token's id.
    pub fn with_added_tokens(&self, tokens: &[String]) -> Result<(Arc<Self>, Vec<i64>)> {
        let mut last = self
            .last_extended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(added) = last.as_ref().filter(|a| a.tokens == tokens) {
            return Ok((added.tokenizer.clone(), added.ids.clone()));
        }
        let mut inner = self.inner.clone();
        inner
            .add_tokens(tokens.iter().map(|t| AddedToken::from(t.as_str(), false)))
            .map_err(|e| EngineError::InvalidRequest(format!("cannot add tokens: {e}")))?;
        let ids = tokens
            .iter()
            .map(|t| {
                inner.token_to_id(t).map(i64::from).ok_or_else(|| {
                    EngineError::Internal(format!("the added token `{t}` has no id"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tokenizer = Arc::new(Self {
            inner,
            last_extended: Mutex::new(None),
            ..*self
        });
        *last = Some(AddedTokens {
            tokens: tokens.to_vec(),
            tokenizer: tokenizer.clone(),
            ids: ids.clone(),
        });
        Ok((tokenizer, ids))
    }

    /// The tokens of `text` as strings, untruncated, as transformers' `tokenize` gives
    /// them: BPE pieces, and for an added token the normalized text it matched.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::InvalidRequest(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_tokens().to_vec())
    }

    /// Token ids of `text` without BOS, EOS, padding or truncation.
    pub fn untruncated_ids(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::InvalidRequest(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// The vocabulary entry of `id` (`cat</w>`), as transformers' `convert_ids_to_tokens`.
    pub fn token_text(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.inner.id_to_token(id))
    }

    /// The id of a vocabulary entry (`,</w>`).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The ids of the beginning-of-text, end-of-text and padding tokens.
    pub fn special_ids(&self) -> (i64, i64, i64) {
        (self.bos_id, self.eos_id, self.pad_id)
    }

    /// Number of prompt tokens beyond what fits (dropped by truncation).
    pub fn overflow(&self, text: &str) -> usize {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().len().saturating_sub(self.max_length - 2))
            .unwrap_or(0)
    }
}

/// A `tokenizers` pipeline as transformers' CLIPTokenizer builds it from vocab and merges.
fn build(
    vocab: Map<String, Value>,
    merges: Vec<String>,
    pad: &str,
) -> std::result::Result<Tokenizer, String> {
    let mut special = vec![BOS.to_string(), EOS.to_string()];
    if !special.iter().any(|s| s == pad) {
        special.push(pad.to_string());
    }
    let added: Vec<Value> = special
        .iter()
        .filter_map(|t| vocab.get(t).map(|id| (t, id.clone())))
        .map(|(t, id)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::byte_symbols;

    #[test]
    fn byte_symbols_cover_every_byte_once() {
        let symbols = byte_symbols();
        assert_eq!(symbols.len(), 256);
        let mut sorted = symbols.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
        assert_eq!(symbols[0], '!');
    }
}
