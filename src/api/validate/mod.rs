//! Proto to domain: every rule of the contract, every bad field reported at once with its
//! proto path (`spec.loras[1].weight`). One converter per message checks and converts in
//! a single pass; this orchestrator puts their results together. Runs on the blocking
//! pool: it decodes images and reads model configs.

mod adapters;
mod controlnet;
pub mod detector;
mod embeddings;
mod fields;
mod guider;
mod hires;
mod image_filters;
mod images;
mod inpaint_area;
mod ip_adapters;
mod model;
mod output;
mod pag;
mod pixel_perfect;
mod postprocess;
mod prompt_syntax;

pub use postprocess::to_upscale_spec;
mod degenerate_schedules;
mod depth_cuts;
pub mod poses;
pub mod preprocessor;
mod refiner;
mod sampling;
mod variation;
mod window;

pub use adapters::MAX_LORAS;
pub use embeddings::MAX_EMBEDDINGS;
pub use fields::MAX_SEED;
pub use ip_adapters::{MAX_IP_ADAPTERS, MAX_PROMPT_IMAGES};
pub use sampling::scheduler_kind;

use crate::api::convert::replay_specs;
use crate::api::status::ApiError;
use crate::config::Limits;
use crate::engine::registry::{ModelEntry, Registry};
use crate::engine::request::{GenerateParams, InitImage};
use crate::engine::schedulers::options::a1111_name;
use crate::engine::schedulers::{SchedulerKind, SchedulerOptions};
use crate::jobs::JobSpec;
use crate::output::OutputFormat;
use crate::proto::v1 as pb;
use fields::Violations;
use prompt_syntax::Pass;

/// What validation reads besides the request.
pub struct Context<'a> {
    /// The configured limits.
    pub limits: &'a Limits,
    /// Model names.
    pub registry: &'a Registry,
    /// The default detectors of the network preprocessors.
    pub preprocessing: &'a crate::config::PreprocessingSettings,
    /// The seed of a request that names none.
    pub drawn_seed: u64,
}

/// Errors that count only for a request whose fields are all valid: features this
/// server does not implement yet, then names no root holds (or pickle files), each in
/// field order.
#[derive(Default)]
pub struct Deferred {
    unimplemented: Vec<ApiError>,
    missing: Vec<ApiError>,
}

impl Deferred {
    /// A feature the request asks for that this server does not implement yet.
    pub fn unimplemented(&mut self, error: ApiError) {
        self.unimplemented.push(error);
    }

    /// A model the request names that cannot be used.
    pub fn missing(&mut self, error: ApiError) {
        self.missing.push(error);
    }

    fn into_result(self) -> Result<(), ApiError> {
        match self.unimplemented.into_iter().chain(self.missing).next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Validates a request and resolves it into a job.
pub fn to_job_spec(
    spec: Option<pb::GenerationSpec>,
    ctx: &Context<'_>,
) -> Result<JobSpec, ApiError> {
    let Some(spec) = spec else {
        return Err(ApiError::invalid("spec", "`spec` is required"));
    };
    let spec = prompt_syntax::without_comments(spec);
    let mut v = Violations::default();
    let mut deferred = Deferred::default();
    let parts = check(&spec, ctx, &mut v, &mut deferred);
    v.into_result()?;
    deferred.into_result()?;
    assemble(spec, parts)
}

/// A request's parts, each converted by its converter.
struct Parts {
    model: Option<ModelEntry>,
    model_scheduler: Option<SchedulerKind>,
    init: Option<InitImage>,
    paste_back: Option<crate::engine::inpaint_area::PasteBack>,
    size: (u32, u32),
    guidance: (f64, f64),
    freeu: Option<crate::engine::request::FreeU>,
    seamless: Option<crate::engine::request::Seamless>,
    guider: Option<crate::engine::request::Guider>,
    pag: Option<crate::engine::request::Pag>,
    counts: (u32, u32, u64),
    variation: Option<crate::engine::request::SeedVariation>,
    scheduler: (Option<SchedulerKind>, SchedulerOptions),
    base_overrides: crate::engine::request::SchedulerOverrides,
    micro: sampling::Micro,
    clip_skip: Option<i64>,
    prompt_syntax: crate::engine::request::PromptSyntax,
    emphasis: crate::engine::request::Emphasis,
    /// The prompt without its extra network tags, where the syntax takes them out.
    prompt: Option<String>,
    vae: Option<ModelEntry>,
    loras: Vec<crate::jobs::LoraJob>,
    embeddings: Vec<crate::jobs::EmbeddingJob>,
    ip_adapters: Vec<crate::jobs::IpAdapterJob>,
    controlnets: Vec<crate::jobs::ControlNetJob>,
    refiner: Option<crate::jobs::RefinerJob>,
    output: crate::jobs::OutputSpec,
    post_processing: Vec<crate::jobs::PostStep>,
    hires: Option<crate::jobs::HiresJob>,
    client_job_id: Option<String>,
}

/// Every converter, each adding the violations and deferred errors it finds.
fn check(
    spec: &pb::GenerationSpec,
    ctx: &Context<'_>,
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Parts {
    let (limits, registry) = (ctx.limits, ctx.registry);
    let max_pixels = images::max_image_pixels(limits);
    // 1. the model and the init image, which decide the default size
    let model = model::base(spec, registry, v, deferred);
    let init = spec
        .init_image
        .as_ref()
        .and_then(|i| images::init_image(i, max_pixels, v));
    let init_size = init.as_ref().map(|i| (i.width as u32, i.height as u32));
    let size = model::size(spec, model.as_ref(), init_size, limits, v);
    let (init, paste_back) = inpaint_area::masked_area(spec, init, size, v);
    model::inpainting_inputs(spec, model.as_ref(), v);
    // 2. sampling
    sampling::prompts(spec, limits, v);
    let guidance = sampling::guidance(spec, v);
    let freeu = sampling::freeu(spec.freeu.as_ref(), v);
    let seamless = sampling::seamless(spec, v);
    let guider = guider::guider(spec, guidance.0, model.as_ref(), v);
    let pag = pag::pag(spec, model.as_ref(), v);
    let counts = sampling::counts(spec, limits, ctx.drawn_seed, v);
    let variation = variation::variation(spec, counts.1, limits, ctx.drawn_seed, v);
    let model_scheduler = model
        .as_ref()
        .and_then(|m| m.pipeline.as_ref()?.scheduler());
    let options = spec.scheduler_options.as_ref();
    let scheduler = sampling::scheduler("spec", spec.scheduler, options, model_scheduler, v);
    let base_overrides = base_overrides(spec, &scheduler, model.as_ref(), limits, v);
    let micro = sampling::micro_conditioning(spec.micro_conditioning.as_ref(), v);
    images::strength_steps(init.as_ref(), counts.0, v);
    // 3. adapters, the refiner, the output
    let vae = model::vae(spec, registry, v, deferred);
    let (loras, untagged) = adapters::job_loras(spec, registry, v, deferred);
    let read = untagged.prompt.as_deref().unwrap_or(&spec.prompt);
    let embeddings = embeddings::embeddings(&spec.embeddings, registry, v, deferred);
    let ip_adapters = ip_adapters::ip_adapters(
        &spec.ip_adapters,
        model.as_ref(),
        registry,
        max_pixels,
        v,
        deferred,
    );
    let controlnets = control_units(spec, ctx, (max_pixels, size), v, deferred);
    let base = refiner::BaseDefaults {
        steps: counts.0,
        guidance_scale: guidance.0,
    };
    let refiner = spec
        .refiner
        .as_ref()
        .and_then(|r| refiner::refiner(r, &base, registry, limits, v, deferred));
    let base_run = window::BaseRun {
        model: model.as_ref(),
        steps: counts.0 as usize,
        overrides: base_overrides.clone(),
        init: init.as_ref(),
        max_steps: limits.max_steps,
    };
    let output = output::output(spec.output.as_ref(), "spec.", v);
    let first = hires::FirstPass {
        size,
        steps: counts.0,
        guidance_scale: guidance.0,
        scheduler: &scheduler,
        model_scheduler,
        prompts: hires::first_pass_prompts(spec, read),
        hires_prompt: untagged.hires_prompt.as_deref(),
        hires_loras: loras.hires.as_deref(),
        model: model.as_ref(),
        unet_asks: hires::UnetAsks {
            pag: spec.pag.is_some(),
            image_prompts: !spec.ip_adapters.is_empty(),
            guider: spec.guider.is_some(),
        },
    };
    let hires = spec
        .hires
        .as_ref()
        .and_then(|h| hires::hires(h, &first, registry, limits, v, deferred));
    // Every pipeline that encodes the prompts reads them with clip_skip.
    let encoders: Vec<_> = (model.iter())
        .chain(hires.as_ref().and_then(|h| h.model.as_ref()))
        .chain(refiner.as_ref().map(|r| &r.model))
        .collect();
    let clip_skip = model::clip_skip(spec, &encoders, v);
    let hires_pass = hires.as_ref().map(|h| &h.params);
    let passes = prompt_syntax::Passes {
        base: Pass::new(counts.0 as usize, guidance.0),
        hires: hires_pass.map(|h| Pass::new(h.steps, h.guidance_scale)),
        refiner: (refiner.as_ref()).map(|r| Pass::new(r.params.steps, r.params.guidance_scale)),
    };
    let guiding = prompt_syntax::Guiding::of(spec, guidance.1, model.as_ref());
    let (prompt_syntax, emphasis) =
        prompt_syntax::prompt_syntax(spec, &untagged, (&passes, &guiding), v);
    window::empty_windows(&base_run, hires_pass, refiner.as_ref(), v);
    window::consistency_steps(&base_run, hires_pass, refiner.as_ref(), v);
    degenerate_schedules::nan_making_runs(&base_run, hires_pass, spec, refiner.as_ref(), v);
    let denoised = hires
        .as_ref()
        .map_or(size, |h| (h.params.width as u32, h.params.height as u32));
    let frame = postprocess::Frame {
        registry,
        size: denoised,
        max_pixels,
        format: output.format,
    };
    let post_processing = postprocess::post_processing(&spec.post_processing, &frame, v, deferred);
    let client_job_id = output::client_job_id(&spec.client_job_id, "spec.", v);
    unimplemented_combinations(spec, deferred);
    Parts {
        model,
        model_scheduler,
        init,
        paste_back,
        size,
        guidance,
        freeu,
        seamless,
        guider,
        pag,
        counts,
        variation,
        scheduler,
        base_overrides,
        micro,
        clip_skip,
        prompt_syntax,
        emphasis,
        prompt: untagged.prompt,
        vae,
        loras: loras.first,
        embeddings,
        ip_adapters,
        controlnets,
        refiner,
        output,
        post_processing,
        hires,
        client_job_id,
    }
}

/// `spec.controlnets`, with their control images read at the generated `size` (within
/// `max_pixels`) and the masked area's crop.
fn control_units(
    spec: &pb::GenerationSpec,
    ctx: &Context<'_>,
    (max_pixels, size): (u64, (u32, u32)),
    v: &mut Violations,
    deferred: &mut Deferred,
) -> Vec<crate::jobs::ControlNetJob> {
    let detectors = detector::Detectors {
        registry: ctx.registry,
        defaults: ctx.preprocessing,
    };
    let mut controlnets = controlnet::controlnets(
        &spec.controlnets,
        detectors,
        (max_pixels, size),
        v,
        deferred,
    );
    inpaint_area::control_maps(spec, &mut controlnets, v);
    controlnet::adapter_sizes(&controlnets, size, v);
    controlnets
}

/// The first pass's changes to the model's scheduler: the scheduler and options asked
/// for, and custom timesteps or sigmas (the hires pass and the refiner place their own).
fn base_overrides(
    spec: &pb::GenerationSpec,
    (kind, options): &(Option<SchedulerKind>, SchedulerOptions),
    model: Option<&ModelEntry>,
    limits: &Limits,
    v: &mut Violations,
) -> crate::engine::request::SchedulerOverrides {
    let mut overrides = options.overrides(*kind);
    let config = window::run_config(model, &overrides);
    if let Some(custom) = sampling::custom_timesteps(spec, config.as_ref(), limits, v) {
        overrides.set("timesteps", custom);
    }
    if let Some(custom) = sampling::custom_sigmas(spec, config.as_ref(), limits, v) {
        overrides.set("sigmas", custom);
    }
    overrides
}

/// Valid combinations this server cannot run yet.
fn unimplemented_combinations(spec: &pb::GenerationSpec, deferred: &mut Deferred) {
    let inpainting = spec.init_image.as_ref().is_some_and(|i| !i.mask.is_empty());
    if spec.hires.is_some() && inpainting {
        deferred.unimplemented(ApiError::Unimplemented(
            "spec.hires".into(),
            "a hires pass after inpainting is not implemented yet".into(),
        ));
    }
}

/// The job of a valid request.
fn assemble(spec: pb::GenerationSpec, parts: Parts) -> Result<JobSpec, ApiError> {
    let Some(model) = parts.model else {
        return Err(ApiError::ModelNotFound(spec.model));
    };
    let ((width, height), (steps, num_images, seed)) = (parts.size, parts.counts);
    let (scheduler, options) = parts.scheduler;
    let runs = scheduler
        .or(parts.model_scheduler)
        .unwrap_or(SchedulerKind::Euler);
    let replay = if parts.output.format == OutputFormat::Png && parts.output.embed_metadata {
        let resolved = pb::GenerationSpec {
            width,
            height,
            steps,
            guidance_scale: Some(spec.guidance_scale.unwrap_or(5.0)),
            model: model.name.clone(),
            ..spec.clone()
        };
        replay_specs(&resolved, (seed, parts.variation), num_images)
    } else {
        Vec::new()
    };
    let micro = parts.micro;
    let written_prompt = spec.prompt.clone();
    let params = GenerateParams {
        prompt: parts.prompt.unwrap_or(spec.prompt),
        prompt_2: spec.prompt_2,
        negative_prompt: spec.negative_prompt,
        negative_prompt_2: spec.negative_prompt_2,
        guidance_scale: parts.guidance.0,
        guidance_rescale: parts.guidance.1,
        clip_skip: parts.clip_skip,
        prompt_syntax: parts.prompt_syntax,
        emphasis: parts.emphasis,
        width: i64::from(width),
        height: i64::from(height),
        steps: steps as usize,
        seed,
        num_images: num_images as usize,
        variation: parts.variation,
        original_size: micro.original_size,
        crops_coords_top_left: micro.crop_top_left,
        target_size: micro.target_size,
        negative_original_size: micro.negative_original_size,
        negative_crops_coords_top_left: micro.negative_crop_top_left,
        negative_target_size: micro.negative_target_size,
        scheduler_overrides: parts.base_overrides,
        init_image: parts.init,
        batch_first_seed: None,
        denoising_end: None,
        aesthetic_score: micro.aesthetic_score,
        negative_aesthetic_score: micro.negative_aesthetic_score,
        freeu: parts.freeu,
        pag: parts.pag,
        seamless: parts.seamless,
        guider: parts.guider,
        first_pass_steps: None,
    };
    Ok(JobSpec {
        params,
        written_prompt,
        model,
        vae: parts.vae,
        loras: parts.loras,
        embeddings: parts.embeddings,
        ip_adapters: parts.ip_adapters,
        controlnets: parts.controlnets,
        refiner: parts.refiner,
        output: parts.output,
        post_processing: parts.post_processing,
        hires: parts.hires,
        paste_back: parts.paste_back,
        sampler_name: a1111_name(runs, &options),
        mask_blur: spec.init_image.as_ref().map_or(0, |i| i.mask_blur),
        replay,
        client_job_id: parts.client_job_id,
    })
}
