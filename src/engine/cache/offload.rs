//! Text encoders lent to the host while their models stay resident: a job that fits the
//! budget only without them offloads them once its prompts are encoded, and the next use
//! of a model holding them brings them back (a copy, not a load).

use std::path::Path;

use tch::Device;

use super::{move_params, ModelCache};

impl ModelCache {
    /// Moves the text encoders of the resident pipelines at `paths` to the host; their
    /// models stay resident. Returns the bytes moved.
    pub fn offload_text_encoders(&mut self, paths: &[&Path]) -> u64 {
        let keys: Vec<String> = paths
            .iter()
            .filter_map(|p| self.pipelines.get(*p))
            .flat_map(|r| r.components.iter().cloned())
            .collect();
        let mut moved = 0;
        for key in keys {
            if !self.is_on_device(&key) {
                continue;
            }
            let Some(live) = self.components.get_mut(&key) else {
                continue;
            };
            if !super::budget::is_text_encoder(live.role) {
                continue;
            }
            move_params(&mut live.params, Device::Cpu);
            moved += live.bytes;
            self.offloaded.insert(key);
            self.stats.text_encoder_offloads += 1;
        }
        moved
    }

    /// Brings the offloaded components among `keys` back to the placement.
    pub(super) fn bring_back(&mut self, keys: &[String]) {
        let device = self.placement.device;
        for key in keys {
            if !self.offloaded.remove(key) {
                continue;
            }
            if let Some(live) = self.components.get_mut(key) {
                move_params(&mut live.params, device);
            }
        }
    }

    /// Bytes of the components offloaded to the host.
    pub(super) fn offloaded_bytes(&self) -> u64 {
        self.offloaded
            .iter()
            .filter_map(|k| self.components.get(k))
            .map(|l| l.bytes)
            .sum()
    }
}
