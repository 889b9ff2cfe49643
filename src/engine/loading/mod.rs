//! Reading weights from disk: diffusers folders and single-file checkpoints.

pub mod lora;
pub mod single_file;
pub mod weights;
