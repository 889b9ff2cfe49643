//! A1111's extra networks in a prompt (`extra_networks.parse_prompt`): every `<kind:args>`
//! is taken out of the prompt before anything else reads it (so a tag inside an edit or
//! a sub-prompt acts on the whole run), its arguments split at `:`; an argument with
//! exactly one `=` is named. `<lora:name:te:unet>` (and its alias `lyco`) names a LoRA
//! with a multiplier for the text encoders and one for the UNet, read as A1111's
//! `ExtraNetworkLora.activate` reads them: `te` the second positional argument or
//! `te=` (default 1), `unet` the third or `unet=` (default `te`), each with Python's
//! `float()`.

use std::sync::OnceLock;

use regex::Regex;

use super::lexical::{py_space, python_float};
use super::SyntaxError;

/// A LoRA a prompt names.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLora {
    /// The name as written (A1111's `mentioned_name`).
    pub name: String,
    /// The text encoders' multiplier.
    pub text_encoder_weight: f64,
    /// The UNet's multiplier.
    pub unet_weight: f64,
    /// The tag as written, for messages.
    pub tag: String,
}

/// A prompt with its extra networks taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraNetworks {
    /// What the prompt reads without its tags.
    pub text: String,
    /// The LoRAs its tags name, in the order written.
    pub loras: Vec<PromptLora>,
}

/// A1111's `re_extra_net` with Python's `\w` (letters, numbers, `_`).
fn tag() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<([\p{L}\p{N}_]+):([^>]+)>").expect("the tag pattern compiles"))
}

/// The first extra network tag in `text`, if it has one.
pub fn first_tag(text: &str) -> Option<&str> {
    tag().find(text).map(|m| m.as_str())
}

/// `text` without its extra network tags.
pub fn without_tags(text: &str) -> String {
    tag().replace_all(text, "").into_owned()
}

/// `prompt` without its extra network tags, and the LoRAs they name; a tag of another
/// kind, or one A1111 would not read as numbers, is an error naming it.
pub fn extra_networks(prompt: &str) -> Result<ExtraNetworks, SyntaxError> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut last = 0;
    for caps in tag().captures_iter(prompt) {
        let (whole, kind, args) = (&caps[0], &caps[1], &caps[2]);
        let range = caps.get(0).map_or(0..0, |m| m.range());
        text.push_str(&prompt[last..range.start]);
        last = range.end;
        match kind {
            "lora" | "lyco" => loras.push(lora(whole, args)?),
            _ => {
                return Err(SyntaxError::Unsupported(format!(
                    "names the extra network `{whole}`: of A1111's extra networks sdxld runs LoRAs (`<lora:name:weight>`) only"
                )))
            }
        }
    }
    text.push_str(&prompt[last..]);
    Ok(ExtraNetworks { text, loras })
}

/// One `<lora:...>` tag's arguments, as `ExtraNetworkParams` and `activate` read them.
fn lora(whole: &str, args: &str) -> Result<PromptLora, SyntaxError> {
    let unsupported = |why: String| SyntaxError::Unsupported(format!("has `{whole}`, which {why}"));
    let mut positional = Vec::new();
    let mut named: Vec<(&str, &str)> = Vec::new();
    for item in args.split(':') {
        // Python's `item.split('=', 2)` makes two parts for exactly one `=`.
        match item.split_once('=') {
            Some((key, value)) if !value.contains('=') => {
                named.retain(|(k, _)| *k != key);
                named.push((key, value));
            }
            _ => positional.push(item),
        }
    }
    let Some(&name) = positional.first() else {
        return Err(unsupported(
            "names no LoRA: its first argument is the name".into(),
        ));
    };
    let named_value = |key: &str| named.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let number = |text: &str| multiplier(text).map_err(&unsupported);
    // Python evaluates the positional multiplier before the named one replaces it.
    let mut te = positional.get(1).map_or(Ok(1.0), |t| number(t))?;
    if let Some(t) = named_value("te") {
        te = number(t)?;
    }
    let mut unet = positional.get(2).map_or(Ok(te), |t| number(t))?;
    if let Some(t) = named_value("unet") {
        unet = number(t)?;
    }
    if positional.len() > 3 || named_value("dyn").is_some() {
        return Err(unsupported(
            "sets `dyn`, a cut of the LoRA's rank, which sdxld does not make".into(),
        ));
    }
    if let Some((key, _)) = named.iter().find(|(k, _)| !matches!(*k, "te" | "unet")) {
        return Err(unsupported(format!(
            "sets `{key}`, which A1111's LoRAs do not read (`te=`, `unet=`)"
        )));
    }
    Ok(PromptLora {
        name: name.to_string(),
        text_encoder_weight: te,
        unet_weight: unet,
        tag: whole.to_string(),
    })
}

/// Python's `float()` of a multiplier: whitespace around it, `_` between digits, `inf`
/// and `nan`; digits of other scripts, which Python reads too, are refused rather than
/// guessed at.
fn multiplier(text: &str) -> Result<f64, String> {
    let trimmed = text.trim_matches(py_space);
    if !trimmed.is_ascii() {
        return Err(format!(
            "gives the multiplier `{text}` in characters other than ASCII digits"
        ));
    }
    python_float(trimmed).ok_or_else(|| format!("gives the multiplier `{text}`, not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(prompt: &str) -> (String, Vec<(String, f64, f64)>) {
        let networks = extra_networks(prompt).expect("reads");
        let loras = networks
            .loras
            .into_iter()
            .map(|l| (l.name, l.text_encoder_weight, l.unet_weight))
            .collect();
        (networks.text, loras)
    }

    #[test]
    fn tags_leave_the_prompt_and_name_their_multipliers() {
        let (text, loras) = read("a <lora:style:0.8>, cat<lyco:b:0.5:1.5> x");
        assert_eq!(text, "a , cat x");
        assert_eq!(
            loras,
            vec![("style".into(), 0.8, 0.8), ("b".into(), 0.5, 1.5)]
        );
        let (_, loras) = read("<lora:a> <lora:b:te=0.3:0.9> <lora:c:1:unet= 0.25 :te=2>");
        assert_eq!(
            loras,
            vec![
                ("a".into(), 1.0, 1.0),
                ("b".into(), 0.3, 0.3),
                ("c".into(), 2.0, 0.25)
            ]
        );
        // A tag needs a kind and arguments; `a=b=c` is positional, as in A1111.
        let (text, loras) = read("<lora> <:x> <lora:> [<lora:e:1_0.5e-1>:c:3]");
        assert_eq!(text, "<lora> <:x> <lora:> [:c:3]");
        assert_eq!(loras, vec![("e".into(), 1.05, 1.05)]);
        assert_eq!(read("<lora:a=b=c:0.5>").1, vec![("a=b=c".into(), 0.5, 0.5)]);
    }

    #[test]
    fn tags_a1111_would_not_read_are_refused() {
        for prompt in [
            "<hypernet:x:1>",
            "<lora:x:abc>",
            "<lora:x:>",
            "<lora:x:1:2:8>",
            "<lora:x:dyn=8>",
            "<lora:x:lbw=1,0>",
            "<lora:te=1>",
            "<lora:x:\u{0661}>",
            "<lora:x:bad:te=1>",
        ] {
            assert!(extra_networks(prompt).is_err(), "{prompt}");
        }
        let (_, loras) = read("<lora:x:nan:inf>");
        assert!(loras[0].1.is_nan() && loras[0].2.is_infinite());
    }
}
