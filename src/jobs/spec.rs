//! A validated job in domain terms: everything the runner needs, nothing of the wire.

use std::sync::Arc;

use image::DynamicImage;

use crate::engine::control::{ControlUnit, ResizeMode};
use crate::engine::hires::HiresParams;
use crate::engine::pipeline::{GenerateParams, RefinerParams};
use crate::engine::preprocess::depth_anything::DepthAnythingVersion;
use crate::engine::preprocess::detector::DetectorNetwork;
use crate::engine::preprocess::Preprocessing;
use crate::engine::registry::ModelEntry;
use crate::engine::request::BatchMode;
use crate::engine::upscale::tiles::TilePlan;
use crate::output::OutputFormat;

/// Output options of a job.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    /// Encoding.
    pub format: OutputFormat,
    /// JPEG/WebP quality.
    pub quality: u8,
    /// PNG metadata chunks.
    pub embed_metadata: bool,
    /// Preview every n denoising steps (0: none).
    pub preview_every: u32,
    /// Hand out each ControlNet unit's control map.
    pub return_control_maps: bool,
}

/// A LoRA adapter of a job.
#[derive(Debug, Clone)]
pub struct LoraJob {
    /// The LoRA file.
    pub model: ModelEntry,
    /// The UNet's weight, in [-2, 2].
    pub weight: f64,
    /// The text encoders' weight, in [-2, 2].
    pub text_encoder_weight: f64,
    /// The name an extra network tag in the prompt gives it (which the PNG parameters
    /// keep), when the prompt names it rather than the request's list.
    pub tag_name: Option<String>,
}

/// A textual inversion embedding of a job.
#[derive(Debug, Clone)]
pub struct EmbeddingJob {
    /// The embedding file.
    pub model: ModelEntry,
    /// The token that stands for it in the prompts.
    pub token: String,
}

/// An IP-Adapter image prompt of a job.
#[derive(Debug, Clone)]
pub struct IpAdapterJob {
    /// The adapter file.
    pub adapter: ModelEntry,
    /// The CLIP image encoder folder it reads.
    pub encoder: ModelEntry,
    /// Its images, transparency composited onto white.
    pub images: Vec<PromptImage>,
    /// Its weight, in [0, 2].
    pub scale: f64,
    /// The layers it acts in.
    pub layers: crate::engine::ip_adapter::PromptLayers,
    /// Where each image acts (one RGB mask per image), or none: everywhere.
    pub masks: Vec<PromptImage>,
}

/// An image prompt's RGB pixels (shared, not copied, when a spec is).
#[derive(Clone)]
pub struct PromptImage(pub Arc<image::RgbImage>);

impl std::fmt::Debug for PromptImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} image", self.0.width(), self.0.height())
    }
}

/// A decoded conditioning image (shared, not copied, when a spec is).
#[derive(Clone)]
pub struct ConditioningImage(pub Arc<DynamicImage>);

impl std::fmt::Debug for ConditioningImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} image", self.0.width(), self.0.height())
    }
}

/// A detector file and the network its header holds, read once when the request was
/// checked.
#[derive(Debug, Clone)]
pub struct DetectorFile {
    /// The file.
    pub model: ModelEntry,
    /// The network it holds.
    pub network: DetectorNetwork,
    /// Which Depth Anything, for a Depth Anything folder (A1111 names the two apart).
    pub depth_anything: Option<DepthAnythingVersion>,
}

/// A conditioning image of a ControlNet unit and its preprocessor.
#[derive(Debug, Clone)]
pub struct ControlInput {
    /// The image, as the client sent it.
    pub image: ConditioningImage,
    /// How it becomes a control map.
    pub preprocessing: Preprocessing,
    /// The detector file of a preprocessor that runs a network.
    pub detector: Option<DetectorFile>,
    /// The face network's file of a pose map with faces.
    pub face_detector: Option<DetectorFile>,
    /// The hand network's file of a pose map with hands.
    pub hand_detector: Option<DetectorFile>,
}

/// A ControlNet unit of a job.
#[derive(Debug, Clone)]
pub struct ControlNetJob {
    /// The ControlNet.
    pub model: ModelEntry,
    /// Its images: one, or a union unit's one per condition.
    pub inputs: Vec<ControlInput>,
    /// How the control map is fitted to the output size.
    pub resize: ResizeMode,
    /// Whether its detect resolutions were computed to fit the output (A1111's "Pixel
    /// Perfect"; recorded in the PNG parameters).
    pub pixel_perfect: bool,
    /// Scale, window and mode.
    pub unit: ControlUnit,
}

/// The refiner stage of a job.
#[derive(Debug, Clone)]
pub struct RefinerJob {
    /// The refiner model.
    pub model: ModelEntry,
    /// Its parameters.
    pub params: RefinerParams,
}

/// The hires pass of a job (A1111's "Hires. fix").
#[derive(Debug, Clone)]
pub struct HiresJob {
    /// Its final size, steps, strength, guidance, scheduler and enlargement.
    pub params: HiresParams,
    /// The upscaler model, when the decoded image is enlarged by one.
    pub upscaler: Option<ModelEntry>,
    /// The factor the request asked for, or `None` for an explicit final size.
    pub scale: Option<f64>,
    /// The second pass's scheduler as A1111 names it, for the PNG parameters.
    pub sampler_name: String,
    /// Its own prompt as the request wrote it (extra network tags included), for the PNG
    /// parameters.
    pub written_prompt: Option<String>,
    /// Its LoRAs where they are not the first pass's (its own prompt's extra network
    /// tags name others, as A1111 switches them): `loras`' listed ones and its tags'.
    pub loras: Option<Vec<LoraJob>>,
    /// Another base model the pass runs (A1111's "Hires checkpoint"), or `None`: the
    /// first pass's.
    pub model: Option<ModelEntry>,
}

/// A super-resolution step: the upscaler, the factor (at most its native scale; below
/// it, its output is resized down) and how the image is tiled.
#[derive(Debug, Clone)]
pub struct UpscaleJob {
    /// The upscaler file.
    pub model: ModelEntry,
    /// The factor the step enlarges by.
    pub factor: u32,
    /// Tiles, their context and overlap.
    pub tiling: TilePlan,
}

/// A post-processing step, run on every image in order before it is encoded.
#[derive(Debug, Clone)]
pub enum PostStep {
    /// Upscale with a super-resolution model.
    Upscale(UpscaleJob),
}

impl PostStep {
    /// The model the step uses.
    pub fn model(&self) -> &ModelEntry {
        match self {
            PostStep::Upscale(u) => &u.model,
        }
    }
}

/// An upscale job: one image through one upscale step, then encoded.
#[derive(Debug, Clone)]
pub struct UpscaleSpec {
    /// The image, as the client sent it.
    pub image: ConditioningImage,
    /// The upscaler, factor and tiling.
    pub step: UpscaleJob,
    /// The seed of the noise an upscaler that draws noise (AuraSR) draws.
    pub seed: u64,
    /// How the result is encoded.
    pub output: OutputSpec,
    /// The client's job id.
    pub client_job_id: Option<String>,
}

/// A preprocessing job: a client's image through a preprocessor that runs a network.
#[derive(Debug, Clone)]
pub struct PreprocessSpec {
    /// The image, as the client sent it.
    pub image: ConditioningImage,
    /// The preprocessor and its detection resolution.
    pub preprocessing: Preprocessing,
    /// The detector file.
    pub detector: DetectorFile,
    /// The face network's file of a pose map with faces.
    pub face_detector: Option<DetectorFile>,
    /// The hand network's file of a pose map with hands.
    pub hand_detector: Option<DetectorFile>,
}

/// What a queued job does.
#[derive(Debug, Clone)]
pub enum JobWork {
    /// A generation.
    Generate(Box<JobSpec>),
    /// An upscale of a client's image.
    Upscale(Box<UpscaleSpec>),
    /// A control map of a client's image.
    Preprocess(Box<PreprocessSpec>),
}

impl JobWork {
    /// The client's job id.
    pub fn client_job_id(&self) -> Option<&String> {
        match self {
            JobWork::Generate(spec) => spec.client_job_id.as_ref(),
            JobWork::Upscale(spec) => spec.client_job_id.as_ref(),
            JobWork::Preprocess(_) => None,
        }
    }

    /// The model that names the job in logs and spans (the base model, the upscaler,
    /// the detector).
    pub fn main_model(&self) -> &ModelEntry {
        match self {
            JobWork::Generate(spec) => &spec.model,
            JobWork::Upscale(spec) => &spec.step.model,
            JobWork::Preprocess(spec) => &spec.detector.model,
        }
    }

    /// How many images it makes.
    pub fn images(&self) -> usize {
        match self {
            JobWork::Generate(spec) => spec.params.num_images,
            JobWork::Upscale(_) | JobWork::Preprocess(_) => 1,
        }
    }
}

/// A validated job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Pipeline parameters, fully resolved (seed, size, steps; the prompt as the
    /// engine reads it, without extra network tags).
    pub params: GenerateParams,
    /// The prompt as the request wrote it, for the PNG parameters.
    pub written_prompt: String,
    /// The base model.
    pub model: ModelEntry,
    /// A VAE replacing the models' own, if any.
    pub vae: Option<ModelEntry>,
    /// LoRA adapters, in request order.
    pub loras: Vec<LoraJob>,
    /// Textual inversion embeddings, in request order.
    pub embeddings: Vec<EmbeddingJob>,
    /// IP-Adapter image prompts, in request order.
    pub ip_adapters: Vec<IpAdapterJob>,
    /// ControlNet units, in request order.
    pub controlnets: Vec<ControlNetJob>,
    /// The refiner stage, if any.
    pub refiner: Option<RefinerJob>,
    /// Output options.
    pub output: OutputSpec,
    /// Post-processing steps, in request order.
    pub post_processing: Vec<PostStep>,
    /// The hires pass, if any.
    pub hires: Option<HiresJob>,
    /// Only the masked area generated: how each image goes back into the original.
    pub paste_back: Option<crate::engine::inpaint_area::PasteBack>,
    /// The scheduler's A1111 sampler name, for the PNG parameters.
    pub sampler_name: String,
    /// The blur the init image's mask had (already applied), for the PNG parameters.
    pub mask_blur: u32,
    /// For each image, the resolved request that replays it (proto3 JSON, as the PNG's
    /// `sdxld` chunk records it); empty when no metadata is embedded.
    pub replay: Vec<String>,
    /// The client's job id.
    pub client_job_id: Option<String>,
}

impl JobSpec {
    /// Every model the job uses, base first: which the cache keeps during the job.
    pub fn models(&self) -> impl Iterator<Item = &ModelEntry> {
        std::iter::once(&self.model)
            .chain(self.hires_model())
            .chain(self.refiner.as_ref().map(|r| &r.model))
            .chain(self.vae.as_ref())
            .chain(self.loras.iter().map(|l| &l.model))
            .chain(self.hires_only_loras().map(|l| &l.model))
            .chain(
                self.ip_adapters
                    .iter()
                    .flat_map(|p| [&p.adapter, &p.encoder]),
            )
            .chain(self.controlnets.iter().map(|c| &c.model))
            .chain(self.detectors())
            .chain(self.hires.as_ref().and_then(|h| h.upscaler.as_ref()))
            .chain(self.post_processing.iter().map(PostStep::model))
    }

    /// The hires pass's own base model, if it runs another than the first pass's.
    pub fn hires_model(&self) -> Option<&ModelEntry> {
        self.hires.as_ref().and_then(|h| h.model.as_ref())
    }

    /// The LoRAs only the hires pass uses (a file in both sets is the first pass's).
    pub fn hires_only_loras(&self) -> impl Iterator<Item = &LoraJob> {
        let own = self.hires.as_ref().and_then(|h| h.loras.as_deref());
        own.unwrap_or_default().iter().filter(|l| {
            !self
                .loras
                .iter()
                .any(|first| first.model.path == l.model.path)
        })
    }

    /// The detectors of the units' preprocessors (each input's, then its face and hand
    /// networks'), in unit and input order.
    pub fn detectors(&self) -> impl Iterator<Item = &ModelEntry> {
        self.controlnets
            .iter()
            .flat_map(|c| &c.inputs)
            .flat_map(|i| [&i.detector, &i.face_detector, &i.hand_detector])
            .filter_map(|d| d.as_ref().map(|d| &d.model))
    }

    /// A picture of the whole init image (a control map, an image prompt's mask) as the
    /// generation sees it when only the masked area is generated: cut at the area's box
    /// (scaled to the picture's size) and fitted to the generation size; `None` when the
    /// whole image is generated.
    pub fn masked_area_of(&self, picture: &image::RgbImage) -> Option<image::RgbImage> {
        let back = self.paste_back.as_ref()?;
        let size = (self.params.width as u32, self.params.height as u32);
        let image = back.original.dimensions();
        Some(crate::engine::inpaint_area::crop_map(
            picture,
            back.region,
            image,
            size,
        ))
    }

    /// The size the denoising ends at (the hires pass's, when there is one), in pixels.
    pub fn denoised_size(&self) -> (i64, i64) {
        match &self.hires {
            Some(h) => (h.params.width, h.params.height),
            None => (self.params.width, self.params.height),
        }
    }

    /// The parameters of the base model's denoising passes: the first, and the hires
    /// pass when there is one.
    pub fn base_passes(&self) -> Vec<GenerateParams> {
        let mut passes = vec![self.params.clone()];
        if let Some(h) = &self.hires {
            passes.push(crate::engine::hires::second_pass_params(
                &self.params,
                &h.params,
            ));
        }
        passes
    }

    /// Each base pass's parameters as one denoising run of the job under `mode` takes
    /// them through the UNet at most (the memory estimate takes the largest of each
    /// part): `num_images` is the images sharing a run (see
    /// [`crate::engine::request::batch_runs`]). Before the models load, a scheduler's
    /// drawing of noise is unknown, so `Together` counts every image of a job that only
    /// such a scheduler would split (an upper bound). Each comes with the pipeline that
    /// runs it (the hires pass's own model, where it has one).
    pub fn largest_runs(&self, mode: BatchMode) -> Vec<(&std::path::Path, GenerateParams)> {
        let split = mode == BatchMode::PerImage
            || self.params.init_image.is_some()
            || self.refiner.is_some()
            || self.hires.is_some();
        let num_images = if split { 1 } else { self.params.num_images };
        let runners = [&self.model, self.hires_model().unwrap_or(&self.model)];
        self.base_passes()
            .into_iter()
            .zip(runners)
            .map(|(pass, model)| (model.path.as_path(), GenerateParams { num_images, ..pass }))
            .collect()
    }
}
