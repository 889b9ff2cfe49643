//! The engine: models, schedulers and pipelines on libtorch. Everything here blocks;
//! callers on async runtimes run it on a dedicated thread.

pub mod cache;
pub mod codec;
pub mod components;
pub mod config_check;
pub mod control;
pub mod demo;
pub mod device;
pub mod error;
pub mod files;
pub mod hashes;
pub mod hires;
pub mod loading;
pub mod lora;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod pixels;
pub mod preprocess;
pub mod profile;
pub mod refiner;
pub mod registry;
pub mod request;
pub mod resample;
pub mod schedulers;
pub mod upscale;
pub mod weights;
