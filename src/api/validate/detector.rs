//! The detector a network preprocessor runs: the model a request names in
//! `preprocessor_params.model`, else the configured default, each checked to hold the
//! network the preprocessor runs.

use crate::api::status::ApiError;
use crate::api::validate::fields::{model_name, Violations};
use crate::api::validate::model::named;
use crate::api::validate::Deferred;
use crate::config::PreprocessingSettings;
use crate::engine::error::EngineError;
use crate::engine::preprocess::depth_anything;
use crate::engine::preprocess::detector::{network_of, DetectorNetwork};
use crate::engine::preprocess::Preprocessor;
use crate::engine::registry::{ModelEntry, ModelKind, Registry, RegistryError};
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
        let runs = |held| preprocessor.runs_on(held);
        let described = preprocessor.networks_described();
        self.named_file(requested, (field, runs, described), v, deferred)
    }

    /// The file a request names in `field`, holding a network `runs` takes (`described`
    /// in the violation that refuses another).
    fn named_file(
        self,
        requested: &str,
        (field, runs, described): (&str, impl Fn(DetectorNetwork) -> bool, &str),
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<DetectorFile> {
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
            Ok(held) if runs(held) => detector_file(model, held)
                .map_err(|e| deferred.missing(unreadable(e)))
                .ok(),
            Ok(held) => {
                v.add(
                    field,
                    format!(
                        "`{requested}` holds the {} network; this preprocessor runs {described}",
                        held.name()
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

    /// The face and hand networks of `preprocessor` (`None` for a part it does not
    /// draw): each the file a request names (`requested`, in `{p}.face_model` and
    /// `{p}.hand_model`) or the configured default. A name for a part the preprocessor
    /// does not draw is a violation of its field; a default not installed, a deferred
    /// FAILED_PRECONDITION.
    #[allow(clippy::type_complexity)]
    pub fn parts_named(
        self,
        preprocessor: Preprocessor,
        (face, hand): (&str, &str),
        p: &str,
        v: &mut Violations,
        deferred: &mut Deferred,
    ) -> Option<(Option<DetectorFile>, Option<DetectorFile>)> {
        let mut part = |network: Option<DetectorNetwork>, requested: &str, name: &str| {
            let field = format!("{p}.{name}");
            match (network, requested.is_empty()) {
                (None, true) => Some(None),
                (None, false) => {
                    v.add(
                        field,
                        "applies to the OpenPose preprocessors that draw that part only",
                    );
                    None
                }
                (Some(n), false) => {
                    let runs = |held| held == n;
                    let file =
                        self.named_file(requested, (&field, runs, n.described()), v, deferred);
                    file.map(Some)
                }
                (Some(n), true) => match self.installed(n, |held| held == n, n.described()) {
                    Ok(file) => Some(Some(file)),
                    Err(missing) => {
                        deferred.missing(missing);
                        None
                    }
                },
            }
        };
        let face = part(preprocessor.face_network(), face, "face_model");
        let hand = part(preprocessor.hand_network(), hand, "hand_model");
        Some((face?, hand?))
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
            Ok(held) if accepts(held) => detector_file(model, held).map_err(unreadable),
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

/// `model` as the detector file of `network`, with what the job records of it.
fn detector_file(model: ModelEntry, network: DetectorNetwork) -> Result<DetectorFile, EngineError> {
    let depth_anything = match network {
        DetectorNetwork::DepthAnything => Some(depth_anything::version_of(&model.path)?),
        _ => None,
    };
    Ok(DetectorFile {
        model,
        network,
        depth_anything,
    })
}

/// A detector file that cannot be read, as the engine would report it on loading.
fn unreadable(error: EngineError) -> ApiError {
    ApiError::Job(JobError::Engine(error))
}
