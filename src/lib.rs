//! sdxld: Stable Diffusion XL image generation on libtorch, with the same output as
//! diffusers for the same weights, prompt and seed, served over gRPC.
//!
//! Layers, data flowing one way: [`api`] (tonic services, validation, status mapping) ->
//! [`jobs`] (admission, queue, cancellation, events) -> [`engine`] (models, schedulers,
//! pipelines on the device).

pub mod api;
pub mod config;
pub mod convert;
pub mod engine;
pub mod jobs;
pub mod output;
pub mod proto;
pub mod server;
pub mod telemetry;
