//! The fixture folders the scripts under `tests/fixtures` write, each built when missing
//! (or taken from the environment variable `scripts/test` sets).

use std::path::PathBuf;
use std::process::Command;

use super::repo;

/// `pub fn $name() -> PathBuf`: the folder `$script` writes, found once per process.
macro_rules! fixture_dir {
    ($($name:ident: $script:literal, $env:literal;)*) => {$(
        #[doc = concat!("The fixture folder written by `tests/fixtures/", $script, "`.")]
        pub fn $name() -> PathBuf {
            static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            DIR.get_or_init(|| built_by($script, $env)).clone()
        }
    )*};
}

fixture_dir! {
    fixtures: "make_fixtures.py", "SDXLD_FIXTURES";
    preprocess_fixtures: "make_preprocess_fixtures.py", "SDXLD_PREPROCESS_FIXTURES";
    controlnet_fixtures: "make_controlnet_fixtures.py", "SDXLD_CONTROLNET_FIXTURES";
    single_file_fixtures: "make_single_file_fixtures.py", "SDXLD_SINGLE_FILE_FIXTURES";
    upscaler_fixtures: "make_upscaler_fixtures.py", "SDXLD_UPSCALER_FIXTURES";
    detector_fixtures: "make_detector_fixtures.py", "SDXLD_DETECTOR_FIXTURES";
    hires_fixtures: "make_hires_fixtures.py", "SDXLD_HIRES_FIXTURES";
    embedding_fixtures: "make_embedding_fixtures.py", "SDXLD_EMBEDDING_FIXTURES";
    ip_adapter_fixtures: "make_ip_adapter_fixtures.py", "SDXLD_IP_ADAPTER_FIXTURES";
    freeu_fixtures: "make_freeu_fixtures.py", "SDXLD_FREEU_FIXTURES";
    masked_area_fixtures: "make_masked_area_fixtures.py", "SDXLD_MASKED_AREA_FIXTURES";
    ip_mask_fixtures: "make_ip_mask_fixtures.py", "SDXLD_IP_MASK_FIXTURES";
    t2i_adapter_fixtures: "make_t2i_adapter_fixtures.py", "SDXLD_T2I_ADAPTER_FIXTURES";
    schedule_fixtures: "make_schedule_fixtures.py", "SDXLD_SCHEDULE_FIXTURES";
    guider_fixtures: "make_guider_fixtures.py", "SDXLD_GUIDER_FIXTURES";
    tiling_fixtures: "make_tiling_fixtures.py", "SDXLD_TILING_FIXTURES";
    micro_fixtures: "make_micro_fixtures.py", "SDXLD_MICRO_FIXTURES";
    pag_fixtures: "make_pag_fixtures.py", "SDXLD_PAG_FIXTURES";
    prompt_syntax_fixtures: "make_prompt_syntax_fixtures.py", "SDXLD_PROMPT_SYNTAX_FIXTURES";
    zoe_fixtures: "make_zoe_fixtures.py", "SDXLD_ZOE_FIXTURES";
    leres_fixtures: "make_leres_fixtures.py", "SDXLD_LERES_FIXTURES";
    a1111_prompt_fixtures: "make_a1111_prompt_fixtures.py", "SDXLD_A1111_PROMPT_FIXTURES";
    variation_fixtures: "make_variation_fixtures.py", "SDXLD_VARIATION_FIXTURES";
}

/// The folder `$env` names, else the one the fixture script `script` prints.
fn built_by(script: &str, env: &str) -> PathBuf {
    if let Ok(dir) = std::env::var(env) {
        return PathBuf::from(dir);
    }
    let python = repo().join(".venv/bin/python");
    let output = Command::new(&python)
        .arg(repo().join("tests/fixtures").join(script))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run scripts/test)", python.display()));
    assert!(
        output.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}
