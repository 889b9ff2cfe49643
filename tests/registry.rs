//! Model names resolve only inside their roots (invariant 4): traversal, absolute paths,
//! encoded dots, NUL bytes, blank names and symlinks out of a root are refused; odd but
//! valid names work; pickle files are refused with FAILED_PRECONDITION (invariant 5);
//! single files and folders are listed with their kind and format.

use crate::common;

use std::path::Path;

use common::fixtures;
use sdxld::engine::registry::{
    ModelEntry, ModelFormat, ModelKind, ModelRoots, Registry, RegistryError,
};

fn registry(base: &Path, refiner: &Path) -> Registry {
    let default = ModelEntry::from_folder("default", &fixtures().join("tiny2/pipeline"))
        .expect("fixture pipeline");
    Registry::new(
        ModelRoots {
            base: vec![base.to_path_buf()],
            refiner: vec![refiner.to_path_buf()],
            lora: vec![base.join("loras")],
            ..ModelRoots::default()
        },
        default,
    )
}

#[test]
fn names_resolve_only_inside_their_roots() {
    let roots = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let base = roots.path().join("base");
    let refiner = roots.path().join("refiner");
    std::fs::create_dir_all(base.join("styles")).expect("mkdir");
    std::fs::create_dir_all(&refiner).expect("mkdir");
    let checkpoint = fixtures().join("tiny2/single_file/tiny2-single.safetensors");
    for name in ["..my_model", "model..1", "styles/anime"] {
        std::fs::copy(&checkpoint, base.join(format!("{name}.safetensors"))).expect("copy");
    }
    // A checkpoint outside the root, reachable only through a symlink inside it.
    std::fs::copy(&checkpoint, outside.path().join("secret.safetensors")).expect("copy");
    std::os::unix::fs::symlink(
        outside.path().join("secret.safetensors"),
        base.join("escape.safetensors"),
    )
    .expect("symlink");
    std::os::unix::fs::symlink(fixtures().join("tiny2/pipeline"), base.join("linked"))
        .expect("symlink");
    std::fs::write(base.join("old.ckpt"), b"not read").expect("write");
    std::fs::create_dir_all(base.join("loras/styles")).expect("mkdir");
    std::fs::write(base.join("loras/styles/ink.safetensors"), b"").expect("write");
    std::os::unix::fs::symlink(fixtures().join("tiny2/refiner"), refiner.join("r"))
        .expect("symlink");
    let registry = registry(&base, &refiner);

    for good in ["..my_model", "model..1", "styles/anime"] {
        let entry = registry
            .resolve(good)
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(entry.format, ModelFormat::SingleFile);
        assert!(entry
            .path
            .starts_with(base.canonicalize().expect("canonical")));
    }
    for bad in [
        "../x",
        "..",
        "/etc/passwd",
        "%2e%2e/x",
        "a\0b",
        "  ",
        "a/../../b",
        "./a",
    ] {
        assert!(
            matches!(
                registry.resolve(bad),
                Err(RegistryError::InvalidName { .. })
            ),
            "{bad:?} accepted"
        );
    }
    for absent in ["escape", "linked", "nothing", "secret"] {
        assert!(
            matches!(registry.resolve(absent), Err(RegistryError::NotFound(_))),
            "{absent:?} resolved"
        );
    }
    assert!(matches!(
        registry.resolve("old"),
        Err(RegistryError::Pickle { .. })
    ));
    // Kinds have their own roots: the refiner root's symlink leads outside it too.
    assert!(registry.resolve_kind(ModelKind::Refiner, "r").is_err());
    assert!(registry.resolve_kind(ModelKind::Base, "r").is_err());

    let listed: Vec<(ModelKind, String)> = registry
        .list()
        .into_iter()
        .map(|m| (m.kind, m.name))
        .collect();
    for name in ["..my_model", "model..1", "styles/anime", "default"] {
        assert!(
            listed.contains(&(ModelKind::Base, name.to_string())),
            "{name} not listed: {listed:?}"
        );
    }
    assert!(!listed
        .iter()
        .any(|(_, n)| n == "escape" || n == "linked" || n == "old"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickle_files_of_every_kind_are_refused_before_anything_is_read() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;
    use tonic_types::StatusExt;

    let root = tempfile::tempdir().expect("tempdir");
    let mut env = Vec::new();
    for (kind, file) in [
        ("base", "legacy.ckpt"),
        ("lora", "legacy_lora.pt"),
        ("vae", "legacy_vae.pth"),
        ("refiner", "legacy_refiner.bin"),
    ] {
        let dir = root.path().join(kind);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(file), b"\x80\x04 pickle").expect("write");
        let key = format!("SDXLD__MODELS__{}_ROOTS", kind.to_uppercase());
        env.push((key, dir.to_str().expect("utf-8").to_string()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = TestServer::start(&env).await;
    let mut client = server.generation().await;
    let quick = pb::GenerationSpec {
        prompt: "x".into(),
        steps: 1,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let cases = [
        (
            "legacy",
            pb::GenerationSpec {
                model: "legacy".into(),
                ..quick.clone()
            },
        ),
        (
            "legacy_lora",
            pb::GenerationSpec {
                loras: vec![pb::LoraAdapter {
                    name: "legacy_lora".into(),
                    weight: Some(0.5),
                    text_encoder_weight: None,
                }],
                ..quick.clone()
            },
        ),
        (
            "legacy_vae",
            pb::GenerationSpec {
                vae: "legacy_vae".into(),
                ..quick.clone()
            },
        ),
        (
            "legacy_refiner",
            pb::GenerationSpec {
                refiner: Some(pb::RefinerStage {
                    model: "legacy_refiner".into(),
                    mode: pb::RefinerMode::EnsembleOfExperts as i32,
                    ..Default::default()
                }),
                ..quick.clone()
            },
        ),
    ];
    for (name, spec) in cases {
        let status = client
            .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
            .await
            .expect_err(name);
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{name}: {status:?}"
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "PICKLE_NOT_LOADED", "{name}");
        assert_eq!(info.metadata["model"], name);
        assert!(
            status.message().contains("sdxld convert"),
            "{name}: {}",
            status.message()
        );
    }
    // The server keeps serving.
    client
        .generate_images(pb::GenerateImagesRequest { spec: Some(quick) })
        .await
        .expect("still serving");
}
