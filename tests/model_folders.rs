//! Model folders as users keep them, over the wire: a Hugging Face hub cache serves its
//! models by repository name; symlinks are followed only while they stay inside the
//! model roots; special files never hold a request or the engine; configs no model
//! could have are refused naming their file and key.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::server::{quick_spec, TestServer};
use sdxld::proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic_types::StatusExt;

/// The demo model written to `dir`.
fn demo_model(dir: &Path) {
    common::cli::sdxld("demo-model")
        .flag("--output", dir)
        .succeeds();
}

/// Every regular file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).expect("read_dir").flatten() {
            if entry.file_type().expect("type").is_dir() {
                stack.push(entry.path());
            } else {
                files.push(entry.path().strip_prefix(dir).expect("under").to_path_buf());
            }
        }
    }
    files
}

/// Lays `model` out in the hub cache `hub` as huggingface_hub does: content-named blobs,
/// a snapshot of relative symlinks to them, and `refs/main` naming the snapshot.
fn hub_cache(model: &Path, hub: &Path, repo: &str) {
    let folder = hub.join(format!("models--{}", repo.replace('/', "--")));
    let revision = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = folder.join("snapshots").join(revision);
    std::fs::create_dir_all(folder.join("blobs")).expect("mkdir");
    std::fs::create_dir_all(folder.join("refs")).expect("mkdir");
    std::fs::write(folder.join("refs/main"), revision).expect("write");
    for relative in files_under(model) {
        let bytes = std::fs::read(model.join(&relative)).expect("read");
        let blob = format!("{:x}", Sha256::digest(&bytes));
        std::fs::write(folder.join("blobs").join(&blob), &bytes).expect("write");
        let link = snapshot.join(&relative);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        let up = "../".repeat(relative.components().count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{blob}"), &link).expect("symlink");
    }
}

fn root_env(key: &'static str, root: &Path) -> (&'static str, String) {
    (key, root.to_str().expect("utf-8").to_string())
}

async fn start(env: &[(&'static str, String)]) -> TestServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start(&env).await
}

/// The named model's image for `spec`, and the content hash the job reports for it.
async fn image_and_hash(server: &TestServer, model: &str) -> (tch::Tensor, String) {
    let mut spec = quick_spec(4);
    spec.model = model.into();
    let response = server.images(spec).await.expect("generated");
    let image = common::decoded_image(&response.images[0].data);
    let completed = response.completed.expect("completed");
    let usage = completed
        .models
        .iter()
        .find(|m| m.kind == pb::ModelKind::Base as i32)
        .expect("the base model's usage");
    (image, usage.sha256.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hugging_face_hub_cache_serves_its_models_by_repository_name() {
    let plain = tempfile::tempdir().expect("tempdir");
    let hub = tempfile::tempdir().expect("tempdir");
    demo_model(&plain.path().join("tiny"));
    hub_cache(&plain.path().join("tiny"), hub.path(), "acme/tiny-sdxl");
    // Base roots take a list: a plain root and the hub cache.
    let roots = format!("{},{}", plain.path().display(), hub.path().display());
    let server = start(&[
        ("SDXLD__MODELS__BASE_ROOTS", roots),
        root_env("SDXLD__MODELS__VAE_ROOTS", hub.path()),
    ])
    .await;
    let listed = server.list_models(pb::ModelKind::Unspecified).await;
    let size = |name: &str| {
        listed
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} not listed: {listed:?}"))
            .size_bytes
    };
    // Sized by the files the links lead to, not by the links.
    assert!(size("tiny") > 10_000, "{listed:?}");
    assert_eq!(size("acme/tiny-sdxl"), size("tiny"));
    assert_eq!(size("acme/tiny-sdxl/vae"), {
        let vae = plain.path().join("tiny/vae");
        files_under(&vae)
            .iter()
            .map(|f| std::fs::metadata(vae.join(f)).expect("meta").len())
            .sum::<u64>()
    });
    // The same model either way: the same image and the same content hash.
    let (plain_image, plain_hash) = image_and_hash(&server, "tiny").await;
    let (hub_image, hub_hash) = image_and_hash(&server, "acme/tiny-sdxl").await;
    assert_eq!(plain_image, hub_image);
    assert_eq!(plain_hash.len(), 64);
    assert_eq!(plain_hash, hub_hash);
    assert_ne!(
        plain_hash,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    // A VAE inside a repository, by its path in the repository.
    let mut spec = quick_spec(4);
    spec.model = "acme/tiny-sdxl".into();
    spec.vae = "acme/tiny-sdxl/vae".into();
    let response = server.images(spec).await.expect("generated");
    assert_eq!(common::decoded_image(&response.images[0].data), hub_image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_are_followed_only_while_they_stay_inside_the_roots() {
    let base = tempfile::tempdir().expect("tempdir");
    let vaes = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    // A model whose VAE is shared from the VAE root: followed.
    demo_model(&base.path().join("shared"));
    let vae = base.path().join("shared/vae");
    std::fs::rename(&vae, vaes.path().join("house")).expect("move");
    std::os::unix::fs::symlink(vaes.path().join("house"), &vae).expect("symlink");
    // A model whose UNet weights lead outside every root: refused.
    demo_model(&base.path().join("leaky"));
    let weights = base
        .path()
        .join("leaky/unet/diffusion_pytorch_model.safetensors");
    std::fs::rename(&weights, outside.path().join("w.safetensors")).expect("move");
    std::os::unix::fs::symlink(outside.path().join("w.safetensors"), &weights).expect("symlink");
    let server = start(&[
        root_env("SDXLD__MODELS__BASE_ROOTS", base.path()),
        root_env("SDXLD__MODELS__VAE_ROOTS", vaes.path()),
    ])
    .await;
    let mut spec = quick_spec(1);
    spec.model = "shared".into();
    server
        .images(spec)
        .await
        .expect("a model of links inside the roots");
    let mut spec = quick_spec(1);
    spec.model = "leaky".into();
    let status = server.images(spec).await.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "MODEL_OUTSIDE_ROOTS");
    assert!(
        status
            .message()
            .contains("unet/diffusion_pytorch_model.safetensors"),
        "{status:?}"
    );
    assert!(!status
        .message()
        .contains(outside.path().to_str().expect("utf-8")));
    let listed = server.list_models(pb::ModelKind::Base).await;
    assert!(listed.iter().any(|m| m.name == "shared"), "{listed:?}");
    assert!(!listed.iter().any(|m| m.name == "leaky"), "{listed:?}");
}

/// Replaces `path` with a FIFO.
fn fifo(path: &Path) {
    std::fs::remove_file(path).expect("rm");
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files_in_a_model_folder_hold_up_no_request() {
    let root = tempfile::tempdir().expect("tempdir");
    for name in ["unet_fifo", "tokenizer_fifo"] {
        demo_model(&root.path().join(name));
    }
    fifo(&root.path().join("unet_fifo/unet/config.json"));
    fifo(
        &root
            .path()
            .join("tokenizer_fifo/tokenizer/tokenizer_config.json"),
    );
    let server = start(&[root_env("SDXLD__MODELS__BASE_ROOTS", root.path())]).await;
    let limit = Duration::from_secs(30);
    // Several requests for each, at once, with health checks and a listing beside them.
    let client = server.generation().await;
    let mut calls = Vec::new();
    for model in ["unet_fifo", "tokenizer_fifo", "unet_fifo", "tokenizer_fifo"] {
        let mut spec = quick_spec(2);
        spec.model = model.into();
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let request = pb::GenerateImagesRequest { spec: Some(spec) };
            let answer = tokio::time::timeout(limit, client.generate_images(request)).await;
            (
                model,
                answer
                    .expect("answered in time")
                    .expect_err("a FIFO is no config"),
            )
        }));
    }
    let (listed, health) = tokio::join!(
        tokio::time::timeout(limit, server.list_models(pb::ModelKind::Base)),
        tokio::time::timeout(limit, server.health("")),
    );
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("joined"));
    }
    for (model, status) in answers {
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{model}: {status:?}"
        );
        assert!(
            status.message().contains("not a regular file (a FIFO)"),
            "{model}: {status:?}"
        );
    }
    listed.expect("listed in time");
    health.expect("healthy in time");
    // The engine is free: the next job runs.
    tokio::time::timeout(limit, server.images(quick_spec(3)))
        .await
        .expect("in time")
        .expect("generated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_configs_are_refused_naming_their_file_and_key() {
    let root = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "heads",
            "text_encoder/config.json",
            "num_attention_heads",
            0,
        ),
        (
            "timesteps",
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            0,
        ),
        ("groups", "vae/config.json", "norm_num_groups", 7),
        ("unet_heads", "unet/config.json", "attention_head_dim", -2),
    ];
    for (name, file, key, value) in cases {
        demo_model(&root.path().join(name));
        common::set_config(&root.path().join(name).join(file), key, value.into());
    }
    let server = start(&[root_env("SDXLD__MODELS__BASE_ROOTS", root.path())]).await;
    for (name, file, key, _) in cases {
        for _ in 0..2 {
            let mut spec = quick_spec(5);
            spec.model = name.into();
            let status = server.images(spec).await.expect_err("refused");
            assert_eq!(
                status.code(),
                Code::FailedPrecondition,
                "{name}: {status:?}"
            );
            let message = status.message();
            assert!(message.contains(&format!("{name}/{file}")), "{message}");
            assert!(message.contains(&format!("`{key}`")), "{message}");
        }
    }
    server
        .images(quick_spec(6))
        .await
        .expect("the default model still serves");
}
