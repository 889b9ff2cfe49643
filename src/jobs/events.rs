//! What a job reports, in domain terms: progress by stage, finished images (raw as the
//! runner hands them out, encoded as clients receive them) and the final report. The
//! API layer turns these into the contract's messages.

use std::time::Duration;

use crate::engine::preprocess::pose_set::PoseSet;
use crate::engine::registry::ModelKind;
use crate::jobs::JobError;
use crate::output::{OutputFormat, PngMetadata};

/// The stages a job goes through, as progress events and timings name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Waiting in the queue.
    Queued,
    /// Loading models.
    LoadingModels,
    /// Turning conditioning images into control maps.
    Preprocessing,
    /// Text encoders.
    EncodingPrompt,
    /// Base denoising.
    Denoising,
    /// Refiner denoising.
    Refining,
    /// VAE decoding.
    Decoding,
    /// Post-processing (encoding the outputs).
    PostProcessing,
    /// A hires pass enlarging the first pass's result.
    HiresUpscaling,
    /// A hires pass's denoising at the final size.
    HiresDenoising,
}

impl Stage {
    /// A stable label for metrics and spans.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::LoadingModels => "loading_models",
            Stage::Preprocessing => "preprocessing",
            Stage::EncodingPrompt => "encoding_prompt",
            Stage::Denoising => "denoising",
            Stage::Refining => "refining",
            Stage::Decoding => "decoding",
            Stage::PostProcessing => "post_processing",
            Stage::HiresUpscaling => "hires_upscaling",
            Stage::HiresDenoising => "hires_denoising",
        }
    }
}

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// An [H, W, 3] uint8 tensor as an RGB image.
    pub fn from_hwc(image: &tch::Tensor) -> Result<Self, crate::engine::error::EngineError> {
        let size = image.size();
        let pixels = Vec::<u8>::try_from(image.contiguous().flatten(0, -1))?;
        Ok(Self {
            width: size[1] as u32,
            height: size[0] as u32,
            pixels,
        })
    }

    /// The image as the `image` crate holds it.
    pub fn into_image(self) -> Result<image::RgbImage, crate::engine::error::EngineError> {
        image::RgbImage::from_raw(self.width, self.height, self.pixels).ok_or_else(|| {
            crate::engine::error::EngineError::Internal("an image of the wrong size".into())
        })
    }
}

impl From<image::RgbImage> for RgbImage {
    fn from(image: image::RgbImage) -> Self {
        let (width, height) = image.dimensions();
        Self {
            width,
            height,
            pixels: image.into_raw(),
        }
    }
}

/// An image encoded for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedImage {
    /// The encoded bytes.
    pub data: Vec<u8>,
    /// Their MIME type.
    pub mime_type: &'static str,
    /// Width in pixels of the image (the latents output: of the image they decode to).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Progress as the runner reports it.
#[derive(Debug, Clone)]
pub struct StepProgress {
    /// The stage.
    pub stage: Stage,
    /// Steps done (0 when a stage starts).
    pub step: u32,
    /// Steps in the stage (0 where it has none).
    pub total: u32,
    /// The image the stage works on.
    pub image_index: u32,
    /// A small preview of the current latents, when the request asks for one.
    pub preview: Option<RgbImage>,
}

/// What a finished image holds.
pub enum ImageContent {
    /// Decoded pixels.
    Rgb(RgbImage),
    /// The final latents [C, h, w], float32 on the CPU (the latents output format).
    Latents(tch::Tensor),
}

/// A finished image as the runner hands it out, to be encoded off the device thread.
pub struct FinishedImage {
    /// Its index in the request.
    pub index: u32,
    /// Its seed.
    pub seed: u64,
    /// Its variation seed, when the request varies its noise.
    pub variation_seed: Option<u64>,
    /// Its size in pixels (also for latents).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Pixels or latents.
    pub content: ImageContent,
    /// Encoding.
    pub format: OutputFormat,
    /// JPEG/WebP quality.
    pub quality: u8,
    /// PNG text chunks, when the request embeds metadata.
    pub metadata: Option<PngMetadata>,
    /// Its final latents [C, h, w], when the runner was asked to keep them.
    pub latents: Option<tch::Tensor>,
}

/// A progress event for clients.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressEvent {
    /// The stage.
    pub stage: Stage,
    /// Steps done.
    pub step: u32,
    /// Steps in the stage.
    pub total: u32,
    /// The image the stage works on.
    pub image_index: u32,
    /// An encoded preview.
    pub preview: Option<EncodedImage>,
}

/// A finished image for clients.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEvent {
    /// Its index in the request.
    pub index: u32,
    /// Its seed.
    pub seed: u64,
    /// Its variation seed, when the request varies its noise.
    pub variation_seed: Option<u64>,
    /// The encoded image.
    pub image: EncodedImage,
    /// Time from admission until it was ready.
    pub ready_after: Duration,
}

/// A ControlNet unit's control map, encoded.
#[derive(Debug)]
pub struct ControlMapEvent {
    /// The unit's index.
    pub unit_index: u32,
    /// The condition's index within a union unit (0: the unit's own image).
    pub condition_index: u32,
    /// The PNG.
    pub image: EncodedImage,
}

/// A model a job used.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelUsed {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: ModelKind,
    /// Its content hash (see [`crate::engine::hashes`]).
    pub sha256: String,
    /// The request's weight (LoRA adapters; 0 otherwise).
    pub weight: f32,
}

/// What a finished job reports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobReport {
    /// Time per stage, in the order the stages first ran.
    pub stage_timings: Vec<(Stage, Duration)>,
    /// Time from admission to the end.
    pub total: Duration,
    /// Most bytes the job held on the device (0 on the CPU).
    pub peak_device_memory_bytes: u64,
    /// The models used, base first.
    pub models: Vec<ModelUsed>,
    /// Things the client should know (a truncated prompt, a redone decode).
    pub warnings: Vec<String>,
    /// The poses a preprocessing job's OpenPose preprocessor found.
    pub detected_poses: Option<PoseSet>,
}

impl JobReport {
    /// Adds `elapsed` to `stage`'s timing.
    pub fn add_time(&mut self, stage: Stage, elapsed: Duration) {
        match self.stage_timings.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, total)) => *total += elapsed,
            None => self.stage_timings.push((stage, elapsed)),
        }
    }
}

/// What a job sends its client.
#[derive(Debug)]
pub enum JobEvent {
    /// Progress.
    Progress(ProgressEvent),
    /// One finished image.
    Image(ImageEvent),
    /// A ControlNet unit's control map.
    ControlMap(ControlMapEvent),
    /// The job finished.
    Completed(JobReport),
    /// The job failed or was stopped.
    Failed(JobError),
}
