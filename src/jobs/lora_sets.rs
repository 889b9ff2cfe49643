//! A job's LoRA sets on the base pipeline: the first pass's, and the hires pass's where
//! its own prompt names others (A1111 switches to them for the hires pass). The text
//! encoders and the UNet each carry one set at a time; a pass switches the UNet to its
//! set, the hires prompt's encoding the text encoders.

use crate::engine::error::{EngineError, Result};
use crate::engine::lora::{apply_to, check_fit_all, AppliedLoras, JobLora, LoraMode, LoraParts};
use crate::engine::pipeline::SdxlPipeline;

/// The pass whose LoRAs a part carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoraPass {
    First,
    Hires,
}

/// One part of the pipeline and the set on it (`None` after a failed switch: nothing).
struct Carried {
    parts: LoraParts,
    applied: AppliedLoras,
    pass: Option<LoraPass>,
}

/// The sets and what each part carries; dropping this takes every adapter off.
pub(crate) struct LoraSets {
    first: Vec<JobLora>,
    hires: Option<Vec<JobLora>>,
    mode: LoraMode,
    text_encoders: Carried,
    unet: Carried,
}

impl LoraSets {
    /// The first pass's set put on `base` (the hires pass's checked against it and kept
    /// for later).
    pub fn apply(
        base: &SdxlPipeline,
        first: Vec<JobLora>,
        hires: Option<Vec<JobLora>>,
        mode: LoraMode,
    ) -> Result<Self> {
        if let Some(own) = &hires {
            check_fit_all(base, own)?;
        }
        let carried = |parts| -> Result<Carried> {
            Ok(Carried {
                parts,
                applied: EngineError::catch(|| apply_to(base, &first, mode, parts))?,
                pass: Some(LoraPass::First),
            })
        };
        let text_encoders = carried(LoraParts::TextEncoders)?;
        let unet = carried(LoraParts::Unet)?;
        Ok(Self {
            first,
            hires,
            mode,
            text_encoders,
            unet,
        })
    }

    /// Puts `pass`'s set on the text encoders (to encode its prompts).
    pub fn text_encoders_for(&mut self, base: &SdxlPipeline, pass: LoraPass) -> Result<()> {
        let (set, pass) = set_of(&self.first, self.hires.as_deref(), pass);
        switch(&mut self.text_encoders, base, set, pass, self.mode)
    }

    /// Puts `pass`'s set on the UNet (to denoise).
    pub fn unet_for(&mut self, base: &SdxlPipeline, pass: LoraPass) -> Result<()> {
        let (set, pass) = set_of(&self.first, self.hires.as_deref(), pass);
        switch(&mut self.unet, base, set, pass, self.mode)
    }
}

/// `pass`'s set and the pass it belongs to: the hires pass's own, else the first pass's.
fn set_of<'a>(
    first: &'a [JobLora],
    hires: Option<&'a [JobLora]>,
    pass: LoraPass,
) -> (&'a [JobLora], LoraPass) {
    match (pass, hires) {
        (LoraPass::Hires, Some(own)) => (own, LoraPass::Hires),
        _ => (first, LoraPass::First),
    }
}

/// Puts `set` (`pass`'s) on `part` unless it carries it already: the set on it comes off
/// first, so that one set's copies are alive at a time.
fn switch(
    part: &mut Carried,
    base: &SdxlPipeline,
    set: &[JobLora],
    pass: LoraPass,
    mode: LoraMode,
) -> Result<()> {
    if part.pass == Some(pass) {
        return Ok(());
    }
    part.applied = AppliedLoras::default();
    part.pass = None;
    part.applied = EngineError::catch(|| apply_to(base, set, mode, part.parts))?;
    part.pass = Some(pass);
    Ok(())
}
