//! Model components (text encoders, UNets, VAEs) as units of loading and sharing: a
//! pipeline asks a [`ComponentStore`] for each of its components, which either loads it
//! or hands out one already loaded with the same content (the refiner shares the base's
//! second text encoder and VAE).

use std::any::Any;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::engine::error::{EngineError, Result};

/// The files a component is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentFiles {
    /// What it is (`unet`, `vae`, `text_encoder`, `text_encoder_2`): part of its identity.
    pub role: &'static str,
    /// Its files (config and weights), in a stable order.
    pub paths: Vec<PathBuf>,
    /// For a component inside a single-file checkpoint: the prefix of its tensors.
    pub prefix: Option<&'static str>,
}

impl ComponentFiles {
    /// A diffusers component folder: every regular file in it.
    pub fn folder(role: &'static str, dir: &Path) -> Self {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        Self {
            role,
            paths,
            prefix: None,
        }
    }

    /// The tensors under `prefix` in a single-file checkpoint.
    pub fn in_file(role: &'static str, file: &Path, prefix: &'static str) -> Self {
        Self {
            role,
            paths: vec![file.to_path_buf()],
            prefix: Some(prefix),
        }
    }
}

/// Hands out components, loading those it does not hold.
pub trait ComponentStore {
    /// The component `files` describe: one already loaded with the same content, or the
    /// result of `load`.
    fn get_or_load(
        &mut self,
        files: &ComponentFiles,
        load: &mut dyn FnMut() -> Result<Rc<dyn Any>>,
    ) -> Result<Rc<dyn Any>>;
}

/// A store that shares nothing: every component is loaded.
pub struct Fresh;

impl ComponentStore for Fresh {
    fn get_or_load(
        &mut self,
        _files: &ComponentFiles,
        load: &mut dyn FnMut() -> Result<Rc<dyn Any>>,
    ) -> Result<Rc<dyn Any>> {
        load()
    }
}

/// A typed component from `store`.
pub fn shared<T: Any>(
    store: &mut dyn ComponentStore,
    files: &ComponentFiles,
    load: impl FnOnce() -> Result<T>,
) -> Result<Rc<T>> {
    let mut load = Some(load);
    let any = store.get_or_load(files, &mut || {
        let load = load
            .take()
            .ok_or_else(|| EngineError::InvalidRequest("a component was loaded twice".into()))?;
        Ok(Rc::new(load()?) as Rc<dyn Any>)
    })?;
    any.downcast::<T>().map_err(|_| EngineError::Config {
        path: files.paths.first().cloned().unwrap_or_default(),
        message: format!("component `{}` is shared with another kind", files.role),
    })
}
