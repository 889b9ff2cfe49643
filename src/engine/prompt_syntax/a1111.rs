//! Prompts in AUTOMATIC1111's syntax (its `prompt_parser.parse_prompt_attention`):
//! `(text)` weighs text 1.1 times, `[text]` 1/1.1 times, `(text:1.3)` 1.3 times, nested
//! weights multiply, unclosed brackets count until the end, `\(` `\)` `\[` `\]` `\\`
//! escape, and `BREAK` ends a 75-token chunk. Neighbours of equal weight are joined.
//! Prompt editing (`[from:to:when]`) and alternation (`[a|b]`) make a text per step
//! first ([`super::a1111_schedule`]), after `AND` has split a prompt into sub-prompts
//! ([`super::a1111_compose`]), and after the prompt's extra networks (`<lora:name:1>`)
//! have been taken out of it ([`super::a1111_networks`]); a tag left in a text is
//! refused, so that no prompt reads differently from what A1111 would make of it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::OnceLock;

use regex::Regex;

use super::a1111_compose::{prompt_parts, PartsError, PromptPart};
use super::a1111_schedule::{self, Schedule, StepClock};
use super::Emphasis;
use super::{Fragment, SyntaxError, MAX_WEIGHT};

/// A1111's `round_bracket_multiplier`.
const ROUND: f64 = 1.1;
/// A1111's `square_bracket_multiplier`.
const SQUARE: f64 = 1.0 / 1.1;
/// The weight A1111 marks a chunk break with (a `BREAK` inside brackets has its weight
/// multiplied and is read as the word "break", as in A1111).
const BREAK_MARK: f64 = -1.0;

/// At most this many chunk breaks in one prompt: each chunk is one more pass of the text
/// encoders and 77 more tokens for every cross-attention (text alone reaches about 28
/// chunks within the prompt length limit).
pub const MAX_BREAKS: usize = 32;

/// Python's `\s` (`str.isspace`): Unicode whitespace and the separators 0x1c–0x1f.
const SPACE: &str = r"[\s\x1c-\x1f]";

fn attention() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        let pattern = format!(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:{SPACE}*([+-]?[.\d]+){SPACE}*\)|\)|\]|[^\\()\[\]:]+|:"
        );
        Regex::new(&pattern).expect("the attention pattern compiles")
    })
}

fn break_word() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(&format!(r"{SPACE}*\bBREAK\b{SPACE}*")).expect("the BREAK pattern compiles")
    })
}

/// A1111's comments (its `processing_scripts/comments.py`, on by default): a line that
/// starts with `#`, and the rest of a line from a `#`, are taken out of a prompt before
/// anything else reads it, each with its line break, leaving one line break.
pub fn without_comments(text: &str) -> Cow<'_, str> {
    static WHOLE_LINE: OnceLock<Regex> = OnceLock::new();
    static LINE_END: OnceLock<Regex> = OnceLock::new();
    if !text.contains('#') {
        return Cow::Borrowed(text);
    }
    let whole_line = WHOLE_LINE
        .get_or_init(|| Regex::new(r"(^|\n)#[^\n]*(\n|$)").expect("the comment pattern compiles"));
    let line_end = LINE_END
        .get_or_init(|| Regex::new(r"#[^\n]*(\n|$)").expect("the comment pattern compiles"));
    let lines = whole_line.replace_all(text, "\n");
    Cow::Owned(line_end.replace_all(&lines, "\n").into_owned())
}

/// Whether a fragment is a chunk break.
pub fn is_break(fragment: &Fragment) -> bool {
    fragment.weight == BREAK_MARK && fragment.text == "BREAK"
}

/// At most this many different texts in one prompt's schedule: each is one more
/// encoding of the whole prompt.
pub const MAX_SCHEDULED_TEXTS: usize = 16;

/// `prompt`'s texts under `clock` (A1111's prompt editing and alternation), once the
/// prompt is checked to name no extra networks and to make at most
/// [`MAX_SCHEDULED_TEXTS`] different texts. `AND` is text here: split a prompt into its
/// sub-prompts first.
pub fn schedule(prompt: &str, clock: StepClock) -> Result<Schedule, SyntaxError> {
    refuse_unsupported(prompt)?;
    let schedule = a1111_schedule::schedule(prompt, clock)?;
    limit_texts(&schedule, clock)?;
    Ok(schedule)
}

/// At most this many different conditionings over a run: each stretch of steps with
/// another text in any sub-prompt or negative is one more set of embeddings held for the
/// run.
pub const MAX_CONDITIONINGS: usize = 16;

/// The stretches of a run's texts (`schedules`: every sub-prompt's and negative's, for
/// each encoder): each one's first step and texts, once they are checked to make at most
/// [`MAX_CONDITIONINGS`] different conditionings.
pub fn conditionings(
    schedules: &[Schedule],
    clock: StepClock,
) -> Result<Vec<(usize, Vec<&str>)>, SyntaxError> {
    let stretches = a1111_schedule::joint_stretches(schedules);
    let different: HashSet<&Vec<&str>> = stretches.iter().map(|(_, texts)| texts).collect();
    if different.len() > MAX_CONDITIONINGS {
        return Err(SyntaxError::TooComplex(format!(
            "makes {} different conditionings over {} steps with the edits and alternations of its sub-prompts and negatives, more than {MAX_CONDITIONINGS}",
            different.len(),
            clock.steps
        )));
    }
    Ok(stretches)
}

/// The schedules of a run's texts under `clock`: each sub-prompt's, then the negative's
/// (`negative`, `negative_2`), each for both encoders in turn (the second reads the
/// second text where it is given and not empty).
pub fn run_schedules(
    parts: &[PromptPart<'_>],
    (negative, negative_2): (&str, Option<&str>),
    clock: StepClock,
) -> Result<Vec<Schedule>, SyntaxError> {
    parts
        .iter()
        .map(|part| (part.text, part.text_2))
        .chain([(negative, negative_2)])
        .flat_map(|(text, text_2)| [text, super::second_text(text, text_2)])
        .map(|text| schedule(text, clock))
        .collect()
}

/// Refuses a schedule of more than [`MAX_SCHEDULED_TEXTS`] different texts.
fn limit_texts(schedule: &Schedule, clock: StepClock) -> Result<(), SyntaxError> {
    let texts: HashSet<&str> = schedule.iter().map(|(_, text)| text.as_str()).collect();
    if texts.len() > MAX_SCHEDULED_TEXTS {
        return Err(SyntaxError::TooComplex(format!(
            "makes {} different texts over {} steps with its edits and alternations, more than {MAX_SCHEDULED_TEXTS}",
            texts.len(),
            clock.steps
        )));
    }
    Ok(())
}

/// Checks a prompt and its `prompt_2` (each split into sub-prompts by `AND`, paired as
/// [`prompt_parts`] pairs them) and every text their sub-prompts make under any of
/// `clocks`: their parts, or the first error of each of the two.
pub fn check_prompts<'a>(
    prompt: &'a str,
    prompt_2: Option<&'a str>,
    clocks: &[StepClock],
    emphasis: Emphasis,
) -> Result<Vec<PromptPart<'a>>, Vec<PartsError>> {
    let own_parts = |text: &'a str| {
        let parts = super::a1111_compose::sub_prompts(text)?;
        let mut seen = HashSet::new();
        for part in parts.iter().filter(|p| seen.insert(p.text)) {
            check(part.text, clocks, emphasis)?;
        }
        Ok::<_, SyntaxError>(())
    };
    let mut errors = Vec::new();
    if let Err(e) = own_parts(prompt) {
        errors.push(PartsError::Prompt(e));
    }
    if let Some(Err(e)) = prompt_2.map(own_parts) {
        errors.push(PartsError::Prompt2(e));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    prompt_parts(prompt, prompt_2).map_err(|e| vec![e])
}

/// Checks that every text `prompt` (one text, `AND` in it read as text) makes under any
/// of `clocks` is one sdxld encodes under `emphasis`.
pub fn check(prompt: &str, clocks: &[StepClock], emphasis: Emphasis) -> Result<(), SyntaxError> {
    refuse_unsupported(prompt)?;
    let schedules = a1111_schedule::schedules(prompt, clocks)?;
    let mut seen = HashSet::new();
    for (schedule, &clock) in schedules.iter().zip(clocks) {
        limit_texts(schedule, clock)?;
        for (_, text) in schedule {
            if seen.insert(text.as_str()) {
                read(text, emphasis)?;
            }
        }
    }
    Ok(())
}

/// One text of a prompt's schedule as A1111 reads it under `emphasis`: parsed
/// ([`parse`]), or with the "None" emphasis the text itself at weight 1 (brackets,
/// weights and `BREAK` are text then).
pub fn read(text: &str, emphasis: Emphasis) -> Result<Vec<Fragment>, SyntaxError> {
    if emphasis == Emphasis::Literal {
        refuse_unsupported(text)?;
        return Ok(vec![fragment(text, 1.0)]);
    }
    parse(text)
}

/// Parses one text of a prompt's schedule as A1111 does and checks it is one sdxld
/// encodes: no extra networks, at most [`MAX_BREAKS`] breaks, and every
/// token's weight finite within [`MAX_WEIGHT`].
pub fn parse(prompt: &str) -> Result<Vec<Fragment>, SyntaxError> {
    refuse_unsupported(prompt)?;
    let fragments = parse_attention(prompt)?;
    let breaks = fragments.iter().filter(|f| is_break(f)).count();
    if breaks > MAX_BREAKS {
        return Err(SyntaxError::TooComplex(format!(
            "has {breaks} BREAKs, more than {MAX_BREAKS}"
        )));
    }
    if let Some(bad) = fragments
        .iter()
        .filter(|f| !is_break(f))
        .find(|f| !f.weight.is_finite() || f.weight.abs() > MAX_WEIGHT)
    {
        return Err(SyntaxError::Weight(bad.weight));
    }
    Ok(fragments)
}

/// A1111's `parse_prompt_attention`: the text in fragments with their weights, `BREAK`
/// as a fragment of its own (text `BREAK`, weight -1).
pub fn parse_attention(text: &str) -> Result<Vec<Fragment>, SyntaxError> {
    let mut res: Vec<Fragment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Fragment>, from: usize, by: f64| {
        res[from..].iter_mut().for_each(|f| f.weight *= by);
    };
    for m in attention().captures_iter(text) {
        let whole = m.get(0).map_or("", |g| g.as_str());
        let weight = m.get(1).map(|g| g.as_str());
        if let Some(escaped) = whole.strip_prefix('\\') {
            res.push(fragment(escaped, 1.0));
        } else if whole == "(" {
            round.push(res.len());
        } else if whole == "[" {
            square.push(res.len());
        } else if let (Some(weight), Some(&from)) = (weight, round.last()) {
            let w: f64 = weight.parse().map_err(|_| {
                SyntaxError::Unsupported(format!(
                    "has the weight `{weight}`, which is not a number"
                ))
            })?;
            round.pop();
            multiply(&mut res, from, w);
        } else if whole == ")" && !round.is_empty() {
            let from = round.pop().unwrap_or(0);
            multiply(&mut res, from, ROUND);
        } else if whole == "]" && !square.is_empty() {
            let from = square.pop().unwrap_or(0);
            multiply(&mut res, from, SQUARE);
        } else {
            for (i, part) in break_word().split(whole).enumerate() {
                if i > 0 {
                    res.push(fragment("BREAK", BREAK_MARK));
                }
                res.push(fragment(part, 1.0));
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push(fragment("", 1.0));
    }
    let mut merged: Vec<Fragment> = Vec::with_capacity(res.len());
    for f in res {
        match merged.last_mut() {
            Some(last) if last.weight == f.weight => last.text.push_str(&f.text),
            _ => merged.push(f),
        }
    }
    Ok(merged)
}

fn fragment(text: &str, weight: f64) -> Fragment {
    Fragment {
        text: text.to_string(),
        weight,
    }
}

/// Refuses an extra network tag in a text A1111 reads it in as text: the prompt's are
/// taken out before its texts are read ([`super::a1111_networks`]), a negative's or
/// `prompt_2`'s would be encoded.
fn refuse_unsupported(prompt: &str) -> Result<(), SyntaxError> {
    if let Some(tag) = super::a1111_networks::first_tag(prompt) {
        return Err(SyntaxError::Unsupported(format!(
            "has the extra network `{tag}` where A1111 reads it as text: extra networks go in the prompt"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, f64)> {
        parse_attention(text)
            .expect("parses")
            .into_iter()
            .map(|f| (f.text, f.weight))
            .collect()
    }

    fn close(got: &[(String, f64)], want: &[(&str, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((text, weight), (t, w)) in got.iter().zip(want) {
            assert_eq!(text, t, "{got:?}");
            assert!((weight - w).abs() < 1e-12, "{got:?}");
        }
    }

    /// The examples A1111 documents `parse_prompt_attention` with.
    #[test]
    fn a1111s_documented_examples_parse_as_documented() {
        close(&pairs("normal text"), &[("normal text", 1.0)]);
        close(
            &pairs("an (important) word"),
            &[("an ", 1.0), ("important", 1.1), (" word", 1.0)],
        );
        close(&pairs("(unbalanced"), &[("unbalanced", 1.1)]);
        close(&pairs("\\(literal\\]"), &[("(literal]", 1.0)]);
        close(
            &pairs("(unnecessary)(parens)"),
            &[("unnecessaryparens", 1.1)],
        );
        close(
            &pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        );
        close(
            &pairs("a BREAK b"),
            &[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)],
        );
    }

    #[test]
    fn weights_spaces_and_stray_brackets_read_as_a1111_reads_them() {
        close(&pairs("(a : 1.5 )"), &[("a ", 1.5)]);
        close(&pairs("a:1.2) b]"), &[("a:1.2) b]", 1.0)]);
        close(&pairs("a \\ b"), &[("a  b", 1.0)]);
        close(&pairs(""), &[("", 1.0)]);
        close(
            &pairs("(a BREAK b)"),
            &[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)],
        );
        assert!(parse_attention("(a:1.2.3)").is_err());
    }

    #[test]
    fn comments_leave_as_a1111_takes_them_out() {
        let cases = [
            ("a cat", "a cat"),
            ("#x", "\n"),
            ("a cat # by me\nb", "a cat \nb"),
            ("a\n#x\n#y\nb", "a\n\nb"),
            ("#x\n#y", "\n\n"),
            ("a #b #c", "a \n"),
            ("<lora:a:1> # <lora:b:1>", "<lora:a:1> \n"),
            ("a\r\n# x\r\nb", "a\r\nb"),
        ];
        for (text, want) in cases {
            assert_eq!(without_comments(text), want, "{text:?}");
        }
    }

    #[test]
    fn networks_left_in_a_text_are_refused_and_and_is_text() {
        assert!(parse("a AND b").is_ok());
        for text in ["<lora:style:0.8> a cat", "[<lora:a:1>:c:3]"] {
            assert!(
                matches!(parse(text), Err(SyntaxError::Unsupported(_))),
                "{text}"
            );
        }
        for text in [
            "[(a:1.2)]",
            "[a\\:b]",
            "[a:b:0.5]",
            "[cat|dog]",
            "a | b",
            "ANDROID",
            "(a|b)",
            "<a cat>",
        ] {
            assert!(parse(text).is_ok(), "{text}");
        }
        assert!(matches!(
            parse("(a:101)"),
            Err(SyntaxError::Weight(w)) if w == 101.0
        ));
        let deep = format!("{}a{}", "(".repeat(60), ")".repeat(60));
        assert!(matches!(parse(&deep), Err(SyntaxError::Weight(_))));
        assert!(parse(&"a BREAK ".repeat(MAX_BREAKS)).is_ok());
        let many = "a BREAK ".repeat(MAX_BREAKS + 1);
        assert!(matches!(parse(&many), Err(SyntaxError::TooComplex(_))));
        // Edits and alternations: every text at every step is checked, and at most
        // MAX_SCHEDULED_TEXTS different ones.
        let clocks = [StepClock {
            steps: 20,
            first_pass_steps: None,
        }];
        assert!(check("[a:(b:1.2.3):5] [c|d]", &clocks, Emphasis::Original).is_err());
        // The "None" emphasis reads brackets and weights as text.
        assert!(check("[a:(b:1.2.3):5] [c|d]", &clocks, Emphasis::Literal).is_ok());
        assert_eq!(
            read("(a:1.5) BREAK b", Emphasis::Literal),
            Ok(vec![fragment("(a:1.5) BREAK b", 1.0)])
        );
        assert!(check("[(a:101)|b]", &clocks, Emphasis::Original).is_err());
        assert!(check("[a:(b:1.2):5] [c|d|e]", &clocks, Emphasis::Original).is_ok());
        let sixteen = "[a|b|c|d] [e|f|g|h|i|j|k|l|m|n|o|p|q|r|s|t]";
        assert!(check(sixteen, &clocks, Emphasis::Original).is_ok());
        // Texts of several schedules together: the stretches' combinations count.
        let of = |texts: &[&str]| -> Vec<Schedule> {
            texts
                .iter()
                .map(|t| schedule(t, clocks[0]).expect("schedules"))
                .collect()
        };
        let six = of(&["[a|b] x", "y [c|d|e]"]);
        let stretches = conditionings(&six, clocks[0]).expect("six combinations");
        assert_eq!(stretches.len(), 20);
        assert_eq!(stretches[7], (8, vec!["b x", "y d"]));
        let thirty = of(&["[a|b]", "[c|d|e]", "[f|g|h|i|j]"]);
        assert!(matches!(
            conditionings(&thirty, clocks[0]),
            Err(SyntaxError::TooComplex(_))
        ));
        let seventeen = "[a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|p|q]";
        assert!(matches!(
            check(seventeen, &clocks, Emphasis::Original),
            Err(SyntaxError::TooComplex(_))
        ));
    }
}
