//! Time per stage of one job, for its report and the stage histogram.

use std::time::{Duration, Instant};

use crate::jobs::events::Stage;
use crate::telemetry::Metrics;

/// The stage a job is in, since when, and the time each stage took so far.
pub struct StageClock {
    current: Option<(Stage, Instant)>,
    timings: Vec<(Stage, Duration)>,
}

impl StageClock {
    /// A clock in `stage` since `since` (a job is queued from its admission).
    pub fn starting_at(stage: Stage, since: Instant) -> Self {
        Self {
            current: Some((stage, since)),
            timings: Vec::new(),
        }
    }

    /// Moves to `stage` (nothing changes if the job is in it already).
    pub fn enter(&mut self, stage: Stage, metrics: &Metrics) {
        if self.current.map(|(s, _)| s) == Some(stage) {
            return;
        }
        self.close(metrics);
        self.current = Some((stage, Instant::now()));
    }

    /// Ends the current stage.
    pub fn close(&mut self, metrics: &Metrics) {
        if let Some((stage, start)) = self.current.take() {
            let elapsed = start.elapsed();
            metrics.observe_stage(stage.label(), elapsed);
            match self.timings.iter_mut().find(|(s, _)| *s == stage) {
                Some((_, total)) => *total += elapsed,
                None => self.timings.push((stage, elapsed)),
            }
        }
    }

    /// The time per stage so far, in the order the stages first ran.
    pub fn take_timings(&mut self) -> Vec<(Stage, Duration)> {
        std::mem::take(&mut self.timings)
    }
}
