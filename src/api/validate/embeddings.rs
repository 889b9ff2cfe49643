//! Textual inversion embeddings: names and tokens.

use std::sync::OnceLock;

use crate::api::validate::fields::{model_name, Violations};
use crate::api::validate::model::named;
use crate::api::validate::Deferred;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::registry::{ModelKind, Registry};
use crate::engine::textual_inversion::default_token;
use crate::jobs::EmbeddingJob;
use crate::proto::v1 as pb;

/// Most embeddings in one request.
pub const MAX_EMBEDDINGS: usize = 16;

/// Longest token, in characters.
const MAX_TOKEN_CHARS: usize = 64;

/// `spec.embeddings`: each a known embedding with a token of its own that CLIP's
/// vocabulary does not have (default: the file's stem).
pub fn embeddings(
    embeddings: &[pb::TextualInversion],
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<EmbeddingJob> {
    if embeddings.len() > MAX_EMBEDDINGS {
        v.add(
            "spec.embeddings",
            format!(
                "has {} embeddings; at most {MAX_EMBEDDINGS}",
                embeddings.len()
            ),
        );
        return Vec::new();
    }
    let mut jobs = Vec::with_capacity(embeddings.len());
    let mut tokens: Vec<String> = Vec::with_capacity(embeddings.len());
    for (i, embedding) in embeddings.iter().enumerate() {
        let field = format!("spec.embeddings[{i}]");
        let name_field = format!("{field}.name");
        if embedding.name.is_empty() {
            v.add(name_field, "is required");
            continue;
        }
        if !model_name(v, &name_field, &embedding.name) {
            continue;
        }
        let token = match embedding.token.as_str() {
            "" => default_token(&embedding.name),
            token => token,
        };
        let token_field = format!("{field}.token");
        if let Some(problem) = token_problem(token, &tokens) {
            v.add(token_field, format!("`{token}` {problem}"));
            continue;
        }
        tokens.push(token.to_string());
        if let Some(model) = named(
            registry,
            ModelKind::Embedding,
            &embedding.name,
            &name_field,
            v,
            deferred,
        ) {
            jobs.push(EmbeddingJob {
                model,
                token: token.to_string(),
            });
        }
    }
    jobs
}

/// Why `token` cannot stand for an embedding beside the earlier `taken` tokens.
fn token_problem(token: &str, taken: &[String]) -> Option<String> {
    let chars = token.chars().count();
    if chars > MAX_TOKEN_CHARS {
        return Some(format!(
            "is {chars} characters long; at most {MAX_TOKEN_CHARS}"
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("holds whitespace or a control character; a token is one word".into());
    }
    if taken.iter().any(|t| t == token) {
        return Some("is also an earlier embedding's token".into());
    }
    if let Some(base) = taken.iter().find(|t| is_vector_name(token, t)) {
        return Some(format!(
            "is how the embedding of `{base}` names its further vectors (`{base}_1`, ...)"
        ));
    }
    if let Some(base) = taken.iter().find(|t| is_vector_name(t, token)) {
        return Some(format!(
            "names its further vectors `{token}_1`, ..., as an earlier token (`{base}`) is named"
        ));
    }
    let vocabulary = clip_vocabulary()?;
    let known = [token.to_string(), format!("{token}_1")]
        .into_iter()
        .find(|t| vocabulary.knows(t))?;
    Some(format!(
        "is already a CLIP token (`{known}`), which diffusers refuses to redefine; choose another token"
    ))
}

/// Whether `name` is `base` followed by `_` and digits.
fn is_vector_name(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// CLIP's vocabulary, as every SDXL model's tokenizers have it (`None` in a build
/// without it; the engine then checks each model's own tokenizer).
fn clip_vocabulary() -> Option<&'static ClipTokenizer> {
    static VOCABULARY: OnceLock<Option<ClipTokenizer>> = OnceLock::new();
    VOCABULARY
        .get_or_init(|| ClipTokenizer::builtin("<|endoftext|>").ok())
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refused_for_what_diffusers_refuses() {
        let taken = vec!["neg".to_string()];
        assert_eq!(token_problem("negxl", &taken), None);
        assert!(token_problem("neg", &taken).is_some());
        assert!(token_problem("neg_2", &taken).is_some());
        assert_eq!(token_problem("neg_x", &taken), None);
        assert!(token_problem("a b", &[]).is_some());
        assert!(token_problem(&"x".repeat(65), &[]).is_some());
        let earlier = vec!["style_1".to_string()];
        assert!(token_problem("style", &earlier).is_some());
        if clip_vocabulary().is_some() {
            assert!(token_problem("glow", &[]).unwrap().contains("CLIP token"));
            assert_eq!(token_problem("lighthouse_style", &[]), None);
        }
    }
}
