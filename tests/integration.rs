//! The integration tests, one module per area, built as one test binary: linking the
//! library and libtorch into one executable instead of one per area saves minutes of
//! every build, and one pool of test threads runs every area's tests side by side.
//! `cargo test --release --test integration lora::` runs one area's tests.

mod common;

mod a1111_composable;
mod a1111_networks;
mod a1111_prompts;
mod anyline;
mod bad_models;
mod bad_requests;
mod cache;
mod cli;
mod control_lora;
mod control_lora_service;
mod controlnet;
mod controlnet_pipeline;
mod controlnet_refusals;
mod controlnet_service;
mod convert;
mod custom_sigmas;
mod depth;
mod detector_refusals;
mod detector_service;
mod detectors;
mod embeddings;
mod freeu;
mod fuzz;
mod guider;
mod hardening;
mod hires;
mod hires_model;
mod hires_prompts;
mod hires_refusals;
mod img2img;
mod inpaint;
mod ip_adapter;
mod ip_adapter_service;
mod ip_masks;
mod layout;
mod leres;
mod leres_service;
mod lora;
mod masked_area;
mod micro_conditioning;
mod mlsd;
mod model_folders;
mod non_finite_fields;
mod pag;
mod parity;
mod pidinet;
mod pixel_perfect;
mod pose_faces;
mod pose_hands;
mod pose_parts_service;
mod pose_render;
mod preprocess;
mod preprocess_service;
mod prompt_syntax;
mod recolor;
mod refiner;
mod refused_schedules;
mod registry;
mod schedulers;
mod scribble_xdog;
mod security;
mod segment;
mod service;
mod single_file;
mod t2i_adapter;
mod teed;
mod telemetry;
mod tiling;
mod timesteps;
mod tokenizer;
mod upscale;
mod upscale_refusals;
mod upscale_service;
mod vae;
mod variation;
mod zoe_depth;

/// Every file beside this one is one of its modules: with `autotests = false` a test file
/// left out here would never run.
#[test]
fn every_test_file_is_a_module_of_the_integration_binary() {
    let named = include_str!("integration.rs");
    let dir = common::repo().join("tests");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/") {
        let path = entry.expect("an entry of tests/").path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if path.extension().is_some_and(|e| e == "rs") && stem != "integration" {
            let line = format!("\nmod {stem};\n");
            assert!(
                named.contains(&line),
                "tests/{stem}.rs is not a module here"
            );
            seen += 1;
        }
    }
    assert!(seen > 60, "only {seen} test files");
}
