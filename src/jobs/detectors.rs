//! The networks a preprocessor runs (its detector and, for a pose map with faces or
//! hands, the face and hand networks), loaded into the cache, and the memory running
//! them takes.

use std::rc::Rc;

use crate::engine::error::EngineError;
use crate::engine::preprocess::detector::Detector;
use crate::engine::preprocess::{Networks, Preprocessing};
use crate::jobs::engine::Engine;
use crate::jobs::spec::{ControlInput, DetectorFile, PreprocessSpec};

/// The files a preprocessor's networks are in: its detector's and its face and hand
/// networks'.
#[derive(Debug, Clone, Copy)]
pub struct NetworkFiles<'a> {
    pub detector: Option<&'a DetectorFile>,
    pub face: Option<&'a DetectorFile>,
    pub hand: Option<&'a DetectorFile>,
}

impl<'a> NetworkFiles<'a> {
    /// Those of a ControlNet unit's input.
    pub fn of_input(input: &'a ControlInput) -> Self {
        Self {
            detector: input.detector.as_ref(),
            face: input.face_detector.as_ref(),
            hand: input.hand_detector.as_ref(),
        }
    }

    /// Those of a preprocessing job.
    pub fn of_job(spec: &'a PreprocessSpec) -> Self {
        Self {
            detector: Some(&spec.detector),
            face: spec.face_detector.as_ref(),
            hand: spec.hand_detector.as_ref(),
        }
    }

    /// Each file, the detector's first.
    pub fn files(self) -> impl Iterator<Item = &'a DetectorFile> {
        self.detector.into_iter().chain(self.face).chain(self.hand)
    }

    /// The bytes running them for `preprocessing` on a `width`×`height` image takes
    /// beyond their weights: the face and hand networks run while the body's maps are
    /// kept, so all count.
    pub fn activations(
        self,
        engine: &Engine,
        preprocessing: Preprocessing,
        size: (u32, u32),
    ) -> u64 {
        self.files()
            .map(|file| engine.detector_activations(file.network, preprocessing, size))
            .sum()
    }

    /// The networks, loading each on first use.
    pub fn load(self, engine: &mut Engine) -> Result<LoadedNetworks, EngineError> {
        let mut load = |file: Option<&DetectorFile>| match file {
            Some(file) => engine.detector(&file.model).map(Some),
            None => Ok(None),
        };
        Ok(LoadedNetworks {
            detector: load(self.detector)?,
            face: load(self.face)?,
            hand: load(self.hand)?,
        })
    }
}

/// A preprocessor's networks, loaded.
#[derive(Default)]
pub struct LoadedNetworks {
    pub detector: Option<Rc<Detector>>,
    pub face: Option<Rc<Detector>>,
    pub hand: Option<Rc<Detector>>,
}

impl LoadedNetworks {
    /// The networks as a preprocessor takes them.
    pub fn networks(&self) -> Networks<'_> {
        Networks {
            detector: self.detector.as_deref(),
            face: self.face.as_deref(),
            hand: self.hand.as_deref(),
        }
    }
}
