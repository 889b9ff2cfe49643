//! A1111's composable prompts (`prompt_parser.get_multicond_prompt_list`): a prompt splits
//! at every `AND` that stands as a word of its own into sub-prompts, each of which may
//! end in `:weight`. Each sub-prompt is conditioned on by itself and the predictions are
//! combined as `uncond + Σ weight × scale × (cond − uncond)` (A1111's `combine_denoised`),
//! so a single sub-prompt's weight scales its guidance. Negative prompts do not split:
//! A1111 reads `AND` in them as text.

use std::sync::OnceLock;

use regex::Regex;

use super::{SyntaxError, MAX_PARTS, MAX_WEIGHT};

/// One sub-prompt: its text and its guidance weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubPrompt<'a> {
    pub text: &'a str,
    pub weight: f64,
    /// Whether the weight was written (`:1` is written too).
    pub written: bool,
}

/// A sub-prompt of `prompt` paired with its `prompt_2` text, which the second encoder
/// reads in place of `text` when it is present.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptPart<'a> {
    pub text: &'a str,
    pub text_2: Option<&'a str>,
    pub weight: f64,
}

/// Which of the two prompts a composition cannot be made of, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum PartsError {
    Prompt(SyntaxError),
    Prompt2(SyntaxError),
}

/// Python's `\w+` on `str`: runs of letters, numbers and underscores. A run that is
/// exactly `AND` is A1111's `\bAND\b`.
fn words() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[\p{L}\p{N}_]+").expect("the word pattern compiles"))
}

/// A1111's `re_weight`, with Python's `\s` (`str.isspace`) for whitespace.
fn weight_suffix() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        let space = r"[\s\x1c-\x1f]";
        let pattern =
            format!(r"(?s)^(.*?)(?:{space}*:{space}*([-+]?(?:\d+\.?|\d*\.\d+)))?{space}*$");
        Regex::new(&pattern).expect("the weight pattern compiles")
    })
}

/// `prompt`'s sub-prompts, as A1111 splits and weighs them, at most [`MAX_PARTS`], each
/// weight finite within [`MAX_WEIGHT`].
pub fn sub_prompts(prompt: &str) -> Result<Vec<SubPrompt<'_>>, SyntaxError> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for word in words().find_iter(prompt).filter(|m| m.as_str() == "AND") {
        pieces.push(&prompt[start..word.start()]);
        start = word.end();
    }
    pieces.push(&prompt[start..]);
    if pieces.len() > MAX_PARTS {
        return Err(SyntaxError::TooComplex(format!(
            "joins {} sub-prompts with AND, more than {MAX_PARTS}",
            pieces.len()
        )));
    }
    pieces.into_iter().map(weighed).collect()
}

/// A sub-prompt's text and weight (1 unless it ends in `:weight`).
fn weighed(piece: &str) -> Result<SubPrompt<'_>, SyntaxError> {
    let Some(caps) = weight_suffix().captures(piece) else {
        return Ok(SubPrompt {
            text: piece,
            weight: 1.0,
            written: false,
        });
    };
    let text = caps.get(1).map_or(piece, |m| m.as_str());
    let Some(written) = caps.get(2).map(|m| m.as_str()) else {
        return Ok(SubPrompt {
            text,
            weight: 1.0,
            written: false,
        });
    };
    // Python's `float()` reads every script's decimal digits; sdxld only ASCII ones.
    if !written.is_ascii() {
        return Err(SyntaxError::Unsupported(format!(
            "weighs a sub-prompt `{written}`, in digits other than 0-9"
        )));
    }
    let weight: f64 = written.parse().map_err(|_| {
        SyntaxError::Unsupported(format!("weighs a sub-prompt `{written}`, not a number"))
    })?;
    if !weight.is_finite() || weight.abs() > MAX_WEIGHT {
        return Err(SyntaxError::Weight(weight));
    }
    Ok(SubPrompt {
        text,
        weight,
        written: true,
    })
}

/// `prompt`'s sub-prompts paired with `prompt_2`'s (absent or empty: the second encoder
/// reads each sub-prompt's own text). `prompt_2` splits the same way and has as many
/// sub-prompts, or one that every sub-prompt pairs with; the weights are the prompt's,
/// and a weight `prompt_2` writes must be the same.
pub fn prompt_parts<'a>(
    prompt: &'a str,
    prompt_2: Option<&'a str>,
) -> Result<Vec<PromptPart<'a>>, PartsError> {
    let parts = sub_prompts(prompt).map_err(PartsError::Prompt)?;
    let seconds = match prompt_2.filter(|t| !t.is_empty()) {
        Some(text) => sub_prompts(text).map_err(PartsError::Prompt2)?,
        None => Vec::new(),
    };
    if seconds.len() > 1 && seconds.len() != parts.len() {
        return Err(PartsError::Prompt2(SyntaxError::Unsupported(format!(
            "joins {} sub-prompts with AND and the prompt {}: each of the prompt's pairs with one of prompt_2's, or all with a prompt_2 without AND",
            seconds.len(),
            parts.len()
        ))));
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let second = seconds.get(i).or(seconds.first());
            if let Some(weight) = second
                .filter(|s| s.written && s.weight != part.weight)
                .map(|s| s.weight)
            {
                return Err(PartsError::Prompt2(SyntaxError::Unsupported(format!(
                    "weighs sub-prompt {} by {weight}, the prompt by {}: the prompt's weights apply to both",
                    i + 1,
                    part.weight
                ))));
            }
            Ok(PromptPart {
                text: part.text,
                text_2: second.map(|s| s.text).filter(|t| !t.is_empty()),
                weight: part.weight,
            })
        })
        .collect()
}

/// Whether parts make more than plain guidance: several sub-prompts, or a weight.
pub fn composes(parts: &[PromptPart<'_>]) -> bool {
    parts.len() > 1 || parts.iter().any(|p| p.weight != 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(prompt: &str) -> Vec<(&str, f64)> {
        sub_prompts(prompt)
            .expect("splits")
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    #[test]
    fn and_splits_only_as_a_word_of_its_own() {
        assert_eq!(split("a cat AND a dog"), [("a cat", 1.0), (" a dog", 1.0)]);
        assert_eq!(
            split("ANDROID, BRAND, x_AND_y, éAND"),
            [("ANDROID, BRAND, x_AND_y, éAND", 1.0)]
        );
        assert_eq!(split("a(AND)b"), [("a(", 1.0), (")b", 1.0)]);
        assert_eq!(split("AND"), [("", 1.0), ("", 1.0)]);
        assert_eq!(split("a AND AND b"), [("a", 1.0), ("", 1.0), (" b", 1.0)]);
        assert_eq!(split("and And"), [("and And", 1.0)]);
        assert_eq!(split("[a AND b:c:3]"), [("[a", 1.0), (" b:c:3]", 1.0)]);
    }

    #[test]
    fn a_trailing_number_after_a_colon_weighs_its_sub_prompt() {
        assert_eq!(
            split("a cat :1.2 AND a dog:-0.5 \n"),
            [("a cat", 1.2), (" a dog", -0.5)]
        );
        assert_eq!(split("a cat:0.5"), [("a cat", 0.5)]);
        assert_eq!(split("a:1.5:2"), [("a:1.5", 2.0)]);
        assert_eq!(split("a: 1. "), [("a", 1.0)]);
        assert_eq!(split("a:.25"), [("a", 0.25)]);
        assert_eq!(split("a:+3"), [("a", 3.0)]);
        for text in ["(a:1.2)", "[a:b:5]", "a:1.2.3", "a:", "a:1e2", "a 1.5"] {
            assert_eq!(split(text), [(text.trim_end(), 1.0)], "{text}");
        }
        assert!(matches!(
            sub_prompts("a:101"),
            Err(SyntaxError::Weight(w)) if w == 101.0
        ));
        let huge = format!("a:{}", "9".repeat(400));
        assert!(matches!(sub_prompts(&huge), Err(SyntaxError::Weight(_))));
        assert!(matches!(
            sub_prompts("a:\u{663}"),
            Err(SyntaxError::Unsupported(_))
        ));
        let many = ["a"; MAX_PARTS + 1].join(" AND ");
        assert!(matches!(
            sub_prompts(&many),
            Err(SyntaxError::TooComplex(_))
        ));
        assert_eq!(split(&["a"; MAX_PARTS].join(" AND ")).len(), MAX_PARTS);
    }

    #[test]
    fn prompt_2_pairs_part_by_part_or_with_every_part() {
        let parts = prompt_parts("a:0.3 AND b", Some("x AND y")).expect("pairs");
        let texts: Vec<_> = parts.iter().map(|p| (p.text, p.text_2, p.weight)).collect();
        assert_eq!(texts, [("a", Some("x"), 0.3), (" b", Some(" y"), 1.0)]);
        let shared = prompt_parts("a AND b", Some("style")).expect("pairs");
        assert!(shared.iter().all(|p| p.text_2 == Some("style")));
        let none = prompt_parts("a AND b", Some("")).expect("pairs");
        assert!(none.iter().all(|p| p.text_2.is_none()));
        assert!(prompt_parts("a:0.5 AND b", Some("x:0.5 AND y")).is_ok());
        assert!(matches!(
            prompt_parts("a:0.5", Some("x:1")),
            Err(PartsError::Prompt2(_))
        ));
        assert!(matches!(
            prompt_parts("a AND b AND c", Some("x AND y")),
            Err(PartsError::Prompt2(_))
        ));
        assert!(matches!(
            prompt_parts("a:0.5 AND b", Some("x:2 AND y")),
            Err(PartsError::Prompt2(_))
        ));
        assert!(matches!(
            prompt_parts("a:1000", None),
            Err(PartsError::Prompt(_))
        ));
        assert!(!composes(&prompt_parts("a cat", None).expect("pairs")));
        assert!(composes(&prompt_parts("a cat:0.7", None).expect("pairs")));
        assert!(composes(&prompt_parts("a AND b", None).expect("pairs")));
    }
}
