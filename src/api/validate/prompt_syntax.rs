//! `spec.prompt_syntax`: compel's and A1111's syntax parsed before admission, so a
//! prompt the syntax cannot read is refused naming its field (in A1111's syntax, every
//! text its edits and alternations make in any of the job's passes, and a composable
//! prompt's needs of the job's guidance).

use crate::api::validate::fields::{enum_value, Violations};
use crate::api::validate::sampling::prompt_fields;
use crate::engine::prompt_syntax::a1111_compose::{self, PartsError, PromptPart};
use crate::engine::prompt_syntax::a1111_networks::{self, ExtraNetworks};
use crate::engine::prompt_syntax::a1111_schedule::StepClock;
use crate::engine::prompt_syntax::Emphasis;
use crate::engine::prompt_syntax::{self, a1111, PromptSyntax};
use crate::engine::registry::ModelEntry;
use crate::proto::v1 as pb;

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
    /// Every clock a pass may count a prompt's steps by: its steps, or twice as many
    /// model calls under a second-order scheduler.
    fn clocks(&self) -> Vec<StepClock> {
        let first = self.hires.as_ref().map(|_| self.base.steps);
        let passes = [
            Some((self.base.steps, None)),
            self.hires.as_ref().map(|h| (h.steps, first)),
            self.refiner.as_ref().map(|r| (r.steps, first)),
        ];
        passes
            .into_iter()
            .flatten()
            .flat_map(|(steps, first_pass_steps)| {
                [1, 2].map(|order| StepClock {
                    steps: steps * order,
                    first_pass_steps,
                })
            })
            .collect()
    }

    /// Each pass's guidance scale and the field that sets it.
    fn guidance(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        [
            Some(("spec.guidance_scale", &self.base)),
            self.hires
                .as_ref()
                .map(|h| ("spec.hires.guidance_scale", h)),
            self.refiner
                .as_ref()
                .map(|r| ("spec.refiner.guidance_scale", r)),
        ]
        .into_iter()
        .flatten()
        .map(|(field, pass)| (field, pass.guidance_scale))
    }
}

/// In A1111's syntax, `spec` with its prompts' comments taken out, as A1111 takes them
/// out before it reads them (so the PNG's request and parameters are without them, as
/// A1111's are).
pub fn without_comments(mut spec: pb::GenerationSpec) -> pb::GenerationSpec {
    if spec.prompt_syntax != pb::PromptSyntax::A1111 as i32 {
        return spec;
    }
    let texts = [
        Some(&mut spec.prompt),
        spec.prompt_2.as_mut(),
        spec.negative_prompt.as_mut(),
        spec.negative_prompt_2.as_mut(),
    ];
    for text in texts.into_iter().flatten() {
        if text.contains('#') {
            *text = a1111::without_comments(text).into_owned();
        }
    }
    spec
}

/// In A1111's syntax, the prompt without its extra network tags and the LoRAs they
/// name (none, and a violation naming `spec.prompt`, when a tag cannot be read); `None`
/// in another syntax.
pub fn extra_networks(spec: &pb::GenerationSpec, v: &mut Violations) -> Option<ExtraNetworks> {
    if spec.prompt_syntax != pb::PromptSyntax::A1111 as i32 {
        return None;
    }
    let networks = a1111_networks::extra_networks(&spec.prompt).unwrap_or_else(|e| {
        v.add("spec.prompt", e.to_string());
        // The rest of the prompt is checked all the same.
        ExtraNetworks {
            text: a1111_networks::without_tags(&spec.prompt),
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

/// The syntax and A1111's emphasis, with every prompt the syntax reads checked
/// (`prompt`: the prompt as the syntax reads it, extra network tags taken out).
pub fn prompt_syntax(
    spec: &pb::GenerationSpec,
    prompt: &str,
    (passes, guiding): (&Passes, &Guiding<'_>),
    v: &mut Violations,
) -> (PromptSyntax, Emphasis) {
    let wire = enum_value::<pb::PromptSyntax>(v, "spec.prompt_syntax", spec.prompt_syntax);
    let clocks = passes.clocks();
    let (syntax, name) = match wire {
        Some(pb::PromptSyntax::Compel) => (PromptSyntax::Compel, "PROMPT_SYNTAX_COMPEL"),
        Some(pb::PromptSyntax::A1111) => (PromptSyntax::A1111, "PROMPT_SYNTAX_A1111"),
        _ => (PromptSyntax::Plain, ""),
    };
    let emphasis = emphasis(spec, syntax, v);
    match syntax {
        PromptSyntax::Plain => return (syntax, emphasis),
        PromptSyntax::A1111 => {
            let reading = (prompt, emphasis);
            a1111_prompts(spec, reading, &clocks, (passes, guiding), v);
        }
        _ => {
            for (field, text) in prompt_fields(spec) {
                if let Some(Err(e)) = text.map(|t| prompt_syntax::parse(t)) {
                    v.add(field, e.to_string());
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

/// The four prompts in A1111's syntax: the prompt and `prompt_2` split into sub-prompts
/// by `AND`, the negatives read whole (A1111 reads `AND` in them as text); a prompt that
/// composes checked against the job's guidance.
fn a1111_prompts(
    spec: &pb::GenerationSpec,
    (prompt, emphasis): (&str, Emphasis),
    clocks: &[StepClock],
    guidance: (&Passes, &Guiding<'_>),
    v: &mut Violations,
) {
    let negatives = [
        ("spec.negative_prompt", spec.negative_prompt.as_ref()),
        ("spec.negative_prompt_2", spec.negative_prompt_2.as_ref()),
    ];
    let mut negatives_read = true;
    for (field, text) in negatives {
        if let Some(Err(e)) = text.map(|t| a1111::check(t, clocks, emphasis)) {
            v.add(field, e.to_string());
            negatives_read = false;
        }
    }
    match a1111::check_prompts(prompt, spec.prompt_2.as_deref(), clocks, emphasis) {
        Ok(parts) => {
            if a1111_compose::composes(&parts) {
                composition(&parts, guidance, v);
            }
            if negatives_read {
                conditionings(spec, &parts, clocks, v);
            }
        }
        Err(errors) => {
            for error in errors {
                match error {
                    PartsError::Prompt(e) => v.add("spec.prompt", e.to_string()),
                    PartsError::Prompt2(e) => v.add("spec.prompt_2", e.to_string()),
                }
            }
        }
    }
}

/// The different conditionings the prompts make together over each pass, at most
/// [`a1111::MAX_CONDITIONINGS`].
fn conditionings(
    spec: &pb::GenerationSpec,
    parts: &[PromptPart<'_>],
    clocks: &[StepClock],
    v: &mut Violations,
) {
    let negative = spec.negative_prompt.as_deref().unwrap_or("");
    let negative = (negative, spec.negative_prompt_2.as_deref());
    for &clock in clocks {
        let counted = a1111::run_schedules(parts, negative, clock)
            .and_then(|schedules| a1111::conditionings(&schedules, clock).map(drop));
        if let Err(e) = counted {
            v.add("spec.prompt", e.to_string());
            return;
        }
    }
}

/// A composable prompt's needs: classifier-free guidance in every pass (its weights
/// scale the guidance), and with several sub-prompts no other guidance rule.
fn composition(
    parts: &[PromptPart<'_>],
    (passes, guiding): (&Passes, &Guiding<'_>),
    v: &mut Violations,
) {
    let what = if parts.len() > 1 {
        format!("a prompt of {} sub-prompts joined by AND", parts.len())
    } else {
        "a weighted prompt (`:weight` at its end)".to_string()
    };
    for (field, scale) in passes.guidance().filter(|(_, scale)| *scale <= 1.0) {
        v.add(
            field,
            format!("must be above 1 with {what}, whose weights scale classifier-free guidance; guidance is off at {scale}"),
        );
    }
    if let Some(model) = guiding.distilled {
        v.add(
            "spec.prompt",
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
