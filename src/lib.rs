//! sdxld: Stable Diffusion XL image generation on libtorch, with the same output as
//! diffusers for the same weights, prompt and seed.

pub mod engine;
pub mod output;
