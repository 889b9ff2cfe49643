//! LoRA adapters: names and weights, in `spec.loras` and in the prompt's extra network
//! tags.

use std::collections::HashSet;

use crate::api::status::ApiError;
use crate::api::validate::fields::{model_name, optional_float, Range, Violations};
use crate::api::validate::model::named;
use crate::api::validate::prompt_syntax::{self, Untagged};
use crate::api::validate::Deferred;
use crate::engine::loading::lora::alias_of;
use crate::engine::prompt_syntax::a1111_networks::PromptLora;
use crate::engine::registry::{check_name, ModelEntry, ModelKind, Registry, RegistryError};
use crate::jobs::LoraJob;
use crate::proto::v1 as pb;

/// Most LoRA adapters in one request.
pub const MAX_LORAS: usize = 16;
/// A weight's range.
const WEIGHTS: Range = Range::closed(-2.0, 2.0);

/// The LoRAs of a job's passes.
pub struct JobLoras {
    /// The first pass's (and the refiner's, which takes none): `spec.loras`, then the
    /// prompt's tags'.
    pub first: Vec<LoraJob>,
    /// The hires pass's where its own prompt's tags name others: `spec.loras`, then
    /// those tags'.
    pub hires: Option<Vec<LoraJob>>,
}

/// The job's LoRAs: `spec.loras`, then, in A1111's syntax, those the prompt's tags
/// name (and the hires prompt's, for the hires pass); and the prompts without their
/// tags where the syntax takes them out.
pub fn job_loras(
    spec: &pb::GenerationSpec,
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> (JobLoras, Untagged) {
    let listed = loras(&spec.loras, registry, v, deferred);
    let Some(networks) = prompt_syntax::extra_networks(spec, &spec.prompt, "spec.prompt", v) else {
        let first = JobLoras {
            first: listed,
            hires: None,
        };
        return (first, Untagged::default());
    };
    let mut listing = None;
    let mut tags = Tags {
        registry,
        listing: &mut listing,
        listed: &spec.loras,
    };
    let first_tags = tags.loras(&networks.loras, "spec.prompt", v, deferred);
    let hires = hires_prompt(spec, &networks.loras, v);
    let hires_loras = hires.as_ref().and_then(|(_, own)| own.as_deref());
    let hires_tags = hires_loras.map(|own| tags.loras(own, "spec.hires.prompt", v, deferred));
    let loras = JobLoras {
        first: [listed.clone(), first_tags].concat(),
        hires: hires_tags.map(|own| [listed, own].concat()),
    };
    let untagged = Untagged {
        prompt: Some(networks.text),
        hires_prompt: hires.map(|(text, _)| text),
    };
    (loras, untagged)
}

/// The hires pass's own prompt without its tags, and the LoRAs they name where those
/// are not the prompt's (`first`) with the same multipliers: A1111 then switches to
/// them for the hires pass.
fn hires_prompt(
    spec: &pb::GenerationSpec,
    first: &[PromptLora],
    v: &mut Violations,
) -> Option<(String, Option<Vec<PromptLora>>)> {
    let text = spec.hires.as_ref()?.prompt.as_ref()?;
    let networks = prompt_syntax::extra_networks(spec, text, "spec.hires.prompt", v)?;
    let key = |loras: &[PromptLora]| {
        let mut key: Vec<_> = loras
            .iter()
            .map(|l| (l.name.clone(), l.text_encoder_weight, l.unet_weight))
            .collect();
        key.sort_by(|a, b| a.0.cmp(&b.0));
        key
    };
    let own = (key(&networks.loras) != key(first)).then_some(networks.loras);
    Some((networks.text, own))
}

/// `spec.loras`: each named once, with a weight in [-2, 2] (default 1) and the text
/// encoders' (default: the weight).
pub fn loras(
    loras: &[pb::LoraAdapter],
    registry: &Registry,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<LoraJob> {
    // The count first: nothing is done per item of an oversized list.
    if loras.len() > MAX_LORAS {
        v.add(
            "spec.loras",
            format!("has {} adapters; at most {MAX_LORAS}", loras.len()),
        );
        return Vec::new();
    }
    let mut jobs = Vec::with_capacity(loras.len());
    let mut seen = HashSet::new();
    for (i, lora) in loras.iter().enumerate() {
        let field = format!("spec.loras[{i}]");
        let weight = optional_float(v, &format!("{field}.weight"), lora.weight, WEIGHTS, 1.0);
        let text_encoder_weight = optional_float(
            v,
            &format!("{field}.text_encoder_weight"),
            lora.text_encoder_weight,
            WEIGHTS,
            weight,
        );
        let name_field = format!("{field}.name");
        if lora.name.is_empty() {
            v.add(name_field, "is required");
            continue;
        }
        if !model_name(v, &name_field, &lora.name) {
            continue;
        }
        if !seen.insert(lora.name.as_str()) {
            v.add(
                name_field,
                format!(
                    "names `{}` a second time (give one adapter one weight)",
                    lora.name
                ),
            );
            continue;
        }
        if let Some(model) = named(
            registry,
            ModelKind::Lora,
            &lora.name,
            &name_field,
            v,
            deferred,
        ) {
            jobs.push(LoraJob {
                model,
                weight,
                text_encoder_weight,
                tag_name: None,
            });
        }
    }
    jobs
}

/// Resolves the LoRAs of a request's extra network tags.
struct Tags<'a> {
    registry: &'a Registry,
    /// Every LoRA under the roots, listed once, at the first tag naming one by its file
    /// name or alias.
    listing: &'a mut Option<Vec<ModelEntry>>,
    /// `spec.loras`, which the tags' LoRAs join.
    listed: &'a [pb::LoraAdapter],
}

impl Tags<'_> {
    /// The LoRAs `tags` (of the prompt in `field`) name, after those of `spec.loras`:
    /// each named once in both together, each multiplier in [-2, 2], at most
    /// [`MAX_LORAS`] in all; every violation names `field`.
    fn loras(
        &mut self,
        tags: &[PromptLora],
        field: &'static str,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Vec<LoraJob> {
        let listed = self.listed;
        if listed.len() + tags.len() > MAX_LORAS {
            v.add(
                field,
                format!(
                    "names {} LoRAs in its tags beside the {} of spec.loras; at most {MAX_LORAS} in all",
                    tags.len(),
                    listed.len()
                ),
            );
            return Vec::new();
        }
        let mut seen: HashSet<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        let mut jobs = Vec::with_capacity(tags.len());
        for tag in tags {
            let (te, unet) = (tag.text_encoder_weight, tag.unet_weight);
            let valid = WEIGHTS.contains(te) && WEIGHTS.contains(unet);
            if !valid {
                v.add(
                    field,
                    format!(
                        "has `{}`, which weighs the text encoders {te} and the UNet {unet}; each must be a finite number between -2 and 2",
                        tag.tag
                    ),
                );
            }
            if let Err(e) = check_name(&tag.name) {
                v.add(
                    field,
                    format!(
                        "has `{}`, which names no valid model ({})",
                        tag.tag,
                        e.reason()
                    ),
                );
                continue;
            }
            if !seen.insert(tag.name.as_str()) {
                v.add(
                    field,
                    format!(
                        "has `{}`, which names `{}` a second time (spec.loras or another tag names it)",
                        tag.tag, tag.name
                    ),
                );
                continue;
            }
            let model = self.lora(tag, field, v, deferred);
            if let (Some(model), true) = (model, valid) {
                jobs.push(LoraJob {
                    model,
                    weight: tag.unet_weight,
                    text_encoder_weight: tag.text_encoder_weight,
                    tag_name: Some(tag.name.clone()),
                });
            }
        }
        jobs
    }

    /// The LoRA a tag names: by its name under the LoRA roots, else, as A1111 finds it,
    /// by its file name wherever it lies under them or by its alias; a name several
    /// LoRAs answer to is a violation naming them.
    fn lora(
        &mut self,
        tag: &PromptLora,
        field: &'static str,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<ModelEntry> {
        let registry = self.registry;
        match registry.resolve_kind(ModelKind::Lora, &tag.name) {
            Ok(model) => return Some(model),
            Err(RegistryError::NotFound(_)) if !tag.name.contains('/') => {}
            // Reported as `spec.loras` reports it.
            Err(_) => return named(registry, ModelKind::Lora, &tag.name, field, v, deferred),
        }
        let listing = (self.listing).get_or_insert_with(|| registry.list_kind(ModelKind::Lora));
        let mut found = by_file_name_or_alias(listing, &tag.name);
        match found.len() {
            0 => {
                deferred.missing(ApiError::ModelNotFound(tag.name.clone()));
                None
            }
            1 => found.pop().cloned(),
            _ => {
                let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
                v.add(
                    field,
                    format!(
                        "has `{}`, which names `{}`, the file name or alias of several LoRAs ({}): name one by its path",
                        tag.tag,
                        tag.name,
                        names.join(", ")
                    ),
                );
                None
            }
        }
    }
}

/// The LoRAs of `listing` whose file name is `name`, else those whose alias is (A1111's
/// `ss_output_name`, which kohya-ss writes into the files it trains and A1111 puts into
/// prompts by default).
fn by_file_name_or_alias<'a>(listing: &'a [ModelEntry], name: &str) -> Vec<&'a ModelEntry> {
    let by_file_name: Vec<&ModelEntry> = listing
        .iter()
        .filter(|m| m.name.rsplit('/').next() == Some(name))
        .collect();
    if !by_file_name.is_empty() {
        return by_file_name;
    }
    listing
        .iter()
        .filter(|m| alias_of(&m.path).as_deref() == Some(name))
        .collect()
}
