//! Content hashes of model files, one cache for the whole process: computed once per
//! file version (size and modification time), and never on a request path. The model
//! cache hashes the files it loads, on the engine thread; a background thread hashes what
//! a listing names; requests and listings only read what is known.
//!
//! A model's hash is its file's SHA-256 for a single file (what model sites and A1111
//! show), and for a folder the SHA-256 of one line per file in path order:
//! `<relative path> <file SHA-256>\n`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::engine::registry::ModelEntry;

/// What identifies a version of a file: its size and modification time.
type Stamp = (u64, Option<SystemTime>);

#[derive(Default)]
struct State {
    /// Known hashes and the file version they are of.
    known: HashMap<PathBuf, (Stamp, String)>,
    /// Files some thread is hashing now.
    hashing: HashSet<PathBuf>,
    /// Models waiting for the background thread.
    pending: VecDeque<ModelEntry>,
    /// Whether the background thread runs.
    background: bool,
}

/// The process's file hashes.
#[derive(Default)]
pub struct FileHashes {
    state: Mutex<State>,
    /// Signalled when a file's hash is done and when work is queued.
    changed: Condvar,
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's bytes.
fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = crate::engine::files::open_regular(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = path.metadata()?;
    Ok((meta.len(), meta.modified().ok()))
}

impl FileHashes {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a hashing thread panicked; the maps stay usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The SHA-256 of the file at `path`, computed now unless known. Blocks: for the
    /// engine thread and the background thread, never for a request.
    pub fn file(&self, path: &Path) -> std::io::Result<String> {
        let version = stamp(path)?;
        let mut state = self.lock();
        loop {
            if let Some((s, hash)) = state.known.get(path) {
                if *s == version {
                    return Ok(hash.clone());
                }
            }
            if !state.hashing.contains(path) {
                break;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.hashing.insert(path.to_path_buf());
        drop(state);
        let result = hash_file(path);
        let mut state = self.lock();
        state.hashing.remove(path);
        if let Ok(hash) = &result {
            state
                .known
                .insert(path.to_path_buf(), (version, hash.clone()));
        }
        drop(state);
        self.changed.notify_all();
        result
    }

    /// The SHA-256 of the file at `path` if it is known for its current version.
    pub fn known_file(&self, path: &Path) -> Option<String> {
        let version = stamp(path).ok()?;
        let state = self.lock();
        let (s, hash) = state.known.get(path)?;
        (*s == version).then(|| hash.clone())
    }

    /// The hash of `model`, hashing what is not known yet (blocks; see [`Self::file`]).
    /// An unreadable file counts as empty, so that a model always has a hash.
    pub fn model(&self, model: &ModelEntry) -> String {
        combine(model, |path| {
            Some(self.file(path).unwrap_or_else(|_| hex(&Sha256::digest([]))))
        })
        .unwrap_or_default()
    }

    /// The hash of `model` if all its files' hashes are known; otherwise `None`, and the
    /// background thread is asked to hash them.
    pub fn known_model(self: &Arc<Self>, model: &ModelEntry) -> Option<String> {
        let known = combine(model, |path| self.known_file(path));
        if known.is_none() {
            self.request(model);
        }
        known
    }

    /// Queues `model` for the background thread (started on first use).
    pub fn request(self: &Arc<Self>, model: &ModelEntry) {
        let mut state = self.lock();
        if state.pending.iter().any(|m| m.path == model.path) {
            return;
        }
        state.pending.push_back(model.clone());
        if !state.background {
            state.background = true;
            let hashes = Arc::downgrade(self);
            let started = std::thread::Builder::new()
                .name("sdxld-hasher".into())
                .spawn(move || background(hashes));
            if started.is_err() {
                state.background = false;
            }
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// The background thread: hashes queued models until the cache is dropped.
fn background(hashes: Weak<FileHashes>) {
    loop {
        let Some(strong) = hashes.upgrade() else {
            return;
        };
        let next = {
            let mut state = strong.lock();
            match state.pending.pop_front() {
                Some(model) => Some(model),
                None => {
                    // Wake up now and then to notice the cache going away.
                    let (mut state, _) = strong
                        .changed
                        .wait_timeout(state, std::time::Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
                    state.pending.pop_front()
                }
            }
        };
        if let Some(model) = next {
            let _ = strong.model(&model);
        }
    }
}

/// A model's hash from its files' hashes (`None` when `file_hash` knows one not).
fn combine(
    model: &ModelEntry,
    mut file_hash: impl FnMut(&Path) -> Option<String>,
) -> Option<String> {
    if model.path.is_file() {
        return file_hash(&model.path);
    }
    let mut hasher = Sha256::new();
    for file in model.files() {
        let relative = file.strip_prefix(&model.path).unwrap_or(&file);
        let line = format!(
            "{} {}\n",
            relative.to_string_lossy().replace('\\', "/"),
            file_hash(&file)?
        );
        hasher.update(line.as_bytes());
    }
    Some(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::registry::{ModelFormat, ModelKind};

    fn entry(path: &Path) -> ModelEntry {
        ModelEntry {
            name: "m".into(),
            kind: ModelKind::Lora,
            format: ModelFormat::SingleFile,
            path: path.to_path_buf(),
            size_bytes: 0,
            pipeline: None,
            controlnet: None,
            upscaler: None,
        }
    }

    #[test]
    fn a_file_model_hashes_as_its_bytes_and_follows_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.safetensors");
        std::fs::write(&path, b"abc").expect("write");
        let hashes = FileHashes::new();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hashes.known_file(&path), None);
        assert_eq!(hashes.model(&entry(&path)), abc);
        assert_eq!(hashes.known_model(&entry(&path)).as_deref(), Some(abc));
        std::fs::write(&path, b"abcd").expect("rewrite");
        assert_ne!(hashes.model(&entry(&path)), abc);
    }

    #[test]
    fn the_background_thread_fills_what_a_listing_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("m/unet")).expect("dirs");
        std::fs::write(dir.path().join("m/model_index.json"), b"{}").expect("write");
        std::fs::write(dir.path().join("m/unet/w.bin"), vec![7u8; 1 << 20]).expect("write");
        let model = ModelEntry {
            path: dir.path().join("m"),
            format: ModelFormat::Diffusers,
            ..entry(dir.path())
        };
        let hashes = FileHashes::new();
        assert_eq!(hashes.known_model(&model), None);
        let start = std::time::Instant::now();
        let hash = loop {
            if let Some(hash) = hashes.known_model(&model) {
                break hash;
            }
            assert!(start.elapsed().as_secs() < 20, "never hashed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(hash, FileHashes::new().model(&model));
        assert_eq!(hash.len(), 64);
    }
}
