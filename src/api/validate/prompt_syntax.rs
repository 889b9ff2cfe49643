//! `spec.prompt_syntax`: compel's and A1111's syntax parsed before admission, so a
//! prompt the syntax cannot read is refused naming its field.

use crate::api::validate::fields::{enum_value, Violations};
use crate::api::validate::sampling::prompt_fields;
use crate::engine::prompt_syntax::{self, a1111, PromptSyntax, SyntaxError};
use crate::proto::v1 as pb;

/// A syntax's check of one prompt.
type Check = fn(&str) -> Result<(), SyntaxError>;

/// The syntax, with every prompt it reads checked.
pub fn prompt_syntax(spec: &pb::GenerationSpec, v: &mut Violations) -> PromptSyntax {
    let wire = enum_value::<pb::PromptSyntax>(v, "spec.prompt_syntax", spec.prompt_syntax);
    let (syntax, name, parse): (_, _, Check) = match wire {
        Some(pb::PromptSyntax::Compel) => (PromptSyntax::Compel, "PROMPT_SYNTAX_COMPEL", |t| {
            prompt_syntax::parse(t).map(drop)
        }),
        Some(pb::PromptSyntax::A1111) => (PromptSyntax::A1111, "PROMPT_SYNTAX_A1111", |t| {
            a1111::parse(t).map(drop)
        }),
        _ => return PromptSyntax::Plain,
    };
    for (field, text) in prompt_fields(spec) {
        if let Some(Err(e)) = text.map(|t| parse(t)) {
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
