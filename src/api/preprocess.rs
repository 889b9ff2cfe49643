//! The Preprocess RPC: a control map without a generation. Preprocessors without a
//! network run on the blocking pool beside the jobs, at most one per CPU core at a
//! time; those that run one are jobs on the engine (their detector cached under the
//! budget), queued like any other.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::api::status::ApiError;
use crate::api::validate::detector::Detectors;
use crate::api::validate::poses::poses_request;
use crate::api::validate::preprocessor::{domain, preprocess_request, Parameters};
use crate::api::validate::Context;
use crate::api::ApiState;
use crate::engine::preprocess::Networks;
use crate::jobs::{ConditioningImage, JobError, JobWork, PreprocessSpec};
use crate::output::{encode_rgb, OutputFormat};
use crate::proto::v1 as pb;

/// Turns for preprocessing: one per CPU core.
pub fn slots() -> Arc<Semaphore> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Arc::new(Semaphore::new(cores))
}

/// Whether `request` runs a network (and so is a job on the engine): its preprocessor
/// does, on an image (poses are drawn without one).
pub fn runs_network(request: &pb::PreprocessRequest) -> bool {
    request.poses.is_none() && preprocessor_runs_network(request.preprocessor)
}

/// Whether the wire preprocessor `kind` runs a network.
fn preprocessor_runs_network(kind: i32) -> bool {
    pb::Preprocessor::try_from(kind)
        .ok()
        .and_then(|kind| domain(kind, Parameters::default()))
        .and_then(|p| p.network())
        .is_some()
}

/// The job of a request whose preprocessor runs a network.
pub fn preprocess_job(request: pb::PreprocessRequest, ctx: &Context) -> Result<JobWork, ApiError> {
    let detectors = Detectors {
        registry: ctx.registry,
        defaults: ctx.preprocessing,
    };
    let (image, checked) = preprocess_request(&request, ctx.limits, detectors)?;
    let detector = checked
        .detector
        .ok_or_else(|| ApiError::Internal("a network preprocessor without its detector".into()))?;
    Ok(JobWork::Preprocess(Box::new(PreprocessSpec {
        image: ConditioningImage(Arc::new(image)),
        preprocessing: checked.preprocessing,
        detector,
        face_detector: checked.face_detector,
        hand_detector: checked.hand_detector,
    })))
}

/// Checks a request whose preprocessor runs no network (or that draws poses), computes
/// its control map on the blocking pool and encodes it as PNG.
pub async fn preprocess(
    state: Arc<ApiState>,
    request: pb::PreprocessRequest,
) -> Result<pb::PreprocessResponse, ApiError> {
    let _turn = state
        .preprocess_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let map = match &request.poses {
            Some(poses) => {
                let (poses, parts) = poses_request(&request, poses, &state.settings.limits)?;
                poses.draw(parts)
            }
            None => {
                let detectors = Detectors {
                    registry: &state.registry,
                    defaults: &state.settings.preprocessing,
                };
                let limits = &state.settings.limits;
                let (image, checked) = preprocess_request(&request, limits, detectors)?;
                checked
                    .preprocessing
                    .run(&image, Networks::default())
                    .map_err(|e| ApiError::Job(JobError::Engine(e)))?
            }
        };
        let (width, height) = map.dimensions();
        let png = encode_rgb(map.as_raw(), width, height, OutputFormat::Png, 100, None)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(pb::PreprocessResponse {
            control_map: png,
            width,
            height,
            poses: None,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}
