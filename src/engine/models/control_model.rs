//! What a ControlNet unit runs: a ControlNet (called at every step, its residuals added
//! to the UNet's skip states) or a T2I-Adapter (run once, its features added inside the
//! UNet's down blocks). Both are found under the ControlNet roots and chosen per unit.

use std::path::Path;

use crate::engine::config_check::check_config;
use crate::engine::device::Placement;
use crate::engine::error::Result;
use crate::engine::files::read_json;
use crate::engine::models::controlnet::ControlNetModel;
use crate::engine::models::t2i_adapter::{infer_config, is_adapter_file, T2IAdapter};
use crate::engine::weights::read_shapes;

/// A unit's model.
pub enum ControlModel {
    /// A ControlNet (or ControlNet Union) model.
    ControlNet(Box<ControlNetModel>),
    /// A T2I-Adapter.
    Adapter(T2IAdapter),
}

impl ControlModel {
    /// Loads the folder or single `.safetensors` file at `path`: a T2I-Adapter when its
    /// config names `T2IAdapter` or its tensors are an adapter's, else a ControlNet.
    pub fn load_path(path: &Path, placement: Placement) -> Result<Self> {
        if path.is_dir() {
            return if is_adapter_dir(path) {
                T2IAdapter::load_dir(path, placement).map(Self::Adapter)
            } else {
                ControlNetModel::load_dir(path, placement).map(|m| Self::ControlNet(Box::new(m)))
            };
        }
        let (shapes, _) = read_shapes(path)?;
        if is_adapter_file(&shapes) {
            let config = infer_config(path, &shapes)?;
            check_config(&config, path)?;
            T2IAdapter::load_file(path, config, placement).map(Self::Adapter)
        } else {
            ControlNetModel::load_file(path, placement).map(|m| Self::ControlNet(Box::new(m)))
        }
    }

    /// The ControlNet, unless it is an adapter.
    pub fn controlnet(&self) -> Option<&ControlNetModel> {
        match self {
            Self::ControlNet(model) => Some(model),
            Self::Adapter(_) => None,
        }
    }

    /// The T2I-Adapter, if it is one.
    pub fn adapter(&self) -> Option<&T2IAdapter> {
        match self {
            Self::ControlNet(_) => None,
            Self::Adapter(model) => Some(model),
        }
    }
}

/// Whether the model folder at `path` holds a T2I-Adapter (`_class_name` `T2IAdapter`).
fn is_adapter_dir(path: &Path) -> bool {
    read_json::<serde_json::Value>(&path.join("config.json"))
        .ok()
        .and_then(|c| c.get("_class_name")?.as_str().map(|c| c == "T2IAdapter"))
        .unwrap_or(false)
}
