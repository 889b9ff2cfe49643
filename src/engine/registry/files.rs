//! The files of a model folder, walked as the model is read: through symlinks, so that
//! folders of links (the Hugging Face hub cache's snapshots) have their real sizes and
//! hashes, but never to a place outside the model roots.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Deepest folder nesting walked inside a model.
const MAX_DEPTH: usize = 16;

/// A file of a model that leads outside every model root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escape {
    /// The file or folder, relative to the model.
    pub file: String,
}

/// A regular file of a model, as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    /// Its path through the model folder (symlinks not resolved).
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
}

/// The regular files under `folder`, in path order, following symlinks. With `bounds`
/// (canonical folders), a symlink whose target lies in none of them is an [`Escape`];
/// without, symlinks are followed anywhere (a model the operator named by path).
pub fn model_files(folder: &Path, bounds: Option<&[PathBuf]>) -> Result<Vec<ModelFile>, Escape> {
    let mut walk = Walk {
        top: folder,
        bounds,
        visited: HashSet::new(),
        files: Vec::new(),
    };
    if let Ok(real) = folder.canonicalize() {
        walk.visited.insert(real);
    }
    walk.folder(folder, 0)?;
    Ok(walk.files)
}

struct Walk<'a> {
    top: &'a Path,
    bounds: Option<&'a [PathBuf]>,
    /// Folders already walked (a symlink loop ends here).
    visited: HashSet<PathBuf>,
    files: Vec<ModelFile>,
}

impl Walk<'_> {
    fn folder(&mut self, folder: &Path, depth: usize) -> Result<(), Escape> {
        let Ok(entries) = std::fs::read_dir(folder) else {
            return Ok(());
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            // A dangling link is no file of the model.
            let Ok(real) = path.canonicalize() else {
                continue;
            };
            if let Some(bounds) = self.bounds {
                if !bounds.iter().any(|root| real.starts_with(root)) {
                    let relative = path.strip_prefix(self.top).unwrap_or(&path);
                    return Err(Escape {
                        file: relative.to_string_lossy().into_owned(),
                    });
                }
            }
            let Ok(meta) = std::fs::metadata(&real) else {
                continue;
            };
            if meta.is_dir() {
                if depth < MAX_DEPTH && self.visited.insert(real) {
                    self.folder(&path, depth + 1)?;
                }
            } else if meta.is_file() {
                self.files.push(ModelFile {
                    path,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_are_followed_inside_the_bounds_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let blobs = root.path().join("blobs");
        let model = root.path().join("model");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        std::fs::create_dir_all(model.join("unet")).expect("mkdir");
        std::fs::write(blobs.join("a"), b"12345").expect("write");
        symlink(blobs.join("a"), model.join("unet/weights")).expect("symlink");
        // A loop and a dangling link are walked past.
        symlink(&model, model.join("unet/again")).expect("symlink");
        symlink(root.path().join("gone"), model.join("dangling")).expect("symlink");
        let bounds = [root.path().canonicalize().expect("canonical")];
        let files = model_files(&model, Some(&bounds)).expect("inside");
        assert_eq!(
            files,
            vec![ModelFile {
                path: model.join("unet/weights"),
                size: 5
            }]
        );
        std::fs::write(outside.path().join("b"), b"1").expect("write");
        symlink(outside.path().join("b"), model.join("unet/z")).expect("symlink");
        let escape = model_files(&model, Some(&bounds)).expect_err("outside");
        assert_eq!(escape.file, "unet/z");
        assert_eq!(model_files(&model, None).expect("unbounded").len(), 2);
    }
}
