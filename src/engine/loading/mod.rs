//! Weight formats beyond a diffusers folder: single-file checkpoints (their key layout
//! and configs), LoRA files (kohya-ss and diffusers/PEFT) and Control-LoRAs (ControlNets
//! stored against their base UNet).

pub mod control_lora;
pub mod lora;
pub mod single_file;
