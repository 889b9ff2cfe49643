//! `spec.prompt_syntax`: compel's and A1111's syntax parsed before admission, so a
//! prompt the syntax cannot read is refused naming its field (in A1111's syntax, every
//! text its edits and alternations make in any of the job's passes).

use crate::api::validate::fields::{enum_value, Violations};
use crate::api::validate::sampling::prompt_fields;
use crate::engine::prompt_syntax::a1111_schedule::StepClock;
use crate::engine::prompt_syntax::{self, a1111, PromptSyntax};
use crate::proto::v1 as pb;

/// The steps of a job's passes, which A1111's prompt edits count.
pub struct Passes {
    pub steps: usize,
    pub hires: Option<usize>,
    pub refiner: Option<usize>,
}

impl Passes {
    /// Every clock a pass may count a prompt's steps by: its steps, or twice as many
    /// model calls under a second-order scheduler.
    fn clocks(&self) -> Vec<StepClock> {
        let first = self.hires.map(|_| self.steps);
        let passes = [
            Some((self.steps, None)),
            self.hires.map(|h| (h, first)),
            self.refiner.map(|r| (r, first)),
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
}

/// The syntax, with every prompt it reads checked.
pub fn prompt_syntax(
    spec: &pb::GenerationSpec,
    passes: &Passes,
    v: &mut Violations,
) -> PromptSyntax {
    let wire = enum_value::<pb::PromptSyntax>(v, "spec.prompt_syntax", spec.prompt_syntax);
    let clocks = passes.clocks();
    let (syntax, name) = match wire {
        Some(pb::PromptSyntax::Compel) => (PromptSyntax::Compel, "PROMPT_SYNTAX_COMPEL"),
        Some(pb::PromptSyntax::A1111) => (PromptSyntax::A1111, "PROMPT_SYNTAX_A1111"),
        _ => return PromptSyntax::Plain,
    };
    for (field, text) in prompt_fields(spec) {
        let checked = text.map(|t| match syntax {
            PromptSyntax::A1111 => a1111::check(t, &clocks),
            _ => prompt_syntax::parse(t).map(drop),
        });
        if let Some(Err(e)) = checked {
            v.add(field, e.to_string());
        }
    }
    if spec.clip_skip != 0 {
        v.add(
            "spec.clip_skip",
            format!("must be 0 with {name}, which encodes at the penultimate layer"),
        );
    }
    syntax
}
