//! `spec.prompt_syntax`: compel's syntax parsed before admission, so a prompt it cannot
//! read is refused naming its field.

use crate::api::validate::fields::{enum_value, Violations};
use crate::api::validate::sampling::prompt_fields;
use crate::engine::prompt_syntax::{self, PromptSyntax};
use crate::proto::v1 as pb;

/// The syntax, with every prompt it reads checked.
pub fn prompt_syntax(spec: &pb::GenerationSpec, v: &mut Violations) -> PromptSyntax {
    let wire = enum_value::<pb::PromptSyntax>(v, "spec.prompt_syntax", spec.prompt_syntax);
    if wire != Some(pb::PromptSyntax::Compel) {
        return PromptSyntax::Plain;
    }
    for (field, text) in prompt_fields(spec) {
        if let Some(Err(e)) = text.map(|t| prompt_syntax::parse(t)) {
            v.add(field, e.to_string());
        }
    }
    if spec.clip_skip != 0 {
        v.add(
            "spec.clip_skip",
            "must be 0 with PROMPT_SYNTAX_COMPEL, which encodes at the penultimate layer",
        );
    }
    PromptSyntax::Compel
}
