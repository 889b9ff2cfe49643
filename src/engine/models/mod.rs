//! Model components. Module paths mirror the diffusers weight keys.

pub mod attention;
pub mod bands;
pub mod clip;
pub mod clip_vision;
pub mod control_model;
pub mod controlnet;
pub mod controlnet_file;
pub mod controlnet_union;
pub mod embeddings;
pub mod freeu;
pub mod nn;
pub mod region;
pub mod resnet;
pub mod seamless;
pub mod t2i_adapter;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod unet_config;
pub mod vae;
