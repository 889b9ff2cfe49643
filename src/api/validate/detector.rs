//! The detector a network preprocessor runs: the model a request names in
//! `preprocessor_params.model`, else the configured default, each checked to hold the
//! network the preprocessor runs.

use crate::api::status::ApiError;
use crate::api::validate::fields::{model_name, Violations};
use crate::api::validate::model::named;
use crate::api::validate::Deferred;
use crate::config::PreprocessingSettings;
use crate::engine::error::EngineError;
use crate::engine::preprocess::detector::{network_of, DetectorNetwork};
use crate::engine::preprocess::Preprocessor;
use crate::engine::registry::{ModelKind, Registry, RegistryError};
use crate::jobs::spec::DetectorFile;
use crate::jobs::JobError;

/// Where detectors come from: the model roots and the configured defaults.
#[derive(Clone, Copy)]
pub struct Detectors<'a> {
    pub registry: &'a Registry,
    pub defaults: &'a PreprocessingSettings,
}

impl Detectors<'_> {
    /// The detector `preprocessor` runs and the network it holds: `requested` (the `field`
    /// a request set) or the default. A requested file of a network it does not run on is
    /// a violation of `field`; a default not installed or of such a network, a deferred
    /// FAILED_PRECONDITION.
    pub fn resolve(
        self,
        preprocessor: Preprocessor,
        requested: &str,
        field: &str,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<DetectorFile> {
        if requested.is_empty() {
            return self
                .default_for(preprocessor)
                .map_err(|e| deferred.missing(e))
                .ok();
        }
        if !model_name(v, field, requested) {
            return None;
        }
        let model = named(
            self.registry,
            ModelKind::Preprocessor,
            requested,
            field,
            v,
            deferred,
        )?;
        match network_of(&model.path) {
            Ok(held) if preprocessor.runs_on(held) => Some(DetectorFile {
                model,
                network: held,
            }),
            Ok(held) => {
                v.add(
                    field,
                    format!(
                        "`{requested}` holds the {} network; this preprocessor runs {}",
                        held.name(),
                        preprocessor.networks_described()
                    ),
                );
                None
            }
            Err(e) => {
                deferred.missing(unreadable(e));
                None
            }
        }
    }

    /// The configured default detector of `preprocessor`'s network, installed and holding
    /// a network it runs on.
    pub fn default_for(self, preprocessor: Preprocessor) -> Result<DetectorFile, ApiError> {
        let Some(network) = preprocessor.network() else {
            return Err(ApiError::Internal(format!(
                "{preprocessor:?} runs no detector"
            )));
        };
        self.installed(
            network,
            |held| preprocessor.runs_on(held),
            preprocessor.networks_described(),
        )
    }

    /// The configured face and hand networks of a preprocessor that draws faces or hands
    /// (`None` for a part it does not draw), each installed and holding that network.
    #[allow(clippy::type_complexity)]
    pub fn parts_for(
        self,
        preprocessor: Preprocessor,
    ) -> Result<(Option<DetectorFile>, Option<DetectorFile>), ApiError> {
        let part = |network: Option<DetectorNetwork>| {
            network
                .map(|n| self.installed(n, |held| held == n, n.described()))
                .transpose()
        };
        Ok((
            part(preprocessor.face_network())?,
            part(preprocessor.hand_network())?,
        ))
    }

    /// The configured default file of `network`, installed and holding a network
    /// `accepts` takes (a preprocessor that `runs` the networks so described).
    fn installed(
        self,
        network: DetectorNetwork,
        accepts: impl Fn(DetectorNetwork) -> bool,
        runs: &'static str,
    ) -> Result<DetectorFile, ApiError> {
        let (key, name) = self.defaults.default_detector(network);
        let missing = || ApiError::PreprocessorModelMissing {
            key,
            name: name.to_string(),
            expected: if name.is_empty() {
                String::new()
            } else {
                network.expected_files(name)
            },
        };
        if name.is_empty() {
            return Err(missing());
        }
        let model = match self.registry.resolve_kind(ModelKind::Preprocessor, name) {
            Ok(model) => model,
            Err(RegistryError::NotFound(_)) => return Err(missing()),
            Err(e) => return Err(e.into()),
        };
        match network_of(&model.path) {
            Ok(held) if accepts(held) => Ok(DetectorFile {
                model,
                network: held,
            }),
            Ok(held) => Err(ApiError::PreprocessorModelMismatch {
                key,
                name: name.to_string(),
                holds: held.name(),
                runs,
            }),
            Err(e) => Err(unreadable(e)),
        }
    }
}

/// A detector file that cannot be read, as the engine would report it on loading.
fn unreadable(error: EngineError) -> ApiError {
    ApiError::Job(JobError::Engine(error))
}
