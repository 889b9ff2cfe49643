//! Model roots laid out as a Hugging Face hub cache (`huggingface_hub`'s
//! `models--{org}--{repo}/snapshots/{revision}/`, with `refs/main` naming the revision):
//! the name `org/repo` is the snapshot `refs/main` names, and `org/repo/sub/path` a
//! folder or file inside it, so that models downloaded for diffusers are served as they
//! lie.

use std::path::{Path, PathBuf};

use crate::engine::files::read_text;

/// The prefix of a model repository's folder in a hub cache.
const REPO_PREFIX: &str = "models--";

/// The folder or file in the hub cache `root` that `name` ("org/repo[/sub/path]") names,
/// if `root` holds that repository. The path is not yet checked to stay in the root.
pub fn resolve(root: &Path, name: &str) -> Option<PathBuf> {
    let mut parts = name.splitn(3, '/');
    let (org, repo) = (parts.next()?, parts.next()?);
    let snapshot = snapshot(&root.join(repo_folder(org, repo)))?;
    Some(match parts.next() {
        Some(rest) => snapshot.join(rest),
        None => snapshot,
    })
}

fn repo_folder(org: &str, repo: &str) -> String {
    format!("{REPO_PREFIX}{org}--{repo}")
}

/// `org/repo` of a repository folder's name (`models--org--repo`).
pub fn repo_name(folder: &str) -> Option<String> {
    let (org, repo) = folder.strip_prefix(REPO_PREFIX)?.split_once("--")?;
    (!org.is_empty() && !repo.is_empty()).then(|| format!("{org}/{repo}"))
}

/// The snapshot of a repository folder: the revision `refs/main` names, else the only
/// snapshot there is.
pub fn snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(text) = read_text(&repo.join("refs").join("main")) {
        let revision = text.trim();
        let plain = !revision.is_empty()
            && revision.len() <= 128
            && revision
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        return plain
            .then(|| snapshots.join(revision))
            .filter(|p| p.is_dir());
    }
    let mut only = std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir());
    let first = only.next()?;
    only.next().is_none().then(|| first.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_the_snapshot_refs_main_names() {
        let root = tempfile::tempdir().expect("tempdir");
        let repo = root.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc123/vae")).expect("mkdir");
        std::fs::create_dir_all(repo.join("snapshots/def456")).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), "abc123\n").expect("write");
        let snapshot = repo.join("snapshots/abc123");
        assert_eq!(resolve(root.path(), "org/name"), Some(snapshot.clone()));
        assert_eq!(
            resolve(root.path(), "org/name/vae"),
            Some(snapshot.join("vae"))
        );
        assert_eq!(resolve(root.path(), "org"), None);
        assert_eq!(resolve(root.path(), "org/other"), None);
        assert_eq!(repo_name("models--org--name").as_deref(), Some("org/name"));
        assert_eq!(repo_name("datasets--org--name"), None);
        // A revision that is no plain name is not followed.
        std::fs::write(repo.join("refs/main"), "../../x").expect("write");
        assert_eq!(resolve(root.path(), "org/name"), None);
        // Without refs/main, the only snapshot.
        std::fs::remove_file(repo.join("refs/main")).expect("rm");
        assert_eq!(resolve(root.path(), "org/name"), None);
        std::fs::remove_dir_all(repo.join("snapshots/def456")).expect("rm");
        assert_eq!(resolve(root.path(), "org/name"), Some(snapshot));
    }
}
