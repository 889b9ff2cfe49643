//! Loading a pipeline: a diffusers folder or a single-file checkpoint, its components
//! taken from a [`ComponentStore`] that may share them with pipelines already loaded.

use std::path::Path;
use std::rc::Rc;

use crate::engine::codec::{VaeCodec, VaeSource};
use crate::engine::components::{shared, ComponentFiles, ComponentStore, Fresh};
use crate::engine::device::Placement;
use crate::engine::error::{EngineError, Result};
use crate::engine::files::read_json;
use crate::engine::loading::single_file::{self as single, Configs};
use crate::engine::models::clip::ClipTextModel;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::models::unet::UNet2DConditionModel;
use crate::engine::pipeline::{ModelIndex, SdxlPipeline};
use crate::engine::schedulers::SchedulerConfig;
use crate::engine::weights::Weights;

impl SdxlPipeline {
    /// Loads a diffusers SDXL pipeline folder.
    pub fn load(dir: &Path, placement: Placement) -> Result<Self> {
        Self::load_with(dir, placement, &mut Fresh)
    }

    /// Loads a diffusers folder or a single-file checkpoint, taking its components from
    /// `store` (which may share them with pipelines already loaded).
    pub fn load_with(
        dir: &Path,
        placement: Placement,
        store: &mut dyn ComponentStore,
    ) -> Result<Self> {
        if dir.is_file() {
            return Self::load_single_file(dir, placement, store);
        }
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let (device, kind) = (placement.device, placement.kind);
        let (tokenizer, text_encoder) = if dir.join("text_encoder").is_dir() {
            let folder = dir.join("text_encoder");
            (
                Some(Rc::new(ClipTokenizer::from_dir(&dir.join("tokenizer"))?)),
                Some(shared(
                    store,
                    &ComponentFiles::folder("text_encoder", &folder),
                    || ClipTextModel::load_dir(&folder, device, kind),
                )?),
            )
        } else {
            (None, None)
        };
        let tokenizer_2 = Rc::new(ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?);
        let folder = dir.join("text_encoder_2");
        let text_encoder_2 = shared(
            store,
            &ComponentFiles::folder("text_encoder_2", &folder),
            || ClipTextModel::load_dir(&folder, device, kind),
        )?;
        let folder = dir.join("unet");
        let unet = shared(store, &ComponentFiles::folder("unet", &folder), || {
            UNet2DConditionModel::load_dir(&folder, placement)
        })?;
        let folder = dir.join("vae");
        let vae = shared(store, &ComponentFiles::folder("vae", &folder), || {
            VaeCodec::load(&folder, placement)
        })?;
        let scheduler =
            SchedulerConfig::load(&dir.join("scheduler").join("scheduler_config.json"))?;

        let pipeline = Self {
            dir: dir.to_path_buf(),
            placement,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            requires_aesthetics_score: index.requires_aesthetics_score,
            unet_graphs: Default::default(),
            adapted: Default::default(),
        };
        pipeline.check_shapes()?;
        Ok(pipeline)
    }

    /// The UNet's weights as stored (no adapter applied), opened again at `placement`
    /// under their diffusers keys: what a Control-LoRA is built on.
    pub fn unet_weights(&self, placement: Placement) -> Result<Weights> {
        if self.dir.is_file() {
            let layers = self.unet.config().layers_per_block.max(0) as usize;
            single::open_unet(&self.dir, layers, placement)
        } else {
            placement.open_component(&self.dir.join("unet"), "diffusion_pytorch_model")
        }
    }

    /// The components a model folder or single-file checkpoint loads, without loading it.
    pub fn component_files(path: &Path) -> Vec<ComponentFiles> {
        if path.is_file() {
            return vec![
                ComponentFiles::in_file("text_encoder", path, single::TEXT_ENCODER),
                ComponentFiles::in_file("text_encoder_2", path, single::TEXT_ENCODER_2),
                ComponentFiles::in_file("unet", path, single::UNET),
                ComponentFiles::in_file("vae", path, single::VAE),
            ];
        }
        ["text_encoder", "text_encoder_2", "unet", "vae"]
            .into_iter()
            .filter(|role| path.join(role).is_dir())
            .map(|role| ComponentFiles::folder(role, &path.join(role)))
            .collect()
    }

    /// Loads a single-file SDXL checkpoint (`*.safetensors` in the original layout), with
    /// the configs its metadata carries or the stock SDXL base configs, and the CLIP
    /// tokenizers built from the vocabulary built into sdxld.
    fn load_single_file(
        file: &Path,
        placement: Placement,
        store: &mut dyn ComponentStore,
    ) -> Result<Self> {
        let (device, kind) = (placement.device, placement.kind);
        let (names, metadata) = crate::engine::weights::read_header(file)?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if !single::is_sdxl_checkpoint(&names) {
            return Err(EngineError::Incompatible(format!(
                "`{}` is not a single-file SDXL base checkpoint (it lacks the UNet, VAE or one of the two text encoders)",
                file.display()
            )));
        }
        let configs = Configs::from_metadata(file, &metadata)?;
        let in_file = |role, prefix| ComponentFiles::in_file(role, file, prefix);
        let text_encoder = shared(
            store,
            &in_file("text_encoder", single::TEXT_ENCODER),
            || single::load_text_encoder(file, &configs, device, kind),
        )?;
        let text_encoder_2 = shared(
            store,
            &in_file("text_encoder_2", single::TEXT_ENCODER_2),
            || single::load_text_encoder_2(file, &configs, device, kind),
        )?;
        let unet = shared(store, &in_file("unet", single::UNET), || {
            single::load_unet(file, &configs, placement)
        })?;
        let vae = shared(store, &in_file("vae", single::VAE), || {
            let source = VaeSource::SingleFile {
                file: file.to_path_buf(),
                configs: Box::new(configs.clone()),
            };
            VaeCodec::from_source(source, placement)
        })?;
        let pipeline = Self {
            dir: file.to_path_buf(),
            placement,
            // SDXL's tokenizers: the second pads with "!".
            tokenizer: Some(Rc::new(ClipTokenizer::builtin("<|endoftext|>")?)),
            text_encoder: Some(text_encoder),
            tokenizer_2: Rc::new(ClipTokenizer::builtin("!")?),
            text_encoder_2,
            unet,
            vae,
            scheduler: configs.scheduler.clone(),
            force_zeros_for_empty_prompt: true,
            requires_aesthetics_score: false,
            unet_graphs: Default::default(),
            adapted: Default::default(),
        };
        pipeline.check_shapes()?;
        Ok(pipeline)
    }

    /// Checks that the components fit together (text widths, pooled width).
    fn check_shapes(&self) -> Result<()> {
        let mismatch = |message: String| EngineError::Config {
            path: self.dir.join("unet").join("config.json"),
            message,
        };
        self.check_tokenizers()?;
        let text_width = self
            .text_encoder
            .as_ref()
            .map_or(0, |t| t.config().hidden_size)
            + self.text_encoder_2.config().hidden_size;
        let cross = self.unet.config().cross_attention_dim;
        if text_width != cross {
            return Err(mismatch(format!(
                "cross_attention_dim is {cross} but the text encoders give {text_width} features"
            )));
        }
        let pooled = self.text_encoder_2.projection_dim().ok_or_else(|| {
            mismatch("text_encoder_2 has no text_projection (not an SDXL text encoder)".into())
        })?;
        // Refiners condition on five micro-conditioning values (no target size), the base
        // on six.
        let time_values = if self.requires_aesthetics_score { 5 } else { 6 };
        if let Some(expected) = self.unet.pooled_dim(time_values) {
            if expected != pooled {
                return Err(mismatch(format!(
                    "the added embedding expects a pooled width of {expected}, text_encoder_2 gives {pooled}"
                )));
            }
        }
        Ok(())
    }

    /// Checks that each text encoder has a position for every token its tokenizer gives
    /// and an embedding for every id.
    fn check_tokenizers(&self) -> Result<()> {
        let pairs = [
            (
                "text_encoder",
                self.tokenizer.as_deref(),
                self.text_encoder.as_deref(),
            ),
            (
                "text_encoder_2",
                Some(&*self.tokenizer_2),
                Some(&*self.text_encoder_2),
            ),
        ];
        for (name, tokenizer, encoder) in pairs {
            let (Some(tokenizer), Some(encoder)) = (tokenizer, encoder) else {
                continue;
            };
            let config = encoder.config();
            let path = self.dir.join(name).join("config.json");
            let length = tokenizer.max_length() as i64;
            if config.max_position_embeddings < length {
                return Err(EngineError::Config {
                    path,
                    message: format!(
                        "`max_position_embeddings` is {}, fewer than the {length} tokens its tokenizer gives",
                        config.max_position_embeddings
                    ),
                });
            }
            if config.vocab_size < tokenizer.id_bound() {
                return Err(EngineError::Config {
                    path,
                    message: format!(
                        "`vocab_size` is {}, but its tokenizer gives ids up to {}",
                        config.vocab_size,
                        tokenizer.id_bound() - 1
                    ),
                });
            }
        }
        Ok(())
    }

    /// This pipeline with another VAE (same latent space), sharing everything else.
    pub fn with_vae(&self, vae: Rc<VaeCodec>) -> Result<Self> {
        if vae.latent_channels() != self.vae.latent_channels()
            || vae.scale_factor() != self.vae.scale_factor()
        {
            return Err(EngineError::Incompatible(format!(
                "the VAE `{}` ({} latent channels, scale factor {}) does not fit `{}` ({} channels, scale factor {})",
                vae.dir().display(),
                vae.latent_channels(),
                vae.scale_factor(),
                self.dir.display(),
                self.vae.latent_channels(),
                self.vae.scale_factor()
            )));
        }
        Ok(Self {
            dir: self.dir.clone(),
            placement: self.placement,
            tokenizer: self.tokenizer.clone(),
            text_encoder: self.text_encoder.clone(),
            tokenizer_2: self.tokenizer_2.clone(),
            text_encoder_2: self.text_encoder_2.clone(),
            unet: self.unet.clone(),
            vae,
            scheduler: self.scheduler.clone(),
            force_zeros_for_empty_prompt: self.force_zeros_for_empty_prompt,
            requires_aesthetics_score: self.requires_aesthetics_score,
            unet_graphs: self.unet_graphs.clone(),
            adapted: self.adapted.clone(),
        })
    }
}
