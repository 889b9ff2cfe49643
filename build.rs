//! Links the binary against libtorch's CUDA library and records an rpath to torch/lib.
//!
//! tch's own link flags do not reach a binary crate, and `--as-needed` would drop
//! libtorch_cuda (nothing references it by symbol), leaving a binary that can never
//! see a GPU. The rpath lets the binary start without LD_LIBRARY_PATH.

use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".to_string());
    let output = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    // Resolve links (a checkout's .venv) so the rpath names the real installation.
    let dir = PathBuf::from(dir.trim());
    Some(std::fs::canonicalize(&dir).unwrap_or(dir))
}

/// Compiles proto/ with protox (no system protoc), generates the tonic services and writes
/// the encoded descriptor set for reflection and JSON.
fn compile_protos() {
    println!("cargo:rerun-if-changed=proto");
    let files = ["sdxld/v1/generation.proto", "sdxld/v1/models.proto"];
    let fds = match protox::compile(files, ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("proto/ does not compile: {e}"),
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let descriptor_path = out_dir.join("sdxld_descriptor.bin");
    {
        use prost::Message;
        std::fs::write(&descriptor_path, fds.encode_to_vec()).expect("write the descriptor set");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("generate the gRPC code");
}

/// Copies CLIP's BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, from the open_clip_torch
/// package the setup installs) into OUT_DIR, to be embedded: single-file checkpoints
/// carry no tokenizer files. An empty file when the package is absent (the loader then
/// says so).
fn embed_clip_vocabulary() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".to_string());
    let found = Command::new(python)
        .args([
            "-c",
            "import importlib.util, os; s = importlib.util.find_spec('open_clip'); \
             print(os.path.join(s.submodule_search_locations[0], 'bpe_simple_vocab_16e6.txt.gz'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|p| PathBuf::from(p.trim()))
        .filter(|p| p.is_file());
    let bytes = match &found {
        Some(path) => {
            println!("cargo:rerun-if-changed={}", path.display());
            std::fs::read(path).expect("read the CLIP vocabulary")
        }
        None => {
            println!("cargo:warning=open_clip's CLIP vocabulary not found: single-file checkpoints will not load");
            Vec::new()
        }
    };
    std::fs::write(out_dir.join("clip_bpe_vocab.txt.gz"), bytes).expect("write the vocabulary");
}

/// Compiles the CUDA shim (csrc/: the allocator's statistics, timing events, graphs, the
/// attention backends' order) against the headers of the torch wheel (libtorch's and the
/// CUDA runtime's, both in the virtual environment). Without them the shim is left out and
/// its Rust side reports nothing.
fn compile_cuda_shim(lib_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc");
    let Some(torch_dir) = lib_dir.parent() else {
        return;
    };
    let include = torch_dir.join("include");
    // A complete set of CUDA runtime headers next to torch/: triton's (a dependency of the
    // CUDA wheel), or the nvidia packages'.
    let cuda_include = torch_dir.parent().and_then(|site| {
        [
            "triton/backends/nvidia/include",
            "nvidia/cu13/include",
            "nvidia/cuda_runtime/include",
        ]
        .iter()
        .map(|p| site.join(p))
        .find(|p| p.join("cuda_runtime.h").is_file() && p.join("crt/host_config.h").is_file())
    });
    let (true, Some(cuda_include)) = (
        include.join("c10/cuda/CUDACachingAllocator.h").is_file(),
        cuda_include,
    ) else {
        println!("cargo:warning=CUDA headers not found: built without GPU memory statistics");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_memory.cpp")
        .file("csrc/cuda_events.cpp")
        .file("csrc/cuda_graphs.cpp")
        .file("csrc/attention.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(cuda_include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("sdxld_cuda_memory");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=sdxld_cuda_shim");
}

/// Compiles the CPU shim (csrc/cpu_generator.cpp: the default CPU generator's state),
/// which seed variations need, against the torch wheel's headers.
fn compile_cpu_shim(lib_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/cpu_generator.cpp");
    let include = lib_dir
        .parent()
        .map(|torch| torch.join("include"))
        .filter(|include| include.join("ATen/core/Generator.h").is_file())
        .expect("the torch wheel's C++ headers (torch/include), which tch builds against too");
    cc::Build::new()
        .cpp(true)
        .file("csrc/cpu_generator.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("sdxld_cpu");
}

fn main() {
    compile_protos();
    embed_clip_vocabulary();
    println!("cargo:rustc-check-cfg=cfg(sdxld_cuda_shim)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let Some(lib_dir) = torch_lib_dir() else {
        println!("cargo:warning=torch not found: the binary will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    compile_cpu_shim(&lib_dir);
    compile_cuda_shim(&lib_dir);
}
