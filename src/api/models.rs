//! `sdxld.v1.ModelService`: what the model roots hold and what the server can do.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::status::ApiError;
use crate::api::validate::{scheduler_options, scheduler_supported, sigma_schedules};
use crate::api::ApiState;
use crate::engine::registry::{ModelEntry, ModelFormat, ModelKind, RegistryError};
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

    /// Load and unload: the name is checked (INVALID_ARGUMENT, NOT_FOUND), then the
    /// operation is UNIMPLEMENTED until the model cache exists.
    fn not_before_cache(&self, name: &str, why: &str) -> Status {
        let error = match self.state.registry.resolve(name) {
            Err(RegistryError::InvalidName { reason, .. }) => ApiError::invalid(
                "name",
                &format!("`name` is not a valid model name ({reason})"),
            ),
            Err(RegistryError::NotFound(n)) => ApiError::ModelNotFound(n),
            Err(RegistryError::Pickle { name, file }) => ApiError::PickleModel { name, file },
            Ok(_) => ApiError::Unimplemented("name".into(), why.into()),
        };
        error.into_status(Default::default())
    }

    fn info(&self, model: &ModelEntry) -> pb::ModelInfo {
        let resident = self
            .state
            .resident
            .lock()
            .map(|r| r.contains(&model.path))
            .unwrap_or(false);
        pb::ModelInfo {
            name: model.name.clone(),
            kind: kind_pb(model.kind) as i32,
            format: match model.format {
                ModelFormat::Diffusers => pb::ModelFormat::Diffusers,
                ModelFormat::SingleFile => pb::ModelFormat::Safetensors,
            } as i32,
            size_bytes: model.size_bytes,
            sha256: self.state.registry.sha256(model),
            resident,
            is_default: model.kind == ModelKind::Base
                && model.name == self.state.registry.default_model().name,
        }
    }
}

fn kind_pb(kind: ModelKind) -> pb::ModelKind {
    match kind {
        ModelKind::Base => pb::ModelKind::Base,
        ModelKind::Refiner => pb::ModelKind::Refiner,
        ModelKind::Vae => pb::ModelKind::Vae,
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
        let registry = self.state.registry.clone();
        let list = tokio::task::spawn_blocking(move || registry.list())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let models = list
            .iter()
            .filter(|m| kind == pb::ModelKind::Unspecified || kind_pb(m.kind) == kind)
            .map(|m| self.info(m))
            .collect();
        self.state
            .metrics
            .rpc_finished("ListModels", tonic::Code::Ok);
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        Err(self.not_before_cache(
            &request.into_inner().name,
            "explicit loading comes with the model cache; models load on first use",
        ))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        Err(self.not_before_cache(
            &request.into_inner().name,
            "unloading comes with the model cache and its memory budget",
        ))
    }

    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        let settings = &self.state.settings;
        let schedulers = (1..=10)
            .filter_map(|v| pb::Scheduler::try_from(v).ok())
            .map(|s| pb::SchedulerCapability {
                scheduler: s as i32,
                supported: scheduler_supported(s),
                options: scheduler_options(s),
                sigma_schedules: sigma_schedules(s).into_iter().map(|v| v as i32).collect(),
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
            ("micro_conditioning", true),
            ("seed", true),
            ("num_images", true),
            ("model", true),
            ("output", true),
            ("client_job_id", true),
            ("scheduler_options.sigma_schedule", true),
            ("vae", true),
            ("refiner", true),
            ("loras", false),
            ("controlnets", false),
            ("init_image", true),
            ("init_image.mask", true),
            ("init_image.mask_blur", false),
            ("init_image.denoising_start", true),
            ("micro_conditioning.aesthetic_score", true),
            ("post_processing", false),
        ]
        .into_iter()
        .map(|(field, supported)| pb::FeatureSupport {
            field: field.to_string(),
            supported,
        })
        .collect();
        self.state
            .metrics
            .rpc_finished("GetCapabilities", tonic::Code::Ok);
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
            device: self.state.device.clone(),
            dtype: self.state.dtype.clone(),
            device_memory_budget_bytes: 0,
            host_memory_budget_bytes: 0,
            features,
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}
