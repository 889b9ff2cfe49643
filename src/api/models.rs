//! `sdxld.v1.ModelService`: what the model roots hold and what the server can do.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::convert;
use crate::api::status::ApiError;
use crate::api::validate::scheduler_kind;
use crate::api::ApiState;
use crate::engine::loading::lora::{LoraFormat, LoraLayout, LoraTarget};
use crate::engine::preprocess::depth_anything::{self, DepthAnythingVersion};
use crate::engine::preprocess::detector::DetectorNetwork;
use crate::engine::registry::{ModelEntry, ModelFormat, ModelKind, Registry};
use crate::jobs::{AdminOp, AdminRequest, JobError};
use crate::proto::v1 as pb;
use crate::proto::v1::model_service_server::ModelService;

/// The model service.
pub struct Models {
    state: Arc<ApiState>,
}

impl Models {
    /// A service over `state`.
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }

    /// Resolves the model an admin request names.
    fn resolve(registry: &Registry, name: &str, kind: i32) -> Result<ModelEntry, ApiError> {
        let kind = match pb::ModelKind::try_from(kind) {
            Ok(pb::ModelKind::Unspecified | pb::ModelKind::Base) => ModelKind::Base,
            Ok(pb::ModelKind::Refiner) => ModelKind::Refiner,
            Ok(pb::ModelKind::Vae) => ModelKind::Vae,
            Ok(pb::ModelKind::Lora) => ModelKind::Lora,
            Ok(pb::ModelKind::Controlnet) => ModelKind::ControlNet,
            Ok(pb::ModelKind::Upscaler) => ModelKind::Upscaler,
            Ok(pb::ModelKind::Preprocessor) => ModelKind::Preprocessor,
            Ok(pb::ModelKind::Embedding) => ModelKind::Embedding,
            Ok(pb::ModelKind::IpAdapter) => ModelKind::IpAdapter,
            Ok(pb::ModelKind::ImageEncoder) => ModelKind::ImageEncoder,
            Err(_) => {
                return Err(ApiError::invalid(
                    "kind",
                    &format!("`kind` has an unknown enum value {kind}"),
                ))
            }
        };
        let resolved = if kind == ModelKind::Base {
            registry.resolve(name)
        } else {
            registry.resolve_kind(kind, name)
        };
        Ok(resolved?)
    }

    /// Runs a load or unload on the worker thread, between jobs.
    async fn admin(&self, op: AdminOp, name: &str, kind: i32) -> Result<pb::ModelInfo, Status> {
        let status = |e: ApiError| self.state.status(e);
        if name.is_empty() {
            return Err(status(ApiError::invalid("name", "`name` is required")));
        }
        let (registry, name) = (self.state.registry.clone(), name.to_string());
        let model = tokio::task::spawn_blocking(move || Self::resolve(&registry, &name, kind))
            .await
            .map_err(|e| status(ApiError::Internal(e.to_string())))?
            .map_err(status)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.state
            .queue
            .submit_admin(AdminRequest {
                op,
                model: model.clone(),
                reply,
            })
            .map_err(|e| status(ApiError::Job(e)))?;
        match answer.await {
            Ok(Ok(_)) => {
                let state = self.state.clone();
                tokio::task::spawn_blocking(move || info(&state, &model))
                    .await
                    .map_err(|e| status(ApiError::Internal(e.to_string())))
            }
            Ok(Err(e)) => Err(status(ApiError::Job(JobError::Engine(e)))),
            Err(_) => Err(Status::unavailable("the engine stopped")),
        }
    }
}

/// What the listing says of `model`: its hash only once known (the background thread
/// computes it; listing never hashes).
fn info(state: &ApiState, model: &ModelEntry) -> pb::ModelInfo {
    let resident = state
        .resident
        .lock()
        .map(|r| r.contains(&model.path))
        .unwrap_or(false);
    pb::ModelInfo {
        name: model.name.clone(),
        kind: convert::model_kind(model.kind) as i32,
        format: match model.format {
            ModelFormat::Diffusers => pb::ModelFormat::Diffusers,
            ModelFormat::SingleFile => pb::ModelFormat::Safetensors,
        } as i32,
        size_bytes: model.size_bytes,
        sha256: state.hashes.known_model(model).unwrap_or_default(),
        resident,
        is_default: model.kind == ModelKind::Base
            && model.name == state.registry.default_model().name,
        lora: (model.kind == ModelKind::Lora).then(|| lora_info(model)),
        controlnet: (model.kind == ModelKind::ControlNet).then(|| controlnet_info(model)),
        upscaler: (model.kind == ModelKind::Upscaler).then(|| upscaler_info(model)),
        preprocessor: (model.kind == ModelKind::Preprocessor).then(|| preprocessor_info(model)),
        embedding: (model.kind == ModelKind::Embedding).then(|| embedding_info(model)),
        ip_adapter: (model.kind == ModelKind::IpAdapter).then(|| ip_adapter_info(model)),
        image_encoder: (model.kind == ModelKind::ImageEncoder).then(|| image_encoder_info(model)),
    }
}

/// A model's listing error, naming it as clients know it rather than by its server path.
fn listed_error(error: &impl std::fmt::Display, model: &ModelEntry) -> String {
    error
        .to_string()
        .replace(&*model.path.to_string_lossy(), &model.name)
}

/// An IP-Adapter's kind and widths from its header; a file that is not one lists with
/// its error.
fn ip_adapter_info(model: &ModelEntry) -> pb::IpAdapterInfo {
    use crate::engine::ip_adapter::{adapter_shape, ProjectionShape};
    let shapes =
        crate::engine::weights::read_shapes(&model.path).map_err(|e| listed_error(&e, model));
    match shapes.and_then(|(shapes, _)| adapter_shape(&shapes)) {
        Ok((shape, widths)) => {
            let width = |n: i64| n.max(0) as u32;
            pb::IpAdapterInfo {
                kind: match shape {
                    ProjectionShape::Plain { .. } => "plain",
                    ProjectionShape::Resampler { .. } => "plus",
                }
                .into(),
                tokens: width(shape.tokens()),
                reads_width: width(shape.embed()),
                cross_attention_dim: width(shape.cross()),
                layers: widths.len() as u32,
                error: String::new(),
            }
        }
        Err(error) => pb::IpAdapterInfo {
            error,
            ..Default::default()
        },
    }
}

/// An image encoder's input size and widths from its config.
fn image_encoder_info(model: &ModelEntry) -> pb::ImageEncoderInfo {
    use crate::engine::config_check::{check_config, read_config};
    use crate::engine::models::clip_vision::ClipVisionConfig;
    let path = model.path.join("config.json");
    let config =
        read_config::<ClipVisionConfig>(&path).and_then(|c| check_config(&c, &path).map(|_| c));
    match config {
        Ok(c) => {
            let width = |n: i64| n.max(0) as u32;
            pb::ImageEncoderInfo {
                image_size: width(c.image_size),
                hidden_size: width(c.hidden_size),
                projection_dim: width(c.projection_dim),
                error: String::new(),
            }
        }
        Err(e) => pb::ImageEncoderInfo {
            error: listed_error(&e, model),
            ..Default::default()
        },
    }
}

/// An embedding's vectors per text encoder; a file that is not one lists with its error.
fn embedding_info(model: &ModelEntry) -> pb::EmbeddingInfo {
    match crate::engine::textual_inversion::vector_shapes(&model.path, &model.name) {
        Ok([first, second]) => {
            let (vectors, width) = first.unwrap_or_default();
            let (vectors_2, width_2) = second.unwrap_or_default();
            let count = |n: i64| n.max(0) as u32;
            pb::EmbeddingInfo {
                vectors: count(vectors),
                width: count(width),
                vectors_2: count(vectors_2),
                width_2: count(width_2),
                error: String::new(),
            }
        }
        Err(e) => pb::EmbeddingInfo {
            error: listed_error(&e, model),
            ..Default::default()
        },
    }
}

/// Which network a preprocessor file holds; a file of none lists with its error.
fn preprocessor_info(model: &ModelEntry) -> pb::PreprocessorModelInfo {
    match crate::engine::preprocess::detector::network_of(&model.path) {
        Ok(network) => pb::PreprocessorModelInfo {
            network: network.name().to_string(),
            version: network_version(network, model),
            error: String::new(),
        },
        Err(e) => pb::PreprocessorModelInfo {
            error: listed_error(&e, model),
            ..Default::default()
        },
    }
}

/// The version of a network that has several (Depth Anything's), else empty.
fn network_version(network: DetectorNetwork, model: &ModelEntry) -> String {
    match network {
        DetectorNetwork::DepthAnything => match depth_anything::version_of(&model.path) {
            Ok(DepthAnythingVersion::First) => "1".into(),
            Ok(DepthAnythingVersion::Second) => "2".into(),
            Err(_) => String::new(),
        },
        _ => String::new(),
    }
}

/// What an upscaler's tensors show; a file of no served layout lists with its error.
fn upscaler_info(model: &ModelEntry) -> pb::UpscalerInfo {
    match crate::engine::upscale::layout::read(&model.path) {
        Ok(architecture) => pb::UpscalerInfo {
            architecture: architecture.name().to_string(),
            scale: architecture.scale().max(0) as u32,
            tags: architecture.tags(),
            error: String::new(),
        },
        Err(e) => pb::UpscalerInfo {
            error: listed_error(&e, model),
            ..Default::default()
        },
    }
}

/// What a ControlNet's config says; an unreadable config lists as unknown.
fn controlnet_info(model: &ModelEntry) -> pb::ControlNetInfo {
    let facts = model.controlnet.as_ref();
    let width = facts.and_then(|f| f.cross_attention_dim);
    let adapter = facts.and_then(|f| f.adapter);
    let base = match (adapter, width) {
        (Some(a), _) if a.xl => "sdxl",
        (Some(_), _) => "sd1",
        (None, Some(2048)) => "sdxl",
        (None, Some(768)) => "sd1",
        (None, Some(1024)) => "sd2",
        _ => "unknown",
    };
    pb::ControlNetInfo {
        union: facts.is_some_and(|f| f.union_types.is_some()),
        control_types: facts.and_then(|f| f.union_types).unwrap_or(0) as u32,
        base: base.to_string(),
        t2i_adapter: adapter.is_some(),
        downscale_factor: adapter.map_or(0, |a| a.downscale_factor.max(0) as u32),
        control_lora: facts.is_some_and(|f| f.control_lora),
    }
}

/// What a LoRA file's header says; an unreadable file lists with an unspecified format.
fn lora_info(model: &ModelEntry) -> pb::LoraInfo {
    let Ok(layout) = LoraLayout::read(&model.path, &model.name) else {
        return pb::LoraInfo::default();
    };
    pb::LoraInfo {
        format: match layout.format {
            LoraFormat::Kohya => pb::LoraFormat::Kohya,
            LoraFormat::Peft => pb::LoraFormat::Peft,
        } as i32,
        rank: layout.rank().max(0) as u32,
        targets: layout
            .targets()
            .into_iter()
            .map(|t| {
                (match t {
                    LoraTarget::Unet => pb::LoraTarget::Unet,
                    LoraTarget::TextEncoder => pb::LoraTarget::TextEncoder,
                    LoraTarget::TextEncoder2 => pb::LoraTarget::TextEncoder2,
                }) as i32
            })
            .collect(),
        layers: layout.modules.len() as u32,
        alias: layout.alias.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl ModelService for Models {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let kind = request.into_inner().kind;
        let kind = pb::ModelKind::try_from(kind).map_err(|_| {
            ApiError::invalid("kind", &format!("`kind` has an unknown enum value {kind}"))
                .into_status(Default::default())
        })?;
        let state = self.state.clone();
        let models = tokio::task::spawn_blocking(move || {
            state
                .registry
                .list()
                .iter()
                .filter(|m| {
                    kind == pb::ModelKind::Unspecified || convert::model_kind(m.kind) == kind
                })
                .map(|m| info(&state, m))
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        let request = request.into_inner();
        let model = self
            .admin(AdminOp::Load, &request.name, request.kind)
            .await?;
        Ok(Response::new(pb::LoadModelResponse { model: Some(model) }))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let request = request.into_inner();
        let model = self
            .admin(AdminOp::Unload, &request.name, request.kind)
            .await?;
        Ok(Response::new(pb::UnloadModelResponse {
            model: Some(model),
        }))
    }

    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        let settings = &self.state.settings;
        let schedulers = (1..)
            .map_while(|v| pb::Scheduler::try_from(v).ok())
            .filter_map(|s| Some((s, scheduler_kind(s)?)))
            .map(|(s, kind)| pb::SchedulerCapability {
                scheduler: s as i32,
                supported: true,
                options: kind
                    .options()
                    .iter()
                    .map(|o| o.name().to_string())
                    .collect(),
                sigma_schedules: kind
                    .sigma_schedules()
                    .iter()
                    .map(|&spacing| convert::sigma_schedule(spacing) as i32)
                    .collect(),
            })
            .collect();
        let features = [
            ("prompt", true),
            ("prompt_2", true),
            ("negative_prompt", true),
            ("negative_prompt_2", true),
            ("guidance_scale", true),
            ("guidance_rescale", true),
            ("clip_skip", true),
            ("prompt_syntax", true),
            ("emphasis", true),
            ("micro_conditioning", true),
            ("seed", true),
            ("num_images", true),
            ("model", true),
            ("output", true),
            ("client_job_id", true),
            ("scheduler_options.sigma_schedule", true),
            ("vae", true),
            ("refiner", true),
            ("loras", true),
            ("controlnets", true),
            ("controlnets.resize_mode", true),
            ("controlnets.control_mode", true),
            ("controlnets.poses", true),
            ("output.return_control_maps", true),
            ("init_image", true),
            ("init_image.mask", true),
            ("init_image.mask_blur", true),
            ("init_image.denoising_start", true),
            ("init_image.padding_mask_crop", true),
            ("micro_conditioning.aesthetic_score", true),
            ("post_processing", true),
            ("hires", true),
            ("hires.prompt", true),
            ("hires.model", true),
            ("embeddings", true),
            ("ip_adapters", true),
            ("ip_adapters.layers", true),
            ("ip_adapters.masks", true),
            ("freeu", true),
            ("pag", true),
            ("timesteps", true),
            ("tiling", true),
            ("sigmas", true),
            ("guider", true),
            ("variation", true),
        ]
        .into_iter()
        .map(|(field, supported)| pb::FeatureSupport {
            field: field.to_string(),
            supported,
        })
        .collect();
        Ok(Response::new(pb::GetCapabilitiesResponse {
            schedulers,
            limits: Some(pb::Limits {
                max_width: settings.limits.max_width,
                max_height: settings.limits.max_height,
                max_steps: settings.limits.max_steps,
                max_num_images: settings.limits.max_num_images,
                max_request_bytes: settings.server.max_request_bytes as u64,
                max_queued_jobs: settings.jobs.max_queued as u32,
                max_prompt_chars: settings.limits.max_prompt_chars,
            }),
            preprocessors: crate::api::validate::preprocessor::IMPLEMENTED
                .iter()
                .map(|&p| p as i32)
                .collect(),
            preprocessor_support: {
                let state = self.state.clone();
                tokio::task::spawn_blocking(move || preprocessor_support(&state))
                    .await
                    .map_err(|e| self.state.status(ApiError::Internal(e.to_string())))?
            },
            device: self.state.device.clone(),
            dtype: self.state.dtype.clone(),
            device_memory_budget_bytes: settings.engine.memory_budget_bytes,
            host_memory_budget_bytes: settings.engine.host_memory_budget_bytes,
            features,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}

/// Each implemented preprocessor and whether a request naming no detector runs.
fn preprocessor_support(state: &ApiState) -> Vec<pb::PreprocessorSupport> {
    use crate::api::validate::detector::Detectors;
    use crate::api::validate::preprocessor::{domain, Parameters, IMPLEMENTED};
    let detectors = Detectors {
        registry: &state.registry,
        defaults: &state.settings.preprocessing,
    };
    IMPLEMENTED
        .iter()
        .map(|&kind| {
            let preprocessor = domain(kind, Parameters::default());
            let network = preprocessor.and_then(|p| p.network());
            let mut support = pb::PreprocessorSupport {
                preprocessor: kind as i32,
                ready: true,
                ..Default::default()
            };
            if let (Some(preprocessor), Some(network)) = (preprocessor, network) {
                let (key, name) = state.settings.preprocessing.default_detector(network);
                support.config_key = key.to_string();
                support.default_model = name.to_string();
                let installed = detectors
                    .default_for(preprocessor)
                    .and_then(|_| detectors.parts_for(preprocessor));
                if let Err(e) = installed {
                    support.ready = false;
                    support.reason = state.status(e).message().to_string();
                }
            }
            support
        })
        .collect()
}
