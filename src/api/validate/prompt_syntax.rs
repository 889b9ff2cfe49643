//! `spec.prompt_syntax`: compel's and A1111's syntax parsed before admission, so a
//! prompt the syntax cannot read is refused naming its field (in A1111's syntax, every
//! text its edits and alternations make in any of the job's passes, and a composable
//! prompt's needs of the job's guidance).

use crate::api::validate::fields::{enum_value, Violations};
use crate::engine::prompt_syntax::a1111_compose::{self, PartsError, PromptPart};
use crate::engine::prompt_syntax::a1111_networks::{self, ExtraNetworks};
use crate::engine::prompt_syntax::a1111_schedule::StepClock;
use crate::engine::prompt_syntax::Emphasis;
use crate::engine::prompt_syntax::{self, a1111, PromptSyntax};
use crate::engine::registry::ModelEntry;
use crate::proto::v1 as pb;

/// The prompts as a syntax that takes extra network tags out reads them.
#[derive(Default)]
pub struct Untagged {
    /// The prompt without its tags.
    pub prompt: Option<String>,
    /// The hires pass's own prompt without its tags.
    pub hires_prompt: Option<String>,
}

/// One pass that reads the prompt: its steps and its guidance scale.
pub struct Pass {
    pub steps: usize,
    pub guidance_scale: f64,
}

/// The passes of a job, whose steps A1111's prompt edits count and whose guidance
/// combines a composable prompt's sub-prompts.
pub struct Passes {
    pub base: Pass,
    pub hires: Option<Pass>,
    pub refiner: Option<Pass>,
}

/// One pass reading a set of texts: the field that sets its guidance, its steps and
/// guidance scale, and the first pass's steps when it follows one (A1111 counts a
/// hires pass's edits past them).
#[derive(Clone, Copy)]
struct Reader {
    guidance_field: &'static str,
    steps: usize,
    guidance_scale: f64,
    first_pass_steps: Option<usize>,
}

/// One text of a pass and the field it comes from.
#[derive(Clone, Copy)]
struct Text<'a> {
    field: &'static str,
    text: Option<&'a str>,
}

/// The four texts a set of passes reads (the first pass's, or the hires pass's own,
/// falling back to the first pass's field by field), the prompt as the syntax reads it
/// (extra network tags taken out).
#[derive(Clone, Copy)]
struct Texts<'a> {
    prompt: (&'static str, &'a str),
    prompt_2: Text<'a>,
    negative_prompt: Text<'a>,
    negative_prompt_2: Text<'a>,
}

impl<'a> Texts<'a> {
    /// The first pass's texts, its prompt read as `prompt`.
    fn first(spec: &'a pb::GenerationSpec, prompt: &'a str) -> Self {
        Self {
            prompt: ("spec.prompt", prompt),
            prompt_2: Text {
                field: "spec.prompt_2",
                text: spec.prompt_2.as_deref(),
            },
            negative_prompt: Text {
                field: "spec.negative_prompt",
                text: spec.negative_prompt.as_deref(),
            },
            negative_prompt_2: Text {
                field: "spec.negative_prompt_2",
                text: spec.negative_prompt_2.as_deref(),
            },
        }
    }

    /// The hires pass's texts when it has any of its own (its prompt read as
    /// `hires_prompt`, the first pass's as `first`).
    fn hires(
        spec: &'a pb::GenerationSpec,
        first: Texts<'a>,
        hires_prompt: &'a str,
    ) -> Option<Self> {
        let h = spec.hires.as_ref()?;
        let own = |field, text: &'a Option<String>, first: Text<'a>| match text {
            Some(t) => Text {
                field,
                text: Some(t.as_str()),
            },
            None => first,
        };
        let any = h.prompt.is_some()
            || h.prompt_2.is_some()
            || h.negative_prompt.is_some()
            || h.negative_prompt_2.is_some();
        any.then(|| Self {
            prompt: match h.prompt {
                Some(_) => ("spec.hires.prompt", hires_prompt),
                None => first.prompt,
            },
            prompt_2: own("spec.hires.prompt_2", &h.prompt_2, first.prompt_2),
            negative_prompt: own(
                "spec.hires.negative_prompt",
                &h.negative_prompt,
                first.negative_prompt,
            ),
            negative_prompt_2: own(
                "spec.hires.negative_prompt_2",
                &h.negative_prompt_2,
                first.negative_prompt_2,
            ),
        })
    }

    /// Every text with its field.
    fn all(&self) -> [Text<'a>; 4] {
        let prompt = Text {
            field: self.prompt.0,
            text: Some(self.prompt.1),
        };
        [
            prompt,
            self.prompt_2,
            self.negative_prompt,
            self.negative_prompt_2,
        ]
    }
}

/// What else guides a job, which a prompt of several sub-prompts does not combine with.
pub struct Guiding<'a> {
    pub guider: bool,
    pub pag: bool,
    pub guidance_rescale: f64,
    /// The base model, when its UNet is guidance-distilled (no negative prediction).
    pub distilled: Option<&'a str>,
}

impl Pass {
    /// A pass of `steps` steps at `guidance_scale`.
    pub fn new(steps: usize, guidance_scale: f64) -> Self {
        Self {
            steps,
            guidance_scale,
        }
    }
}

impl<'a> Guiding<'a> {
    /// What guides the job of `spec` with `guidance_rescale` on the base `model`.
    pub fn of(
        spec: &pb::GenerationSpec,
        guidance_rescale: f64,
        model: Option<&'a ModelEntry>,
    ) -> Self {
        let distilled = model.filter(|m| m.pipeline.as_ref().is_some_and(|f| f.guidance_distilled));
        Self {
            guider: spec.guider.is_some(),
            pag: spec.pag.is_some(),
            guidance_rescale,
            distilled: distilled.map(|m| m.name.as_str()),
        }
    }
}

impl Passes {
    /// The passes that read the first pass's texts, and those that read the hires
    /// pass's own (`hires_texts`: it has them): the hires pass and the refiner that
    /// continues it.
    fn readers(&self, hires_texts: bool) -> (Vec<Reader>, Vec<Reader>) {
        let first = self.hires.as_ref().map(|_| self.base.steps);
        let reader = |guidance_field, pass: &Pass, first_pass_steps| Reader {
            guidance_field,
            steps: pass.steps,
            guidance_scale: pass.guidance_scale,
            first_pass_steps,
        };
        let base = vec![reader("spec.guidance_scale", &self.base, None)];
        let later: Vec<Reader> = [
            (self.hires.as_ref()).map(|h| reader("spec.hires.guidance_scale", h, first)),
            (self.refiner.as_ref()).map(|r| reader("spec.refiner.guidance_scale", r, first)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if hires_texts {
            (base, later)
        } else {
            ([base, later].concat(), Vec::new())
        }
    }
}

/// Every clock the passes may count a prompt's steps by: their steps, or twice as many
/// model calls under a second-order scheduler.
fn clocks(readers: &[Reader]) -> Vec<StepClock> {
    readers
        .iter()
        .flat_map(|r| {
            [1, 2].map(|order| StepClock {
                steps: r.steps * order,
                first_pass_steps: r.first_pass_steps,
            })
        })
        .collect()
}

/// In A1111's syntax, `spec` with its prompts' comments taken out (the hires pass's
/// too), as A1111 takes them out before it reads them (so the PNG's request and
/// parameters are without them, as A1111's are).
pub fn without_comments(mut spec: pb::GenerationSpec) -> pb::GenerationSpec {
    if spec.prompt_syntax != pb::PromptSyntax::A1111 as i32 {
        return spec;
    }
    let mut texts = vec![
        Some(&mut spec.prompt),
        spec.prompt_2.as_mut(),
        spec.negative_prompt.as_mut(),
        spec.negative_prompt_2.as_mut(),
    ];
    if let Some(h) = spec.hires.as_mut() {
        texts.extend([
            h.prompt.as_mut(),
            h.prompt_2.as_mut(),
            h.negative_prompt.as_mut(),
            h.negative_prompt_2.as_mut(),
        ]);
    }
    for text in texts.into_iter().flatten() {
        if text.contains('#') {
            *text = a1111::without_comments(text).into_owned();
        }
    }
    spec
}

/// In A1111's syntax, a prompt (`text`, of `field`) without its extra network tags and
/// the LoRAs they name (none, and a violation naming `field`, when a tag cannot be
/// read); `None` in another syntax.
pub fn extra_networks(
    spec: &pb::GenerationSpec,
    text: &str,
    field: &str,
    v: &mut Violations,
) -> Option<ExtraNetworks> {
    if spec.prompt_syntax != pb::PromptSyntax::A1111 as i32 {
        return None;
    }
    let networks = a1111_networks::extra_networks(text).unwrap_or_else(|e| {
        v.add(field, e.to_string());
        // The rest of the prompt is checked all the same.
        ExtraNetworks {
            text: a1111_networks::without_tags(text),
            loras: Vec::new(),
        }
    });
    Some(networks)
}

/// `spec.emphasis`: A1111's emphasis mode, with A1111's syntax only.
fn emphasis(spec: &pb::GenerationSpec, syntax: PromptSyntax, v: &mut Violations) -> Emphasis {
    let Some(wire) = enum_value::<pb::Emphasis>(v, "spec.emphasis", spec.emphasis) else {
        return Emphasis::Original;
    };
    let emphasis = match wire {
        pb::Emphasis::NoNorm => Emphasis::NoNorm,
        pb::Emphasis::Ignore => Emphasis::Ignore,
        pb::Emphasis::None => Emphasis::Literal,
        pb::Emphasis::Original | pb::Emphasis::Unspecified => Emphasis::Original,
    };
    if wire != pb::Emphasis::Unspecified && syntax != PromptSyntax::A1111 {
        v.add(
            "spec.emphasis",
            "is A1111's setting: it needs PROMPT_SYNTAX_A1111",
        );
    }
    emphasis
}

/// The syntax and A1111's emphasis, with every text the syntax reads checked: the
/// first pass's and the hires pass's own, each in the passes that read it (`untagged`:
/// the prompts as a syntax that takes extra network tags out reads them).
pub fn prompt_syntax(
    spec: &pb::GenerationSpec,
    untagged: &Untagged,
    (passes, guiding): (&Passes, &Guiding<'_>),
    v: &mut Violations,
) -> (PromptSyntax, Emphasis) {
    let read = untagged.prompt.as_deref().unwrap_or(&spec.prompt);
    let first = Texts::first(spec, read);
    let hires_read = (untagged.hires_prompt.as_deref())
        .or_else(|| spec.hires.as_ref()?.prompt.as_deref())
        .unwrap_or(read);
    let hires = Texts::hires(spec, first, hires_read);
    let (first, hires) = (&first, hires.as_ref());
    let wire = enum_value::<pb::PromptSyntax>(v, "spec.prompt_syntax", spec.prompt_syntax);
    let (syntax, name) = match wire {
        Some(pb::PromptSyntax::Compel) => (PromptSyntax::Compel, "PROMPT_SYNTAX_COMPEL"),
        Some(pb::PromptSyntax::A1111) => (PromptSyntax::A1111, "PROMPT_SYNTAX_A1111"),
        _ => (PromptSyntax::Plain, ""),
    };
    let emphasis = emphasis(spec, syntax, v);
    let (first_readers, hires_readers) = passes.readers(hires.is_some());
    let sets = [
        Some((first, first_readers)),
        hires.map(|h| (h, hires_readers)),
    ];
    for (texts, readers) in sets.into_iter().flatten() {
        match syntax {
            PromptSyntax::Plain => return (syntax, emphasis),
            PromptSyntax::A1111 => a1111_prompts(texts, emphasis, &readers, guiding, v),
            PromptSyntax::Compel => {
                for Text { field, text } in texts.all() {
                    if let Some(Err(e)) = text.map(prompt_syntax::parse) {
                        v.add(field, e.to_string());
                    }
                }
            }
        }
    }
    if spec.clip_skip != 0 {
        v.add(
            "spec.clip_skip",
            format!("must be 0 with {name}, which encodes at the penultimate layer"),
        );
    }
    (syntax, emphasis)
}

/// Four texts in A1111's syntax, read in the passes of `readers`: the prompt and
/// `prompt_2` split into sub-prompts by `AND`, the negatives read whole (A1111 reads
/// `AND` in them as text); a prompt that composes checked against those passes'
/// guidance.
fn a1111_prompts(
    texts: &Texts<'_>,
    emphasis: Emphasis,
    readers: &[Reader],
    guiding: &Guiding<'_>,
    v: &mut Violations,
) {
    let clocks = clocks(readers);
    let mut negatives_read = true;
    for Text { field, text } in [&texts.negative_prompt, &texts.negative_prompt_2] {
        if let Some(Err(e)) = text.map(|t| a1111::check(t, &clocks, emphasis)) {
            v.add(*field, e.to_string());
            negatives_read = false;
        }
    }
    let (prompt_field, prompt) = texts.prompt;
    match a1111::check_prompts(prompt, texts.prompt_2.text, &clocks, emphasis) {
        Ok(parts) => {
            if a1111_compose::composes(&parts) {
                composition(&parts, prompt_field, (readers, guiding), v);
            }
            if negatives_read {
                conditionings(texts, &parts, &clocks, v);
            }
        }
        Err(errors) => {
            for error in errors {
                match error {
                    PartsError::Prompt(e) => v.add(prompt_field, e.to_string()),
                    PartsError::Prompt2(e) => v.add(texts.prompt_2.field, e.to_string()),
                }
            }
        }
    }
}

/// The different conditionings the texts make together over each pass, at most
/// [`a1111::MAX_CONDITIONINGS`].
fn conditionings(
    texts: &Texts<'_>,
    parts: &[PromptPart<'_>],
    clocks: &[StepClock],
    v: &mut Violations,
) {
    let negative = texts.negative_prompt.text.unwrap_or("");
    let negative = (negative, texts.negative_prompt_2.text);
    for &clock in clocks {
        let counted = a1111::run_schedules(parts, negative, clock)
            .and_then(|schedules| a1111::conditionings(&schedules, clock).map(drop));
        if let Err(e) = counted {
            v.add(texts.prompt.0, e.to_string());
            return;
        }
    }
}

/// A composable prompt's needs (of `field`): classifier-free guidance in every pass
/// reading it (its weights scale the guidance), and with several sub-prompts no other
/// guidance rule.
fn composition(
    parts: &[PromptPart<'_>],
    field: &'static str,
    (readers, guiding): (&[Reader], &Guiding<'_>),
    v: &mut Violations,
) {
    let what = if parts.len() > 1 {
        format!("a prompt of {} sub-prompts joined by AND", parts.len())
    } else {
        "a weighted prompt (`:weight` at its end)".to_string()
    };
    for r in readers.iter().filter(|r| r.guidance_scale <= 1.0) {
        v.add(
            r.guidance_field,
            format!(
                "must be above 1 with {what} in {field}, whose weights scale classifier-free guidance; guidance is off at {}",
                r.guidance_scale
            ),
        );
    }
    if let Some(model) = guiding.distilled {
        v.add(
            field,
            format!("is {what}, whose weights scale classifier-free guidance, which `{model}` (a guidance-distilled UNet) does not make"),
        );
    }
    if parts.len() == 1 {
        return;
    }
    let others = [
        ("spec.guider", guiding.guider),
        ("spec.pag", guiding.pag),
        ("spec.guidance_rescale", guiding.guidance_rescale > 0.0),
    ];
    for (field, _) in others.iter().filter(|(_, set)| *set) {
        v.add(
            *field,
            format!("does not combine with {what}, whose predictions classifier-free guidance alone combines"),
        );
    }
}
