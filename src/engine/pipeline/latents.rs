//! The latents a denoising run starts from: noise (text to image), the init image's VAE
//! latents noised to the entry timestep (image to image, a refiner hand-off), or the
//! inpainting latents with their mask, drawn from the job's generator in diffusers' order.

use tch::{Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::noise::NoiseStream;
use crate::engine::pipeline::{Entry, GenerateParams, InitImage, SdxlPipeline, Start};
use crate::engine::schedulers::Scheduler;
use crate::engine::variation::{vary, SeedVariation};

/// What the inpainting loop needs besides the latents.
pub(super) struct Inpaint {
    /// [1, 1, h, w] at latent resolution, 1 = repaint.
    pub mask: Tensor,
    /// Latents of the image with the repainted area blacked out, for a 9-channel UNet
    /// (which takes [latents, mask, masked image latents]); `None` for a 4-channel UNet,
    /// whose latents are blended with the image's instead.
    pub masked_latents: Option<Tensor>,
    /// Latents of the image (4-channel blending).
    pub image_latents: Tensor,
    /// The noise the initial latents got, re-applied at each level when blending.
    pub noise: Tensor,
}

impl SdxlPipeline {
    /// The latents the loop starts from at timestep index `start` (see [`Start`]), and the
    /// inpainting state when `p` inpaints.
    pub(super) fn initial_latents(
        &self,
        p: &GenerateParams,
        from: &Start<'_>,
        scheduler: &dyn Scheduler,
        start: usize,
        noise: &mut NoiseStream,
    ) -> Result<(Tensor, Option<Inpaint>)> {
        let add_noise = matches!(from.entry(p), Some(Entry::Strength(_)));
        let takes_latents_only = !self.is_inpainting();
        let start_noise = self.start_noise(p);
        match (from, &p.init_image) {
            (
                Start::Handoff {
                    latents,
                    entry,
                    mask: Some(mask),
                },
                _,
            ) => {
                let handoff = (*latents, *mask, *entry);
                let (latents, state) =
                    self.handoff_inpaint_latents(handoff, scheduler, start, start_noise, noise)?;
                Ok((latents, Some(state)))
            }
            (Start::Handoff { latents, .. }, _) => {
                let noised = add_noise.then_some(start_noise);
                let latents =
                    self.image_latents(None, Some(latents), noised, scheduler, start, noise)?;
                Ok((latents, None))
            }
            (Start::Image { image, .. }, _) => {
                let noised = add_noise.then_some(start_noise);
                let latents =
                    self.image_latents(Some(image), None, noised, scheduler, start, noise)?;
                Ok((latents, None))
            }
            (Start::Request, None) => {
                if !takes_latents_only {
                    return Err(EngineError::InvalidRequest(
                        "this is an inpainting model: it needs an init image and a mask".into(),
                    ));
                }
                let initial = self
                    .initial_noise(p, noise)
                    .to_device(self.placement.device);
                Ok((initial * scheduler.init_noise_sigma(), None))
            }
            (Start::Request, Some(init)) if init.mask.is_some() => {
                let (latents, state) =
                    self.inpaint_latents(init, p, scheduler, (start, start_noise), noise)?;
                Ok((latents, Some(state)))
            }
            (Start::Request, Some(init)) => {
                if !takes_latents_only {
                    return Err(EngineError::InvalidRequest(
                        "this is an inpainting model: it needs a mask with the init image".into(),
                    ));
                }
                noise.seed(p.seed);
                let image = init.to_tensor();
                let noised = add_noise.then_some(start_noise);
                let latents =
                    self.image_latents(Some(&image), None, noised, scheduler, start, noise)?;
                Ok((latents, None))
            }
        }
    }

    /// Initial noise for `n` images: image i is `randn([1, C, h, w])` from the CPU
    /// generator seeded with seed + i, in float32 (invariant 2), varied as `p` asks.
    pub(super) fn initial_noise(&self, p: &GenerateParams, noise: &mut NoiseStream) -> Tensor {
        let f = self.vae_scale_factor();
        let channels = self.vae.latent_channels();
        let shape = [1, channels, p.height / f, p.width / f];
        let start_noise = self.start_noise(p);
        let draws: Vec<Tensor> = (0..p.num_images as u64)
            .map(|i| {
                noise.seed(p.seed.wrapping_add(i));
                start_noise.nth(i).draw(&shape, noise)
            })
            .collect();
        Tensor::cat(&draws, 0)
    }

    fn start_noise(&self, p: &GenerateParams) -> StartNoise {
        StartNoise {
            seed: p.seed,
            variation: p.variation,
            factor: self.vae_scale_factor(),
        }
    }

    /// Image to image (StableDiffusionXLImg2ImgPipeline's prepare_latents): the VAE
    /// latents of an image ([1, 3, H, W] in [-1, 1]; or latents from an earlier stage),
    /// noised to timestep
    /// `start` unless the start is a `denoising_start`. Draws the latent sample first,
    /// then the noise.
    pub(super) fn image_latents(
        &self,
        image: Option<&Tensor>,
        latents: Option<&Tensor>,
        noised: Option<StartNoise>,
        scheduler: &dyn Scheduler,
        start: usize,
        noise: &mut NoiseStream,
    ) -> Result<Tensor> {
        let device = self.placement.device;
        let latents = match (image, latents) {
            (_, Some(latents)) => latents.to_device(device).to_kind(Kind::Float),
            (Some(image), None) => self.encode_sample(image, noise),
            (None, None) => {
                return Err(EngineError::InvalidRequest(
                    "image to image needs an image or latents".into(),
                ))
            }
        };
        let Some(start_noise) = noised else {
            return Ok(latents);
        };
        let draw = start_noise
            .draw(latents.size().as_slice(), noise)
            .to_device(device);
        Ok(scheduler.add_noise(&latents, &draw, start))
    }

    /// A VAE sample of `image` ([1, 3, H, W] in [-1, 1]) in the denoiser's latent space,
    /// drawing its noise from the generator.
    fn encode_sample(&self, image: &Tensor, noise: &mut NoiseStream) -> Tensor {
        self.vae.encode_sample(image, noise)
    }

    /// Inpainting (StableDiffusionXLInpaintPipeline's prepare_latents and
    /// prepare_mask_latents), drawing in diffusers' order: the image's latent sample (when
    /// needed), the noise, then the masked image's latent sample.
    pub(super) fn inpaint_latents(
        &self,
        init: &InitImage,
        p: &GenerateParams,
        scheduler: &dyn Scheduler,
        (start, start_noise): (usize, StartNoise),
        noise: &mut NoiseStream,
    ) -> Result<(Tensor, Inpaint)> {
        let device = self.placement.device;
        let in_channels = self.unet.config().in_channels;
        let latent_channels = self.vae.latent_channels();
        let nine_channels = in_channels == 2 * latent_channels + 1;
        if !nine_channels && in_channels != latent_channels {
            return Err(EngineError::InvalidRequest(format!(
                "a UNet with {in_channels} input channels cannot inpaint"
            )));
        }
        let strength_max = init.strength >= 1.0;
        let image = init.to_tensor();
        let mask = init
            .mask_tensor()
            .ok_or_else(|| EngineError::InvalidRequest("inpainting needs a mask".into()))?;
        let masked_image = &image * mask.lt(0.5).to_kind(Kind::Float);
        let f = self.vae_scale_factor();
        let (h, w) = (p.height / f, p.width / f);
        let need_image = !nine_channels || !strength_max;
        let shape = [1, latent_channels, h, w];
        let (image_latents, initial, masked_latents) = match p.batch_first_seed {
            None => {
                noise.seed(p.seed);
                let image_latents = need_image.then(|| self.encode_sample(&image, noise));
                let initial = start_noise.draw(&shape, noise).to_device(device);
                (
                    image_latents,
                    initial,
                    self.encode_sample(&masked_image, noise),
                )
            }
            Some(first) => {
                // The latent samples come from the first image's generator; this image's
                // generator starts with the noise.
                noise.seed(first);
                let image_latents = need_image.then(|| self.encode_sample(&image, noise));
                let _first_noise = noise.randn(&shape);
                let masked_latents = self.encode_sample(&masked_image, noise);
                noise.seed(p.seed);
                (
                    image_latents,
                    start_noise.draw(&shape, noise).to_device(device),
                    masked_latents,
                )
            }
        };
        let latents = match (&image_latents, strength_max) {
            (Some(image_latents), false) => scheduler.add_noise(image_latents, &initial, start),
            _ => &initial * scheduler.init_noise_sigma(),
        };
        let mask = mask
            .upsample_nearest2d([h, w], None, None)
            .to_device(device);
        let state = Inpaint {
            mask,
            masked_latents: nine_channels.then_some(masked_latents),
            image_latents: image_latents.unwrap_or_else(|| initial.zeros_like()),
            noise: initial,
        };
        Ok((latents, state))
    }

    /// Inpainting that continues an earlier stage's latents (diffusers'
    /// StableDiffusionXLInpaintPipeline given latents as its image, as a refiner after
    /// inpainting runs): those latents are both the start and the image the unmasked area
    /// keeps to. A noise is drawn either way; it noises the start only at a strength
    /// (pure noise at strength 1), not at a `denoising_start`.
    fn handoff_inpaint_latents(
        &self,
        (handed, mask, entry): (&Tensor, &Tensor, Entry),
        scheduler: &dyn Scheduler,
        start: usize,
        start_noise: StartNoise,
        noise: &mut NoiseStream,
    ) -> Result<(Tensor, Inpaint)> {
        if self.is_inpainting() {
            return Err(EngineError::InvalidRequest(
                "an inpainting UNet cannot continue from latents: it needs the masked image".into(),
            ));
        }
        let device = self.placement.device;
        let image_latents = handed.to_device(device).to_kind(Kind::Float);
        let size = image_latents.size();
        let drawn = start_noise.draw(&size, noise).to_device(device);
        let latents = match entry {
            Entry::DenoisingStart(_) => image_latents.shallow_clone(),
            Entry::Strength(strength) if strength >= 1.0 => &drawn * scheduler.init_noise_sigma(),
            Entry::Strength(_) => scheduler.add_noise(&image_latents, &drawn, start),
        };
        let mask = mask
            .upsample_nearest2d([size[2], size[3]], None, None)
            .to_device(device);
        let state = Inpaint {
            mask,
            masked_latents: None,
            image_latents,
            noise: drawn,
        };
        Ok((latents, state))
    }
}

/// How a run draws the noise it starts from: from the job's stream, then varied as the
/// request asks (every pass that starts from noise varies it alike, as A1111's hires pass
/// does).
#[derive(Clone, Copy)]
pub(super) struct StartNoise {
    /// The seed of the first image drawn.
    seed: u64,
    variation: Option<SeedVariation>,
    /// The VAE's scale factor (a resized seed's size in latents).
    factor: i64,
}

impl StartNoise {
    /// The noise of the image `index` places later.
    fn nth(self, index: u64) -> Self {
        Self {
            seed: self.seed.wrapping_add(index),
            variation: self.variation.map(|v| v.nth(index)),
            ..self
        }
    }

    /// `randn(shape)` from the stream ([N, C, h, w]: N images from seed on), varied.
    fn draw(self, shape: &[i64], noise: &mut NoiseStream) -> Tensor {
        let drawn = noise.randn(shape);
        let Some(variation) = self.variation else {
            return drawn;
        };
        let images: Vec<Tensor> = (0..shape[0])
            .map(|j| {
                let image = self.nth(j as u64);
                let own = drawn.narrow(0, j, 1);
                vary(
                    &own,
                    image.seed,
                    &variation.nth(j as u64),
                    self.factor,
                    noise,
                )
            })
            .collect();
        Tensor::cat(&images, 0)
    }
}
