//! Weight formats beyond a diffusers folder: single-file checkpoints (their key layout
//! and configs) and LoRA files (kohya-ss and diffusers/PEFT).

pub mod lora;
pub mod single_file;
