//! One set of weights laid over another: its tensors replace the base's of the same key,
//! and a pair stored as `<key>` + [`LOW_RANK_UP`] / [`LOW_RANK_DOWN`] adds the low-rank
//! difference up · down to the base's tensor `<key>` when a model asks for it (how a
//! Control-LoRA stores a ControlNet against its base UNet).

use tch::{Kind, Tensor};

use super::Weights;
use crate::engine::error::{EngineError, Result};

/// Suffix of the key of a low-rank difference's up matrix ([out, rank] or
/// [out, rank, 1, 1]).
pub const LOW_RANK_UP: &str = "@low_rank_up";
/// Suffix of the key of a low-rank difference's down matrix ([rank, in] or
/// [rank, in, k, k]).
pub const LOW_RANK_DOWN: &str = "@low_rank_down";

impl Weights {
    /// These weights with `top` laid over them: each of `top`'s keys replaces the key of
    /// the same name, and low-rank pairs add to the tensor they name. The device, kind and
    /// layout stay these weights'.
    pub fn overlay(mut self, top: Weights) -> Weights {
        let offset = self.files.len();
        for (key, mut entry) in top.entries {
            entry.file += offset;
            self.entries.insert(key, entry);
        }
        self.files.extend(top.files);
        self
    }

    /// The low-rank difference laid over `key`, in float32 on the device and shaped as
    /// `shape`; `None` when there is none.
    pub(super) fn low_rank_delta(&self, key: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        let up_key = format!("{key}{LOW_RANK_UP}");
        let Some(up_entry) = self.entries.get(&up_key) else {
            return Ok(None);
        };
        let down_key = format!("{key}{LOW_RANK_DOWN}");
        let down_entry = self
            .entries
            .get(&down_key)
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.files[up_entry.file].path.clone(),
                name: format!("the down matrix of `{}`", up_entry.stored_name),
            })?;
        let rank = down_entry.shape.first().copied().unwrap_or(0);
        let outputs = shape.first().copied().unwrap_or(0);
        let inputs: i64 = shape.iter().skip(1).product();
        let mismatch = |entry: &super::TensorEntry, expected: Vec<i64>| {
            Err(EngineError::ShapeMismatch {
                path: self.files[entry.file].path.clone(),
                name: entry.stored_name.clone(),
                expected,
                actual: entry.shape.clone(),
            })
        };
        if up_entry.shape.iter().product::<i64>() != outputs * rank
            || up_entry.shape.first() != Some(&outputs)
        {
            return mismatch(up_entry, vec![outputs, rank]);
        }
        if down_entry.shape.iter().product::<i64>() != rank * inputs {
            return mismatch(down_entry, [&[rank], &shape[1..]].concat());
        }
        let up = self.read(&up_key, up_entry)?.f_to_kind(Kind::Float)?;
        let down = self.read(&down_key, down_entry)?.f_to_kind(Kind::Float)?;
        let delta = up
            .f_reshape([outputs, rank])?
            .f_mm(&down.f_reshape([rank, inputs])?)?
            .f_reshape(shape)?;
        Ok(Some(delta))
    }
}
