//! The load-models stage: the job's pipelines, VAE, LoRA adapters, IP-Adapters and their
//! image encoders, ControlNets, their preprocessors' detectors and upscalers in the cache
//! (made room for within the budget), the adapters applied, and the models' hashes.

use std::path::Path;
use std::rc::Rc;

use crate::engine::cache::Fit;
use crate::engine::device;
use crate::engine::error::EngineError;
use crate::engine::hashes::FileHashes;
use crate::engine::lora::{self, JobLora, LoraMode};
use crate::engine::models::control_model::ControlModel;
use crate::engine::pipeline::SdxlPipeline;
use crate::engine::registry::{ModelEntry, ModelKind};
use crate::engine::textual_inversion::Embedding;
use crate::engine::{hires, refiner};
use crate::jobs::detectors::{LoadedNetworks, NetworkFiles};
use crate::jobs::engine::{model_path_on, Engine};
use crate::jobs::events::{ModelUsed, Stage, StepProgress};
use crate::jobs::loaded::{HiresModel, Loaded, LoadedImagePrompt};
use crate::jobs::lora_sets::{LoraPass, LoraSets};
use crate::jobs::runner::{JobRun, JobStage};
use crate::jobs::{EmbeddingJob, IpAdapterJob, JobError, JobSpec, LoraJob};
use crate::output::{OutputFormat, PngMetadata};

impl JobRun<'_> {
    /// Loads what the job uses and applies its adapters, for as long as it runs.
    pub(crate) fn load_models(&mut self) -> Result<(), JobError> {
        let spec = self.spec;
        let _span = tracing::info_span!(
            "stage",
            otel.name = "loading_models",
            model = %spec.model.name,
            loras = spec.loras.len(),
        )
        .entered();
        let engine = &mut *self.engine;
        device::reset_peak(engine.placement().device);
        if spec.models().any(|m| !engine.is_resident(m)) {
            self.sink.progress(StepProgress {
                stage: Stage::LoadingModels,
                step: 0,
                total: 0,
                image_index: 0,
                preview: None,
            });
        }
        let element = engine.placement().kind.elt_size_in_bytes() as u64;
        let lora_copies = lora_copies(spec, element)?;
        let paths: Vec<_> = spec
            .models()
            .map(|m| model_path_on(m, &spec.model))
            .collect();
        let detectors = spec
            .controlnets
            .iter()
            .flat_map(|unit| &unit.inputs)
            .map(|input| {
                let image = &input.image.0;
                let size = (image.width(), image.height());
                NetworkFiles::of_input(input).activations(engine, input.preprocessing, size)
            })
            .max()
            .unwrap_or(0);
        let largest_runs = spec.largest_runs(self.options.batch);
        let room = engine.make_room(&paths, &largest_runs, detectors, lora_copies)?;
        let (base, hires_model, refined) = load_pipelines(engine, spec)?;
        match (&refined, &spec.refiner) {
            (Some(r), Some(job)) => refiner::validate(&base, r, &spec.params, &job.params)?,
            _ => base.validate(&spec.params)?,
        }
        if let Some(own) = &hires_model {
            hires::check_pass_model(&base, own)?;
        }
        let second = hires_model.as_ref().unwrap_or(&base);
        for pass in spec.base_passes().iter().skip(1) {
            second.validate(pass)?;
        }
        let loras = job_loras(engine, &spec.loras)?;
        let hires_loras = match spec.hires.as_ref().and_then(|h| h.loras.as_deref()) {
            Some(own) => Some(job_loras(engine, own)?),
            None => None,
        };
        let controlnets = load_controlnets(engine, spec, &base)?;
        let upscalers = spec
            .post_processing
            .iter()
            .map(|step| engine.upscaler(step.model()))
            .collect::<Result<Vec<_>, _>>()?;
        let hires_upscaler = match spec.hires.as_ref().and_then(|h| h.upscaler.as_ref()) {
            Some(model) => Some(engine.upscaler(model)?),
            None => None,
        };
        let detectors = load_detectors(engine, spec)?;
        let embeddings = read_embeddings(spec)?;
        let ip_adapters = load_ip_adapters(engine, spec, &base)?;
        if let Some(own) = &hires_model {
            check_image_prompts(&ip_adapters, spec, own)?;
        }
        let sets = (loras, hires_loras, room.lora_mode);
        let (loras, hires_model) = apply_loras(&base, hires_model, sets)?;
        self.report.models = models_used(spec, engine.hashes());
        // Loads and evictions are visible before the job reports anything further.
        self.metrics.set_cache(engine.stats());
        self.loaded = Some(Loaded {
            base,
            hires_model,
            refiner: refined,
            controlnets,
            upscalers,
            hires_upscaler,
            detectors,
            offload_text_encoders: room.fit == Fit::TextEncodersOffloaded,
            tiled_decode: room.tiled_decode,
            embeddings,
            ip_adapters,
            loras,
        });
        Ok(())
    }

    /// Puts the LoRAs of `stage`'s pass on the base UNet (the hires pass may have its
    /// own; on a model of its own they are that model's throughout, and the base keeps
    /// the first pass's).
    pub(crate) fn carry_loras_for(&mut self, stage: JobStage) -> Result<(), JobError> {
        let pass = match stage {
            JobStage::Denoise => LoraPass::First,
            JobStage::Hires => LoraPass::Hires,
            _ => return Ok(()),
        };
        let loaded = self.loaded.as_mut().ok_or_else(|| {
            EngineError::Internal("denoising before the models loaded".to_string())
        })?;
        Ok(loaded.loras.unet_for(&loaded.base, pass)?)
    }

    /// The PNG metadata of image `index`, when the request embeds it.
    pub(crate) fn png_metadata(&self, index: usize, seed: u64) -> Option<PngMetadata> {
        let output = &self.spec.output;
        (output.format == OutputFormat::Png && output.embed_metadata).then(|| {
            crate::jobs::metadata::png_metadata(self.spec, &self.report.models, index, seed)
        })
    }
}

/// The job's pipelines: the base, the hires pass's own model and the refiner, each with
/// the request's VAE in place of its own for encoding and decoding.
type Pipelines = (
    Rc<SdxlPipeline>,
    Option<Rc<SdxlPipeline>>,
    Option<Rc<SdxlPipeline>>,
);

fn load_pipelines(engine: &mut Engine, spec: &JobSpec) -> Result<Pipelines, JobError> {
    let mut base = engine.pipeline(&spec.model)?;
    let mut hires_model = match spec.hires_model() {
        Some(model) => Some(engine.pipeline(model)?),
        None => None,
    };
    let mut refined = match &spec.refiner {
        Some(job) => Some(engine.pipeline(&job.model)?),
        None => None,
    };
    if let Some(model) = &spec.vae {
        let vae = engine.vae(model)?;
        base = Rc::new(base.with_vae(vae.clone())?);
        for pipeline in [&mut hires_model, &mut refined] {
            if let Some(p) = pipeline.take() {
                *pipeline = Some(Rc::new(p.with_vae(vae.clone())?));
            }
        }
    }
    Ok((base, hires_model, refined))
}

/// The LoRA sets put on: the first pass's on the base; the hires pass's on its own model
/// (its own set, else the first pass's), or kept for the base to switch to.
fn apply_loras(
    base: &SdxlPipeline,
    hires_model: Option<Rc<SdxlPipeline>>,
    (first, hires, mode): (Vec<JobLora>, Option<Vec<JobLora>>, LoraMode),
) -> Result<(LoraSets, Option<HiresModel>), EngineError> {
    let Some(pipeline) = hires_model else {
        return Ok((LoraSets::apply(base, first, hires, mode)?, None));
    };
    let set = hires.unwrap_or_else(|| first.clone());
    let own = LoraSets::apply(&pipeline, set, None, mode)?;
    let model = HiresModel {
        pipeline,
        _loras: own,
    };
    Ok((LoraSets::apply(base, first, None, mode)?, Some(model)))
}

/// The bytes of the layers the job's LoRAs replace while merged: on the base, both
/// passes' sets (a layer adapted by either counts once, as only one set is on it at a
/// time); on the hires pass's own model, its set besides.
fn lora_copies(spec: &JobSpec, element: u64) -> Result<u64, JobError> {
    let own_model = spec.hires_model().is_some();
    let base_files = match own_model {
        true => lora_files(spec.loras.iter()),
        false => lora_files(spec.loras.iter().chain(spec.hires_only_loras())),
    };
    let mut bytes = lora::merged_bytes(&base_files, element)?;
    if own_model {
        let hires_set = spec.hires.as_ref().and_then(|h| h.loras.as_deref());
        let set = lora_files(hires_set.unwrap_or(&spec.loras).iter());
        bytes += lora::merged_bytes(&set, element)?;
    }
    Ok(bytes)
}

/// Each LoRA's file and name.
fn lora_files<'a>(loras: impl Iterator<Item = &'a LoraJob>) -> Vec<(&'a Path, &'a str)> {
    loras
        .map(|l| (l.model.path.as_path(), l.model.name.as_str()))
        .collect()
}

/// The adapters of `jobs`, their weights loaded.
fn job_loras(engine: &mut Engine, jobs: &[LoraJob]) -> Result<Vec<JobLora>, JobError> {
    let mut loras = Vec::with_capacity(jobs.len());
    for job in jobs {
        loras.push(JobLora {
            name: job.model.name.clone(),
            weights: engine.lora(&job.model)?,
            strength: job.weight,
            text_encoder_strength: job.text_encoder_weight,
        });
    }
    Ok(loras)
}

/// The ControlNet of each unit, each checked against the base model it controls.
fn load_controlnets(
    engine: &mut Engine,
    spec: &JobSpec,
    base: &SdxlPipeline,
) -> Result<Vec<Rc<ControlModel>>, JobError> {
    let mut controlnets = Vec::with_capacity(spec.controlnets.len());
    for (i, unit) in spec.controlnets.iter().enumerate() {
        let misfit = |why: String| {
            EngineError::Incompatible(format!(
                "the ControlNet `{}` (spec.controlnets[{i}].model) cannot control the base model `{}`: {why}",
                unit.model.name, spec.model.name
            ))
        };
        let model = engine.controlnet(&unit.model, base).map_err(|e| match e {
            EngineError::Incompatible(why) => misfit(why),
            other => other,
        })?;
        if let Some(why) = base.control_mismatch(&model) {
            return Err(misfit(why).into());
        }
        controlnets.push(model);
    }
    Ok(controlnets)
}

/// Each unit input's networks (none for a preprocessor without one), by unit.
fn load_detectors(
    engine: &mut Engine,
    spec: &JobSpec,
) -> Result<Vec<Vec<LoadedNetworks>>, JobError> {
    let mut detectors = Vec::with_capacity(spec.controlnets.len());
    for unit in &spec.controlnets {
        let unit_detectors = unit
            .inputs
            .iter()
            .map(|input| NetworkFiles::of_input(input).load(engine))
            .collect::<Result<Vec<_>, _>>()?;
        detectors.push(unit_detectors);
    }
    Ok(detectors)
}

/// Each image prompt's adapter checked against the UNet of the hires pass's own model.
fn check_image_prompts(
    loaded: &[LoadedImagePrompt],
    spec: &JobSpec,
    own: &SdxlPipeline,
) -> Result<(), EngineError> {
    for (i, (models, prompt)) in loaded.iter().zip(&spec.ip_adapters).enumerate() {
        let field = format!("spec.ip_adapters[{i}]");
        let name = spec.hires_model().map_or("", |m| m.name.as_str());
        check_image_prompt(models, prompt, &field, name, own)?;
    }
    Ok(())
}

/// Each image prompt's adapter and image encoder, checked against the base UNet and
/// each other.
fn load_ip_adapters(
    engine: &mut Engine,
    spec: &JobSpec,
    base: &SdxlPipeline,
) -> Result<Vec<LoadedImagePrompt>, JobError> {
    let mut loaded = Vec::with_capacity(spec.ip_adapters.len());
    for (i, prompt) in spec.ip_adapters.iter().enumerate() {
        let models = LoadedImagePrompt {
            adapter: engine.ip_adapter(&prompt.adapter)?,
            encoder: engine.image_encoder(&prompt.encoder)?,
        };
        check_image_prompt(
            &models,
            prompt,
            &format!("spec.ip_adapters[{i}]"),
            &spec.model.name,
            base,
        )?;
        loaded.push(models);
    }
    Ok(loaded)
}

/// Whether an image prompt's adapter fits the UNet of `base` (the base model `model`) and
/// reads its encoder, and the UNet has the layers it is limited to.
fn check_image_prompt(
    models: &LoadedImagePrompt,
    prompt: &IpAdapterJob,
    field: &str,
    model: &str,
    base: &SdxlPipeline,
) -> Result<(), EngineError> {
    let unet = base.unet();
    let layers = unet.cross_attention_layers();
    let adapter = format!("the IP-Adapter `{}` ({field}.adapter)", prompt.adapter.name);
    if let Some(why) = models
        .adapter
        .misfit_unet(layers, unet.config().cross_attention_dim)
    {
        let message = format!("{adapter} cannot condition the base model `{model}`: {why}");
        return Err(EngineError::Incompatible(message));
    }
    if let Some(why) = models.adapter.misfit_encoder(models.encoder.config()) {
        let encoder = format!("`{}` ({field}.image_encoder)", prompt.encoder.name);
        let message = format!("{adapter} cannot read the image encoder {encoder}: {why}");
        return Err(EngineError::Incompatible(message));
    }
    // The API checks the layers against the model's config; this is the loaded UNet.
    let mut wanted = prompt.layers.attentions().into_iter().flatten();
    match wanted.find(|a| !layers.iter().any(|l| l.attention == **a)) {
        Some(attention) => Err(EngineError::InvalidRequest(format!(
            "{field}.layers needs `{attention}`, which the UNet of `{model}` does not have"
        ))),
        None => Ok(()),
    }
}

/// The job's textual inversion embeddings, read from their files (kilobytes each; they
/// are not cached).
fn read_embeddings(spec: &JobSpec) -> Result<Vec<Embedding>, JobError> {
    let read = |(index, job): (usize, &EmbeddingJob)| {
        Embedding::read(&job.model.path, index, &job.model.name, &job.token)
    };
    Ok(spec
        .embeddings
        .iter()
        .enumerate()
        .map(read)
        .collect::<Result<_, _>>()?)
}

/// The models a job uses with their hashes (the LoRAs with their weights), base first.
fn models_used(spec: &JobSpec, hashes: &FileHashes) -> Vec<ModelUsed> {
    let used = |model: &ModelEntry, kind: ModelKind, weight: f32| ModelUsed {
        name: model.name.clone(),
        kind,
        sha256: hashes.model(model),
        weight,
    };
    let mut models = vec![used(&spec.model, ModelKind::Base, 0.0)];
    models.extend(spec.hires_model().map(|m| used(m, ModelKind::Base, 0.0)));
    models.extend(
        spec.refiner
            .iter()
            .map(|r| used(&r.model, ModelKind::Refiner, 0.0)),
    );
    models.extend(spec.vae.iter().map(|v| used(v, ModelKind::Vae, 0.0)));
    models.extend(
        (spec.loras.iter())
            .chain(spec.hires_only_loras())
            .map(|l| used(&l.model, ModelKind::Lora, l.weight as f32)),
    );
    models.extend(
        spec.embeddings
            .iter()
            .map(|e| used(&e.model, ModelKind::Embedding, 0.0)),
    );
    models.extend(
        spec.controlnets
            .iter()
            .map(|c| used(&c.model, ModelKind::ControlNet, c.unit.scale as f32)),
    );
    for prompt in &spec.ip_adapters {
        models.push(used(
            &prompt.adapter,
            ModelKind::IpAdapter,
            prompt.scale as f32,
        ));
        models.push(used(&prompt.encoder, ModelKind::ImageEncoder, 0.0));
    }
    models.extend(
        spec.detectors()
            .map(|m| used(m, ModelKind::Preprocessor, 0.0)),
    );
    let hires_upscaler = spec.hires.as_ref().and_then(|h| h.upscaler.as_ref());
    models.extend(hires_upscaler.map(|m| used(m, ModelKind::Upscaler, 0.0)));
    models.extend(
        spec.post_processing
            .iter()
            .map(|s| used(s.model(), ModelKind::Upscaler, 0.0)),
    );
    models
}
