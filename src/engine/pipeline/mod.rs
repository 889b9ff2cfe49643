//! The SDXL pipeline, following diffusers' `StableDiffusionXLPipeline` (and its img2img
//! and inpainting variants): loading ([`load`]), the conditioning ([`prompt`]), the
//! initial latents ([`latents`]) and the denoising loop ([`denoise`]).

mod a1111_prompt;
mod conditioning;
mod control;
mod denoise;
pub mod dry_run;
mod graphs;
mod latents;
mod load;
mod prompt;
mod weighted_prompt;
pub mod window;

use std::cell::Cell;
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Deserialize;
use tch::Tensor;

use crate::engine::codec::VaeCodec;
use crate::engine::error::Result;
use crate::engine::models::clip::ClipTextModel;
use crate::engine::models::seamless;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::models::unet::UNet2DConditionModel;
use crate::engine::models::vae::AutoencoderKL;
use crate::engine::noise::NoiseStream;
use crate::engine::request::{batch_runs, BatchMode};
use crate::engine::schedulers::SchedulerConfig;

/// Where a pipeline loads and runs.
pub use crate::engine::device::Placement;
pub use crate::engine::request::{
    Entry, GenerateOutput, GenerateParams, InitImage, RefinerMode, RefinerParams,
    SchedulerOverrides,
};
pub use control::Control;
pub use denoise::Step;
pub use prompt::{Attended, LaterTexts, PromptEmbeds, PromptTokens, TextEmbeds};

/// `model_index.json` of a diffusers pipeline folder (the parts sdxld reads).
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(default = "yes")]
    force_zeros_for_empty_prompt: bool,
    #[serde(default)]
    requires_aesthetics_score: bool,
}

fn yes() -> bool {
    true
}

/// Where a denoising run enters the schedule.
pub enum Start<'a> {
    /// From the request: noise, or its init image (and mask) at its strength or
    /// `denoising_start`.
    Request,
    /// From an earlier stage's latents of one image (a refiner taking over, a hires pass
    /// on enlarged latents).
    Handoff {
        /// [1, C, h, w] latents.
        latents: &'a Tensor,
        /// Where the schedule is entered.
        entry: Entry,
        /// The inpainting mask [1, 1, H, W] (1 = repaint) of the request the latents come
        /// from: outside it the run keeps to the handed-over latents, as diffusers'
        /// inpainting pipeline does when given latents (a refiner after inpainting).
        mask: Option<&'a Tensor>,
    },
    /// From an earlier stage's image, encoded with the VAE on the run's generator as it
    /// stands (a hires pass on an upscaled image; the generator is not seeded again).
    Image {
        /// [1, 3, H, W] float32 in [-1, 1].
        image: &'a Tensor,
        /// Where the schedule is entered.
        entry: Entry,
    },
}

impl Start<'_> {
    /// Whether the run continues an earlier stage of the same image.
    fn continues(&self) -> bool {
        !matches!(self, Start::Request)
    }

    /// Where an image-based start enters the schedule (`None` from noise).
    fn entry(&self, p: &GenerateParams) -> Option<Entry> {
        match self {
            Start::Handoff { entry, .. } | Start::Image { entry, .. } => Some(*entry),
            Start::Request => p.init_image.as_ref().map(InitImage::entry),
        }
    }
}

/// A loaded SDXL pipeline.
pub struct SdxlPipeline {
    dir: PathBuf,
    placement: Placement,
    tokenizer: Option<Rc<ClipTokenizer>>,
    text_encoder: Option<Rc<ClipTextModel>>,
    tokenizer_2: Rc<ClipTokenizer>,
    text_encoder_2: Rc<ClipTextModel>,
    unet: Rc<UNet2DConditionModel>,
    vae: Rc<VaeCodec>,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    requires_aesthetics_score: bool,
    /// The UNet's calls captured as CUDA graphs (shared by the copies with another VAE).
    unet_graphs: Rc<graphs::UnetGraphs>,
    /// How many sets of LoRA adapters are on the pipeline now.
    adapted: Rc<Cell<usize>>,
}

impl SdxlPipeline {
    /// The folder (or single file) the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Device and kind.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Frees the UNet calls captured as CUDA graphs (and the activations they keep); later
    /// calls capture again.
    pub fn release_graphs(&self) {
        self.unet_graphs.release();
    }

    /// The count of LoRA adapter sets on the pipeline, shared with whoever applies one.
    pub fn adapted(&self) -> Rc<Cell<usize>> {
        self.adapted.clone()
    }

    /// Pixels per latent along each side (2^(VAE levels - 1)).
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.scale_factor()
    }

    /// The default image size: the UNet's sample size times the VAE scale factor.
    pub fn default_size(&self) -> i64 {
        self.unet.config().sample_size.unwrap_or(128) * self.vae_scale_factor()
    }

    /// The UNet (for component tests and benchmarks).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The VAE (for component tests).
    pub fn vae(&self) -> &AutoencoderKL {
        self.vae.model()
    }

    /// The VAE that encodes and decodes.
    pub fn vae_codec(&self) -> &Rc<VaeCodec> {
        &self.vae
    }

    /// The first text encoder, absent in refiner-style pipelines.
    pub fn text_encoder(&self) -> Option<&ClipTextModel> {
        self.text_encoder.as_deref()
    }

    /// The second text encoder.
    pub fn text_encoder_2(&self) -> &ClipTextModel {
        &self.text_encoder_2
    }

    /// The model's default scheduler configuration.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Whether the model conditions on aesthetic scores (an SDXL refiner).
    pub fn requires_aesthetics_score(&self) -> bool {
        self.requires_aesthetics_score
    }

    /// Whether the UNet is an inpainting UNet (latents, mask and masked image in).
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels != self.vae.latent_channels()
    }

    /// The number of latent channels (the VAE's; an inpainting UNet takes more).
    pub fn latent_channels(&self) -> i64 {
        self.vae.latent_channels()
    }

    /// Generates `p.num_images` images as one call of diffusers' pipeline does (with one
    /// generator per image): the final latents and the decoded images.
    pub fn generate(&self, p: &GenerateParams) -> Result<GenerateOutput> {
        self.generate_controlled(p, &[])
    }

    /// [`Self::generate`] under the ControlNet units `controls` (diffusers'
    /// `StableDiffusionXLControlNet*` pipelines).
    pub fn generate_controlled(
        &self,
        p: &GenerateParams,
        controls: &[Control<'_>],
    ) -> Result<GenerateOutput> {
        let _seamless = seamless::request(p.seamless);
        let latents = self.denoise_all_controlled(p, controls, &mut |_| {})?;
        self.decode_all(&latents)
    }

    /// The final latents of `p.num_images` images, float32 on the CPU [N, C, h, w], as one
    /// call of diffusers' pipeline makes them; `on_step` sees every step of every run.
    pub fn denoise_all(
        &self,
        p: &GenerateParams,
        on_step: &mut dyn FnMut(Step<'_>),
    ) -> Result<Tensor> {
        self.denoise_all_controlled(p, &[], on_step)
    }

    /// [`Self::denoise_all`] under the ControlNet units `controls`.
    pub fn denoise_all_controlled(
        &self,
        p: &GenerateParams,
        controls: &[Control<'_>],
        on_step: &mut dyn FnMut(Step<'_>),
    ) -> Result<Tensor> {
        self.validate(p)?;
        let prompt = self.encode_prompt(p)?;
        let mut all = Vec::with_capacity(p.num_images);
        for run in batch_runs(p, self.needs_own_generators(p)?, BatchMode::Together) {
            let mut noise = NoiseStream::lock();
            let mut observe = |step: Step<'_>| -> ControlFlow<Infallible> {
                on_step(step);
                ControlFlow::Continue(())
            };
            all.push(to_the_end(self.denoise(
                &run,
                &prompt,
                Start::Request,
                controls,
                &mut noise,
                &mut observe,
            )?));
        }
        Ok(Tensor::cat(&all, 0))
    }

    /// Decodes every image of `latents` [N, C, H/f, W/f].
    pub fn decode_all(&self, latents: &Tensor) -> Result<GenerateOutput> {
        let n = latents.size()[0];
        let mut images = Vec::with_capacity(n as usize);
        for i in 0..n {
            images.push(self.decode_image(&latents.get(i))?);
        }
        Ok(GenerateOutput {
            latents: latents.shallow_clone(),
            images: Tensor::stack(&images, 0),
        })
    }

    /// Decodes one image's latents [C, h, w] into a [H, W, 3] uint8 image on the CPU.
    pub fn decode_image(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(latents)?.image)
    }
}

/// The latents of a run nothing can stop.
pub(crate) fn to_the_end(flow: ControlFlow<Infallible, Tensor>) -> Tensor {
    match flow {
        ControlFlow::Continue(latents) => latents,
        ControlFlow::Break(never) => match never {},
    }
}

/// An observer that lets a run go to its end.
pub(crate) fn go_on(_: Step<'_>) -> ControlFlow<Infallible> {
    ControlFlow::Continue(())
}
