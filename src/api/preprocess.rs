//! The Preprocess RPC: a control map without a generation, computed on the blocking pool
//! beside the jobs, at most one per CPU core at a time.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::api::status::ApiError;
use crate::api::validate::preprocessor::preprocess_request;
use crate::api::ApiState;
use crate::output::{encode_rgb, OutputFormat};
use crate::proto::v1 as pb;

/// Turns for preprocessing: one per CPU core.
pub fn slots() -> Arc<Semaphore> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Arc::new(Semaphore::new(cores))
}

/// Checks the request, computes the control map and encodes it as PNG.
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
        let (image, preprocessor) = preprocess_request(&request, &state.settings.limits)?;
        let map = preprocessor.run(&image);
        let (width, height) = map.dimensions();
        let png = encode_rgb(map.as_raw(), width, height, OutputFormat::Png, 100, None)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(pb::PreprocessResponse {
            control_map: png,
            width,
            height,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}
