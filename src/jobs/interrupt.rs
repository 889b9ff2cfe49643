//! Engine work that stops between its passes (an upscaler's tiles, a pose detector's
//! faces and hands) when the job must stop: the engine hears the stop as an error from
//! the check it runs between passes, and the job hears it back as the job's stop.

use crate::engine::error::EngineError;
use crate::jobs::runner::JobSink;
use crate::jobs::{JobError, StopReason};

/// Asks the sink between passes and remembers why the work was stopped.
#[derive(Debug, Default)]
pub(crate) struct PassGate {
    stopped: Option<StopReason>,
}

impl PassGate {
    /// The check before a pass: an error the engine passes up when the job must stop.
    pub(crate) fn check(&mut self, sink: &mut dyn JobSink) -> Result<(), EngineError> {
        self.stopped = sink.stopped();
        match self.stopped {
            Some(_) => Err(EngineError::Internal("stopped between passes".into())),
            None => Ok(()),
        }
    }

    /// The work's result, with a stop this gate made reported as the job's stop.
    pub(crate) fn outcome<T>(self, result: Result<T, EngineError>) -> Result<T, JobError> {
        match (self.stopped, result) {
            (Some(reason), _) => Err(JobError::Stopped(reason)),
            (None, result) => Ok(result?),
        }
    }
}

/// Runs `work` with a check between its passes that stops it when the job must stop: its
/// result, or the job's stop.
pub(crate) fn interruptible<T>(
    sink: &mut dyn JobSink,
    work: impl FnOnce(&mut dyn FnMut() -> Result<(), EngineError>) -> Result<T, EngineError>,
) -> Result<T, JobError> {
    let mut gate = PassGate::default();
    let result = work(&mut || gate.check(sink));
    gate.outcome(result)
}
