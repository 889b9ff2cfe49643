//! What the prompt syntax tests share: a recorded conditioning case's parameters and
//! textual inversion embeddings, and the comparison of a conditioning with the recorded
//! one.

use std::collections::HashMap;

use sdxld::engine::pipeline::{Attended, GenerateParams, Placement, PromptEmbeds, SdxlPipeline};
use sdxld::engine::prompt_syntax::PromptSyntax;
use sdxld::engine::textual_inversion::Embedding;
use serde_json::Value;
use tch::Tensor;

use super::{assert_close, embedding_fixtures, fixtures};

/// The conditioning parameters of a recorded case (its four prompts) in `syntax`.
pub fn embed_params(case: &Value, syntax: PromptSyntax) -> GenerateParams {
    use sdxld::engine::request::Emphasis;
    let text = |key: &str| case[key].as_str().map(str::to_string);
    let emphasis = match case["emphasis"].as_str() {
        Some("No norm") => Emphasis::NoNorm,
        Some("Ignore") => Emphasis::Ignore,
        Some("None") => Emphasis::Literal,
        _ => Emphasis::Original,
    };
    GenerateParams {
        prompt: text("prompt").expect("prompt"),
        prompt_2: text("prompt_2"),
        negative_prompt: text("negative_prompt"),
        negative_prompt_2: text("negative_prompt_2"),
        prompt_syntax: syntax,
        emphasis,
        ..Default::default()
    }
}

/// The case's textual inversion embeddings on `config` (`embeddings`: [file stem, token
/// or null]).
pub fn case_embeddings(config: &str, case: &Value) -> Vec<Embedding> {
    let Some(list) = case["embeddings"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let name = e[0].as_str().expect("name");
            let token = e[1].as_str().unwrap_or(name);
            let path = embedding_fixtures()
                .join(config)
                .join("embeddings")
                .join(format!("{name}.safetensors"));
            Embedding::read(&path, i, name, token).expect("embedding")
        })
        .collect()
}

/// `got` against the recorded `{key}.embeds`, `.pooled`, `.negative_embeds` and
/// `.negative_pooled` (without a recorded negative: SDXL's zeros, as long as the prompt).
pub fn assert_conditioning(
    what: &str,
    got: &PromptEmbeds,
    reference: &HashMap<String, Tensor>,
    key: &str,
) {
    let expected = |name: &str| &reference[&format!("{key}.{name}")];
    let (negative, negative_pooled) = got.text.negative.as_ref().expect("guidance");
    let mut pairs = vec![("embeds", &got.text.embeds), ("pooled", &got.text.pooled)];
    if reference.contains_key(&format!("{key}.negative_embeds")) {
        pairs.extend([
            ("negative_embeds", negative),
            ("negative_pooled", negative_pooled),
        ]);
    } else {
        assert_eq!(
            negative.size()[1..],
            got.text.embeds.size()[1..],
            "{what} zero negative shape"
        );
        assert_eq!(negative.abs().max().double_value(&[]), 0.0, "{what} zeros");
    }
    for (name, tensor) in pairs {
        assert_eq!(tensor.size(), expected(name).size(), "{what} {name} shape");
        assert_close(&format!("{what} {name}"), tensor, expected(name));
    }
    // Where prompt and negative have lengths of their own, each attends to its own.
    let tokens = |name: &str| {
        let t = reference.get(&format!("{key}.{name}"));
        t.map(|t| t.double_value(&[]) as i64)
    };
    if let (Some(prompt), Some(negative)) = (tokens("tokens"), tokens("negative_tokens")) {
        let expected = (prompt != negative).then_some(Attended { prompt, negative });
        assert_eq!(got.text.attended, expected, "{what} attended tokens");
    }
    if let Some(weights) = reference.get(&format!("{key}.weights")) {
        let weights = Vec::<f64>::try_from(weights.to_kind(tch::Kind::Double)).expect("weights");
        let close = got.weights.len() == weights.len()
            && got
                .weights
                .iter()
                .zip(&weights)
                .all(|(a, b)| (a - b).abs() < 1e-6);
        assert!(
            close,
            "{what} sub-prompt weights {:?}, not {weights:?}",
            got.weights
        );
    }
}

/// `syntax`'s conditioning of short prompts on tiny2, each with an empty negative prompt.
pub struct ShortPrompts {
    pipe: SdxlPipeline,
    syntax: PromptSyntax,
}

impl ShortPrompts {
    pub fn on_tiny2(syntax: PromptSyntax) -> Self {
        let pipe = SdxlPipeline::load(&fixtures().join("tiny2/pipeline"), Placement::cpu())
            .expect("pipeline");
        Self { pipe, syntax }
    }

    /// The conditioning of `prompt` in the syntax (`syntax` None), or plainly.
    pub fn encode(&self, prompt: &str, syntax: Option<PromptSyntax>) -> PromptEmbeds {
        let params = GenerateParams {
            prompt: prompt.into(),
            negative_prompt: Some(String::new()),
            prompt_syntax: syntax.unwrap_or(self.syntax),
            ..Default::default()
        };
        self.pipe.encode_prompt(&params).expect("encode")
    }

    /// Asserts that `unweighted` reads as the plain prompt does (one chunk, as diffusers
    /// encodes it) and that each of `weighted` moves its embeddings; the plain reading.
    pub fn assert_weights_move(&self, unweighted: &str, weighted: &[&str]) -> PromptEmbeds {
        let plain = self.encode(unweighted, Some(PromptSyntax::Plain));
        let read = self.encode(unweighted, None);
        assert_close("unweighted", &read.text.embeds, &plain.text.embeds);
        assert_close("unweighted pooled", &read.text.pooled, &plain.text.pooled);
        for prompt in weighted {
            let got = self.encode(prompt, None);
            let diff = (&got.text.embeds - &plain.text.embeds)
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                diff > 1e-2,
                "{prompt}: the weight changed the embeddings by {diff}"
            );
        }
        plain
    }
}
