//! Stopping a job: why it stops, and the flag its producer, its consumer and the cancel
//! RPC share.

use std::sync::atomic::{AtomicU8, Ordering};

/// Why a job stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Cancelled by the cancel RPC.
    Cancelled = 1,
    /// The client's deadline passed.
    DeadlineExceeded = 2,
    /// The client dropped its stream.
    ClientGone = 3,
    /// The server is shutting down and the grace period ended.
    ShuttingDown = 4,
}

/// Shared between a job's producer, its consumer and the cancel RPC.
#[derive(Debug, Default)]
pub struct JobControl {
    stop: AtomicU8,
}

impl JobControl {
    /// Asks the job to stop; the first reason wins. Whether this call stopped it.
    pub fn stop(&self, reason: StopReason) -> bool {
        self.stop
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Why the job must stop, if it must.
    pub fn stopped(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::DeadlineExceeded),
            3 => Some(StopReason::ClientGone),
            4 => Some(StopReason::ShuttingDown),
            _ => None,
        }
    }
}
