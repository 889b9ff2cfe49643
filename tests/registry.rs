//! Model names resolve only inside their roots (invariant 4): traversal, absolute paths,
//! encoded dots, NUL bytes, blank names and symlinks out of a root are refused; odd but
//! valid names work; pickle files are refused with FAILED_PRECONDITION (invariant 5);
//! single files and folders are listed with their kind and format.

mod common;

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
async fn a_pickle_checkpoint_is_refused_before_anything_is_read() {
    use common::server::TestServer;
    use sdxld::proto::v1 as pb;
    use tonic_types::StatusExt;

    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("legacy.ckpt"), b"\x80\x04 pickle").expect("write");
    let server = TestServer::start(&[(
        "SDXLD__MODELS__BASE_ROOTS",
        root.path().to_str().expect("utf-8"),
    )])
    .await;
    let mut client = server.generation().await;
    let spec = pb::GenerationSpec {
        model: "legacy".into(),
        prompt: "x".into(),
        steps: 1,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let status = client
        .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "PICKLE_NOT_LOADED"
    );
    assert!(status.message().contains("convert"), "{}", status.message());
}
