//! Weighted prompts in compel's syntax (the syntax of InvokeAI and of diffusers' prompt
//! weighting guide): `word+`, `word-`, `(several words)1.3`, `"quoted words"0.8`,
//! `(...).attend(w)`, blends `("a", "b").blend(0.7, 0.3)` and conjunctions
//! `("a", "b").and()`, encoded without truncation in 75-token chunks (`weighting`);
//! and AUTOMATIC1111's syntax (`a1111`), encoded with its emphasis (`emphasis`).
//! Parsing is pure, so the API checks a prompt before admitting its job.

pub mod a1111;
pub mod a1111_compose;
mod a1111_grammar;
pub mod a1111_networks;
pub mod a1111_schedule;
pub mod emphasis;
mod grammar;
mod lexical;
pub mod weighting;

use grammar::{Node, Parser, TopPart};
use lexical::{fragment_text, py_space};
use serde_json::{json, Value};

/// At most this many fragments weighted below 1 in one prompt: each costs one more pass
/// of the text encoders over the whole prompt.
pub const MAX_DOWNWEIGHTED: usize = 16;
/// At most this many blended or conjoined prompts in one prompt.
pub const MAX_PARTS: usize = 8;
/// Parentheses, quotes and operator lists nest at most this deep.
pub const MAX_NESTING: usize = 32;
/// Weights of fragments, blends and conjunctions are at most this large in magnitude.
pub const MAX_WEIGHT: f64 = 100.0;

/// The second encoder's text: `text_2`, or `text` when it is absent or empty.
pub fn second_text<'a>(text: &'a str, text_2: Option<&'a str>) -> &'a str {
    text_2.filter(|s| !s.is_empty()).unwrap_or(text)
}

/// How prompts are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// As diffusers' `encode_prompt` reads them: plain text, truncated to 75 tokens.
    #[default]
    Plain,
    /// compel's syntax, without truncation.
    Compel,
    /// AUTOMATIC1111's syntax and emphasis, without truncation.
    A1111,
}

/// How A1111's syntax applies its weights (A1111's `sd_emphasis` options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Emphasis {
    /// "Original": the hidden states times their token's weight, scaled back to the
    /// mean they had.
    #[default]
    Original,
    /// "No norm": times the weights, not scaled back.
    NoNorm,
    /// "Ignore": the weights read, not applied.
    Ignore,
    /// "None": the text read literally (no brackets, weights or BREAK).
    Literal,
}

impl Emphasis {
    /// A1111's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Emphasis::Original => "Original",
            Emphasis::NoNorm => "No norm",
            Emphasis::Ignore => "Ignore",
            Emphasis::Literal => "None",
        }
    }
}

/// Why a prompt cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SyntaxError {
    /// compel's parser refuses it.
    #[error("is not valid compel syntax: {0}")]
    Unparsable(String),
    /// `.swap()`, which needs cross-attention control.
    #[error("uses `.swap()`, cross-attention control, which sdxld does not do")]
    Swap,
    /// `withLora()`/`useLora()`.
    #[error("names a LoRA with `withLora()`/`useLora()`: name LoRA adapters in `spec.loras`")]
    Lora,
    /// A weight outside what the encoders can take.
    #[error("has a weight of {0}, outside [-{MAX_WEIGHT}, {MAX_WEIGHT}]")]
    Weight(f64),
    /// A blend whose normalised weights divide by zero.
    #[error("blends with weights that sum to 0")]
    ZeroBlend,
    /// Too many parts or down-weighted fragments.
    #[error("{0}")]
    TooComplex(String),
    /// A construct of A1111's syntax that sdxld does not encode.
    #[error("{0}")]
    Unsupported(String),
}

/// Text and its weight: a fragment of a flattened prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    pub text: String,
    pub weight: f64,
}

/// A prompt part of a conjunction.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Fragments encoded together.
    Fragments(Vec<Fragment>),
    /// Several fragment lists encoded apart and mixed by weight (normalised to sum 1
    /// when `normalize`).
    Blend {
        prompts: Vec<Vec<Fragment>>,
        weights: Vec<f64>,
        normalize: bool,
    },
}

/// A parsed prompt: its parts, each with its conjunction weight, concatenated along the
/// tokens when encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedPrompt {
    pub parts: Vec<(Part, f64)>,
}

/// Parses `prompt` as compel's `parse_prompt_string` does and checks it is one sdxld
/// encodes: no swaps, no LoRA terms, finite weights within [`MAX_WEIGHT`], blends that
/// normalise, at most [`MAX_PARTS`] parts and [`MAX_DOWNWEIGHTED`] weights below 1.
pub fn parse(prompt: &str) -> Result<WeightedPrompt, SyntaxError> {
    let parsed = parse_unchecked(prompt)?;
    check(&parsed)?;
    Ok(parsed)
}

/// compel's parse, with swaps and LoRA terms refused but weights unchecked.
pub fn parse_unchecked(prompt: &str) -> Result<WeightedPrompt, SyntaxError> {
    let spaced = space_commas(prompt);
    if spaced.chars().all(py_space) {
        let empty = Fragment {
            text: String::new(),
            weight: 1.0,
        };
        return Ok(WeightedPrompt {
            parts: vec![(Part::Fragments(vec![empty]), 1.0)],
        });
    }
    let tree = Parser::new(&spaced).parse()?;
    let weights = if tree.weights.is_empty() {
        vec![1.0; tree.parts.len()]
    } else if tree.weights.len() == tree.parts.len() {
        tree.weights
    } else {
        return Err(SyntaxError::Unparsable(format!(
            "{} prompts with {} weights",
            tree.parts.len(),
            tree.weights.len()
        )));
    };
    let mut parts = Vec::new();
    for (part, weight) in tree.parts.into_iter().zip(weights) {
        if let Some(part) = flatten_part(part)? {
            parts.push((part, weight));
        }
    }
    if parts.is_empty() {
        return Err(SyntaxError::Unparsable("it holds no prompt".into()));
    }
    Ok(WeightedPrompt { parts })
}

/// compel's `re.sub(r',(\S)', r', \1', prompt)`.
fn space_commas(prompt: &str) -> String {
    let chars: Vec<char> = prompt.chars().collect();
    let mut out = String::with_capacity(prompt.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        out.push(chars[i]);
        if chars[i] == ',' && chars.get(i + 1).is_some_and(|c| !py_space(*c)) {
            out.push(' ');
            out.push(chars[i + 1]);
            i += 1;
        }
        i += 1;
    }
    out
}

fn flatten_part(part: TopPart) -> Result<Option<Part>, SyntaxError> {
    match part {
        TopPart::Prompt(nodes) => Ok(flatten_prompt(&nodes)?.map(Part::Fragments)),
        TopPart::Blend {
            prompts,
            weights,
            normalize,
        } => {
            let count = prompts.len();
            let weights = if weights.is_empty() {
                vec![1.0; count]
            } else {
                weights
            };
            let mut flattened = Vec::new();
            for nodes in &prompts {
                flattened.extend(flatten_prompt(nodes)?);
            }
            if flattened.len() != weights.len() || count != weights.len() {
                return Err(SyntaxError::Unparsable(format!(
                    "`.blend()` of {count} prompts with {} weights",
                    weights.len()
                )));
            }
            Ok(Some(Part::Blend {
                prompts: flattened,
                weights,
                normalize,
            }))
        }
    }
}

/// compel's `flatten` of one prompt: fragments with their weights multiplied through,
/// neighbours of equal weight joined by a space; `None` without any text.
fn flatten_prompt(nodes: &[Node]) -> Result<Option<Vec<Fragment>>, SyntaxError> {
    let mut flat = Vec::new();
    collect(nodes, 1.0, &mut flat)?;
    let mut fused: Vec<Fragment> = Vec::new();
    for fragment in flat {
        match fused.last_mut() {
            Some(last) if last.weight == fragment.weight => {
                last.text = fragment_text(&format!("{} {}", last.text, fragment.text));
            }
            _ => fused.push(fragment),
        }
    }
    Ok((!fused.is_empty()).then_some(fused))
}

fn collect(nodes: &[Node], scale: f64, out: &mut Vec<Fragment>) -> Result<(), SyntaxError> {
    for node in nodes {
        match node {
            Node::Text(text) => out.push(Fragment {
                text: fragment_text(text),
                weight: scale,
            }),
            Node::Attention(weight, children) => collect(children, scale * weight, out)?,
            Node::Swap => return Err(SyntaxError::Swap),
            Node::Lora => return Err(SyntaxError::Lora),
        }
    }
    Ok(())
}

fn check(prompt: &WeightedPrompt) -> Result<(), SyntaxError> {
    let mut parts = 0;
    let mut downweighted = 0;
    let mut weights = Vec::new();
    for (part, weight) in &prompt.parts {
        weights.push(*weight);
        let lists: Vec<&Vec<Fragment>> = match part {
            Part::Fragments(fragments) => vec![fragments],
            Part::Blend {
                prompts,
                weights: blend,
                normalize,
            } => {
                weights.extend(blend);
                if *normalize && blend.iter().sum::<f64>() == 0.0 {
                    return Err(SyntaxError::ZeroBlend);
                }
                prompts.iter().collect()
            }
        };
        parts += lists.len();
        for fragment in lists.into_iter().flatten() {
            weights.push(fragment.weight);
            downweighted += usize::from(fragment.weight < 1.0 && !fragment.text.is_empty());
        }
    }
    if let Some(bad) = weights.iter().find(|w| w.is_nan() || w.abs() > MAX_WEIGHT) {
        return Err(SyntaxError::Weight(*bad));
    }
    if parts > MAX_PARTS {
        return Err(SyntaxError::TooComplex(format!(
            "has {parts} blended or conjoined prompts, more than {MAX_PARTS}"
        )));
    }
    if downweighted > MAX_DOWNWEIGHTED {
        return Err(SyntaxError::TooComplex(format!(
            "has {downweighted} fragments weighted below 1, more than {MAX_DOWNWEIGHTED}"
        )));
    }
    Ok(())
}

impl WeightedPrompt {
    /// The parse as JSON (fragments as `[text, weight]`), for comparing with compel's.
    pub fn describe(&self) -> Value {
        let fragments = |list: &[Fragment]| -> Value {
            list.iter()
                .map(|f| json!([f.text, f.weight]))
                .collect::<Vec<_>>()
                .into()
        };
        let parts: Vec<Value> = self
            .parts
            .iter()
            .map(|(part, _)| match part {
                Part::Fragments(list) => fragments(list),
                Part::Blend {
                    prompts,
                    weights,
                    normalize,
                } => json!({
                    "blend": prompts.iter().map(|p| fragments(p)).collect::<Vec<_>>(),
                    "weights": weights,
                    "normalize": normalize,
                }),
            })
            .collect();
        let weights: Vec<f64> = self.parts.iter().map(|(_, w)| *w).collect();
        json!({ "prompts": parts, "weights": weights })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        for text in [
            "(".repeat(10_000),
            format!("{}a{}", "(".repeat(40), ")".repeat(40)),
        ] {
            assert!(
                matches!(parse(&text), Err(SyntaxError::TooComplex(_))),
                "{}",
                &text[..50]
            );
        }
        let nested = format!("{}a{}1.1", "(".repeat(30), ")".repeat(30));
        let parsed = parse(&nested).expect("30 levels");
        assert_eq!(parsed.parts.len(), 1);
    }

    #[test]
    fn arbitrary_text_parses_or_is_refused_quickly() {
        let pieces = [
            "(",
            ")",
            "\"",
            "\\",
            "+",
            "-",
            ".",
            ",",
            "=",
            " ",
            "\t",
            "\n",
            "a",
            "1",
            "é",
            "\u{b}",
            "\u{3000}",
            ".and(",
            ".blend(",
            ".swap(",
            "withLora(",
            ".attend(",
        ];
        let mut state = 12345u64;
        for _ in 0..3000 {
            let mut text = String::new();
            for _ in 0..(state % 60) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push_str(pieces[(state >> 33) as usize % pieces.len()]);
            }
            let _ = parse(&text);
        }
        let long = "\"\\\"".repeat(1500);
        let _ = parse(&long);
    }

    #[test]
    fn limits_are_counted_on_the_flattened_prompt() {
        // Neighbours of one weight fuse into one fragment (as compel fuses them).
        assert!(parse(&"(a b)0.5 ".repeat(40)).is_ok());
        let err = parse(&"(a b)0.5 c ".repeat(17)).expect_err("17 fragments below 1");
        assert!(matches!(err, SyntaxError::TooComplex(_)), "{err}");
        assert_eq!(parse("(a)101"), Err(SyntaxError::Weight(101.0)));
        assert_eq!(
            parse(r#"("a", "b").blend(1, -1)"#),
            Err(SyntaxError::ZeroBlend)
        );
        assert!(parse(r#"("a", "b").blend(1, -1, no_normalize)"#).is_ok());
        let parts = format!("({}).and()", ["\"x\""; 9].join(", "));
        assert!(matches!(parse(&parts), Err(SyntaxError::TooComplex(_))));
    }
}
