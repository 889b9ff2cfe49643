//! Prompt editing and alternation in AUTOMATIC1111's syntax (its
//! `prompt_parser.get_learned_conditioning_prompt_schedules`): `[from:to:when]` reads
//! `from` until step `when` and `to` after it (`[to:when]` adds, `[from::when]` removes;
//! a `when` with a decimal point is a fraction of the steps), and `[a|b|c]` takes the
//! next alternative at every step. A prompt becomes a list of texts, each read until a
//! step. A prompt A1111's grammar cannot parse (a `|` outside square brackets, a
//! trailing backslash) is read as it is, as A1111 reads it.

use super::a1111_grammar::{parse, Node};
use super::SyntaxError;

/// How a pass counts the steps a prompt's edits name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepClock {
    /// The pass's steps, counted as A1111 counts them (the model calls: two a step for
    /// a second-order sampler).
    pub steps: usize,
    /// For a second pass (hires), the first pass's steps: A1111 counts whole-number
    /// `when`s past them and fractions past 1.0.
    pub first_pass_steps: Option<usize>,
}

/// A prompt's texts in step order, each with the last step (from 1) it is read at; the
/// last entry's step is the clock's steps.
pub type Schedule = Vec<(usize, String)>;

/// `prompt`'s texts under `clock`, as A1111 schedules them.
pub fn schedule(prompt: &str, clock: StepClock) -> Result<Schedule, SyntaxError> {
    let mut schedules = schedules(prompt, &[clock])?;
    schedules
        .pop()
        .ok_or_else(|| SyntaxError::Unsupported("has no schedule".into()))
}

/// `prompt`'s texts under each of `clocks`, the prompt parsed once.
pub fn schedules(prompt: &str, clocks: &[StepClock]) -> Result<Vec<Schedule>, SyntaxError> {
    let chars: Vec<char> = prompt.chars().collect();
    let Some(nodes) = parse(&chars)? else {
        let as_is = |clock: &StepClock| vec![(clock.steps, prompt.to_string())];
        return Ok(clocks.iter().map(as_is).collect());
    };
    clocks
        .iter()
        .map(|&clock| schedule_of(&nodes, clock))
        .collect()
}

/// The texts of parsed `nodes` under `clock`.
fn schedule_of(nodes: &[Node], clock: StepClock) -> Result<Schedule, SyntaxError> {
    let mut steps = vec![clock.steps];
    collect_steps(nodes, clock, &mut steps)?;
    steps.sort_unstable();
    steps.dedup();
    steps
        .into_iter()
        .map(|step| {
            let mut text = String::new();
            render(nodes, step, clock, &mut text)?;
            Ok((step, text))
        })
        .collect()
}

/// The text a schedule reads at step `counter` (from 0, as A1111's sampler counts): the
/// first whose last step is at or after it.
pub fn text_at(schedule: &Schedule, counter: usize) -> &str {
    schedule
        .iter()
        .find(|(last, _)| counter <= *last)
        .or(schedule.last())
        .map_or("", |(_, text)| text.as_str())
}

/// The stretches of steps in which none of `schedules` changes its text: each one's
/// first step and the text each schedule reads in it.
pub fn joint_stretches(schedules: &[Schedule]) -> Vec<(usize, Vec<&str>)> {
    let mut lasts: Vec<usize> = schedules
        .iter()
        .flat_map(|s| s.iter().map(|(last, _)| *last))
        .collect();
    lasts.sort_unstable();
    lasts.dedup();
    lasts.pop();
    std::iter::once(0)
        .chain(lasts.into_iter().map(|last| last + 1))
        .map(|step| (step, schedules.iter().map(|s| text_at(s, step)).collect()))
        .collect()
}

/// A1111's step of a `when`, clamped to the steps (`min(steps, int(v))`).
fn when_step(number: &str, clock: StepClock) -> Result<i64, SyntaxError> {
    let value: f64 = number
        .parse()
        .map_err(|_| SyntaxError::Unsupported(format!("schedules at `{number}`")))?;
    let steps = clock.steps as f64;
    let value = if number.contains('.') {
        let offset = if clock.first_pass_steps.is_some() {
            1.0
        } else {
            0.0
        };
        (value - offset) * steps
    } else {
        value - clock.first_pass_steps.unwrap_or(0) as f64
    };
    if !value.is_finite() {
        return Err(SyntaxError::Unsupported(format!(
            "schedules at `{number}`, which is not a finite step"
        )));
    }
    let step = value.trunc();
    Ok(if step >= steps {
        steps as i64
    } else {
        step as i64
    })
}

/// A1111's `CollectSteps`: every scheduled step from 1 on, and every step with an
/// alternation.
fn collect_steps(
    nodes: &[Node],
    clock: StepClock,
    steps: &mut Vec<usize>,
) -> Result<(), SyntaxError> {
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                let step = when_step(when, clock)?;
                if step >= 1 {
                    steps.push(step as usize);
                }
                if let Some(before) = before {
                    collect_steps(before, clock, steps)?;
                }
                collect_steps(after, clock, steps)?;
            }
            Node::Alternate(options) => {
                steps.extend(1..=clock.steps);
                for option in options {
                    collect_steps(option, clock, steps)?;
                }
            }
        }
    }
    Ok(())
}

/// A1111's `AtStep`: the text at `step` (from 1).
fn render(
    nodes: &[Node],
    step: usize,
    clock: StepClock,
    out: &mut String,
) -> Result<(), SyntaxError> {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Scheduled {
                before,
                after,
                when,
            } => {
                if step as i64 <= when_step(when, clock)? {
                    if let Some(before) = before {
                        render(before, step, clock, out)?;
                    }
                } else {
                    render(after, step, clock, out)?;
                }
            }
            Node::Alternate(options) => {
                let option = &options[(step.max(1) - 1) % options.len()];
                render(option, step, clock, out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::a1111_grammar::is_signed_number;
    use super::*;

    const TWENTY: StepClock = StepClock {
        steps: 20,
        first_pass_steps: None,
    };

    fn texts(prompt: &str, clock: StepClock) -> Vec<(usize, String)> {
        schedule(prompt, clock).expect("schedules")
    }

    fn owned(entries: &[(usize, &str)]) -> Vec<(usize, String)> {
        entries.iter().map(|(s, t)| (*s, t.to_string())).collect()
    }

    /// The examples A1111 documents its prompt schedules with.
    #[test]
    fn a1111s_documented_schedules() {
        let t = |p: &str, steps| {
            texts(
                p,
                StepClock {
                    steps,
                    first_pass_steps: None,
                },
            )
        };
        assert_eq!(t("test", 10), owned(&[(10, "test")]));
        assert_eq!(t("a [b:3]", 10), owned(&[(3, "a "), (10, "a b")]));
        assert_eq!(t("a [b: 3]", 10), owned(&[(3, "a "), (10, "a b")]));
        assert_eq!(t("a [[[b]]: 2]", 10), owned(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(t("[(a:2):3]", 10), owned(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(
            t("a [b : c : 1] d", 10),
            owned(&[(1, "a b  d"), (10, "a  c  d")])
        );
        assert_eq!(
            t("a[b:[c:d:2]:1]e", 10),
            owned(&[(1, "abe"), (2, "ace"), (10, "ade")])
        );
        assert_eq!(
            t("[fe|]male", 10),
            owned(&[
                (1, "female"),
                (2, "male"),
                (3, "female"),
                (4, "male"),
                (5, "female"),
                (6, "male"),
                (7, "female"),
                (8, "male"),
                (9, "female"),
                (10, "male")
            ])
        );
        assert_eq!(
            t("[fe|||]male", 6),
            owned(&[
                (1, "female"),
                (2, "male"),
                (3, "male"),
                (4, "male"),
                (5, "female"),
                (6, "male")
            ])
        );
        assert_eq!(t("a [b:.5] c", 10), owned(&[(5, "a  c"), (10, "a b c")]));
        assert_eq!(t("a [b:1.5] c", 10), owned(&[(10, "a  c")]));
    }

    #[test]
    fn a_second_pass_counts_past_the_first() {
        let hires = StepClock {
            steps: 10,
            first_pass_steps: Some(20),
        };
        assert_eq!(texts("a [b:25]", hires), owned(&[(5, "a "), (10, "a b")]));
        assert_eq!(texts("a [b:1.5]", hires), owned(&[(5, "a "), (10, "a b")]));
        assert_eq!(texts("a [b:0.5]", hires), owned(&[(10, "a b")]));
        assert_eq!(
            texts("a [b:0.5]", TWENTY),
            owned(&[(10, "a "), (20, "a b")])
        );
    }

    #[test]
    fn unparsable_prompts_are_read_as_they_are() {
        for prompt in ["a | [b:c:1]", "(a|b) [c:1]", "[a:b:1] \\", "[a|b"] {
            assert_eq!(texts(prompt, TWENTY), owned(&[(20, prompt)]), "{prompt}");
        }
        assert_eq!(texts("[a:b:1", TWENTY), owned(&[(20, "[a:b:1")]));
        assert_eq!(texts("a [b:c] d", TWENTY), owned(&[(20, "a [b:c] d")]));
    }

    #[test]
    fn the_text_at_a_step_is_the_first_entry_that_reaches_it() {
        let s = texts("[a:b:3]", TWENTY);
        let at: Vec<&str> = (0..6).map(|c| text_at(&s, c)).collect();
        assert_eq!(at, ["a", "a", "a", "a", "b", "b"]);
        let s = texts("[x|y]", TWENTY);
        let at: Vec<&str> = (0..5).map(|c| text_at(&s, c)).collect();
        assert_eq!(at, ["x", "x", "y", "x", "y"]);
    }

    #[test]
    fn numbers_and_limits() {
        for good in ["5", "-5", "+5", "5.", ".5", "1e3", "1.5E-2", "1.e+2"] {
            assert!(is_signed_number(good), "{good}");
        }
        for bad in ["", ".", "e3", "5e", "1.2.3", "٣", "5 5", "+-5"] {
            assert!(!is_signed_number(bad), "{bad}");
        }
        assert!(schedule("[a:b:1e400]", TWENTY).is_err());
        assert_eq!(texts("[a:b:1e30]", TWENTY), owned(&[(20, "a")]));
        let deep = format!("{}a{}", "[".repeat(150), "]".repeat(150));
        assert!(matches!(
            schedule(&deep, TWENTY),
            Err(SyntaxError::TooComplex(_))
        ));
        // An edit before stray brackets, which lark reads either way, is refused; one
        // before text, the end, or inside an alternation is read.
        for risky in [
            "[a:b:2]]",
            "[a:b:2]::x",
            "([a:b:2]):",
            "[a:b:2][x]::",
            "([a:b:2]:1.2)::",
        ] {
            assert!(
                matches!(schedule(risky, TWENTY), Err(SyntaxError::Unsupported(_))),
                "{risky}"
            );
        }
        for safe in [
            "[a:b:2] ]",
            "([a:b:2])",
            "[a:b:2](x)",
            "[p|[a:b:2]]:",
            "([a:b:2]:1.2) :)",
        ] {
            assert!(schedule(safe, TWENTY).is_ok(), "{safe}");
        }
    }
}
