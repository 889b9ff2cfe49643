//! Per-stage timing of a job, taken only when asked for (`sdxld bench --profile`).
//!
//! Code marks its stages with [`span`] guards; while [`record`] runs on the thread, each
//! guard notes when its stage started and ended, otherwise it costs one thread-local
//! look-up. On the CPU the marks are host clock readings (the operations have finished
//! when they return); on CUDA they are timing events on the current stream, recorded
//! without waiting for the device, so that a profile adds no synchronisation inside the
//! denoising loop. Durations are read once the recording ends. Outermost stages also
//! report the device allocator's peak while they ran.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use tch::Device;

use crate::engine::device::{self, DeviceEvent};

/// One point in time on the recording's device.
enum Mark {
    Host(Instant),
    Device(DeviceEvent),
}

impl Mark {
    fn now(device: Device) -> Self {
        DeviceEvent::record(device).map_or_else(|| Mark::Host(Instant::now()), Mark::Device)
    }

    /// Milliseconds from `self` to `later`.
    fn until(&self, later: &Mark) -> Option<f64> {
        match (self, later) {
            (Mark::Host(a), Mark::Host(b)) => Some(b.duration_since(*a).as_secs_f64() * 1e3),
            (Mark::Device(a), Mark::Device(b)) => a.elapsed_ms(b),
            _ => None,
        }
    }
}

/// A stage's name: a label and, for numbered parts (UNet levels), their number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StageName(&'static str, Option<usize>);

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(i) => write!(f, "{}{i}", self.0),
            None => f.write_str(self.0),
        }
    }
}

struct Recording {
    device: Device,
    /// The stages open now, outermost first.
    open: Vec<StageName>,
    /// Finished stages.
    spans: Vec<FinishedSpan>,
}

struct FinishedSpan {
    /// The stage's names, outermost first.
    path: Vec<StageName>,
    start: Mark,
    end: Mark,
    /// Host milliseconds between its opening and closing (issuing its work, on CUDA).
    host_ms: f64,
    /// The device allocator's peak during an outermost stage.
    peak_bytes: Option<u64>,
}

thread_local! {
    static RECORDING: RefCell<Option<Recording>> = const { RefCell::new(None) };
}

/// An open stage: dropping it ends the stage.
pub struct Span {
    /// Its place in the recording's open stages.
    depth: usize,
    start: Option<Mark>,
    opened: Instant,
}

impl Drop for Span {
    fn drop(&mut self) {
        RECORDING.with(|r| {
            if let (Some(recording), Some(start)) = (r.borrow_mut().as_mut(), self.start.take()) {
                let end = Mark::now(recording.device);
                let path = recording
                    .open
                    .get(..=self.depth)
                    .map_or_else(|| recording.open.clone(), <[_]>::to_vec);
                recording.open.truncate(self.depth);
                let peak_bytes = (self.depth == 0)
                    .then(|| device::memory(recording.device).map(|m| m.peak))
                    .flatten();
                recording.spans.push(FinishedSpan {
                    path,
                    start,
                    end,
                    host_ms: self.opened.elapsed().as_secs_f64() * 1e3,
                    peak_bytes,
                });
            }
        });
    }
}

fn open(name: StageName) -> Option<Span> {
    RECORDING.with(|r| {
        r.borrow_mut().as_mut().map(|recording| {
            if recording.open.is_empty() {
                // Outermost stages report the allocator's peak while they ran.
                device::reset_peak(recording.device);
            }
            recording.open.push(name);
            Span {
                depth: recording.open.len() - 1,
                start: Some(Mark::now(recording.device)),
                opened: Instant::now(),
            }
        })
    })
}

/// Whether a profile is being recorded on this thread.
pub fn recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
}

/// Opens stage `name` when a profile is being recorded on this thread.
pub fn span(name: &'static str) -> Option<Span> {
    open(StageName(name, None))
}

/// Opens stage `name` number `index` (a UNet level) when a profile is being recorded.
pub fn span_numbered(name: &'static str, index: usize) -> Option<Span> {
    open(StageName(name, Some(index)))
}

/// The time spent in one stage over a recording.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageTimes {
    /// How many times the stage ran.
    pub count: usize,
    /// Milliseconds over all its runs.
    pub total_ms: f64,
    /// Of those, the milliseconds not spent in a stage inside it.
    pub self_ms: f64,
    /// Its shortest run.
    pub min_ms: f64,
    /// Its longest run.
    pub max_ms: f64,
    /// Milliseconds the host spent in it. On CUDA, where the host only queues work, a
    /// denoising step whose host time is well below its device time keeps the device
    /// busy; one whose host time is near it is bound by launching kernels.
    pub host_ms: f64,
    /// For outermost stages on a CUDA device: the most bytes the allocator held while it
    /// ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// The stages of a recording, by path: the names of the stages around a stage and its
/// own, joined by `;` (`denoise_step;unet;unet.down2;transformer`), as flame graphs'
/// folded stacks name them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Profile {
    /// Per stage path.
    pub stages: BTreeMap<String, StageTimes>,
}

impl Profile {
    /// The profile as folded stacks: a line `path microseconds` per stage, with the time
    /// spent in the stage itself (what flame graph tools take).
    pub fn folded(&self) -> String {
        self.stages
            .iter()
            .map(|(path, t)| format!("{path} {}\n", (t.self_ms * 1e3).round() as i64))
            .collect()
    }

    fn from_spans(spans: &[FinishedSpan]) -> Self {
        let join = |path: &[StageName]| {
            path.iter()
                .map(StageName::to_string)
                .collect::<Vec<_>>()
                .join(";")
        };
        let mut stages: BTreeMap<String, StageTimes> = BTreeMap::new();
        let mut inner_ms: BTreeMap<String, f64> = BTreeMap::new();
        for FinishedSpan {
            path,
            start,
            end,
            host_ms,
            peak_bytes,
        } in spans
        {
            let Some(ms) = start.until(end) else { continue };
            let times = stages.entry(join(path)).or_insert(StageTimes {
                count: 0,
                total_ms: 0.0,
                self_ms: 0.0,
                min_ms: f64::INFINITY,
                max_ms: 0.0,
                host_ms: 0.0,
                peak_memory_bytes: None,
            });
            times.host_ms += host_ms;
            times.peak_memory_bytes = times.peak_memory_bytes.max(*peak_bytes);
            times.count += 1;
            times.total_ms += ms;
            times.min_ms = times.min_ms.min(ms);
            times.max_ms = times.max_ms.max(ms);
            if let Some((_, parent)) = path.split_last() {
                *inner_ms.entry(join(parent)).or_default() += ms;
            }
        }
        for (path, times) in &mut stages {
            let inner = inner_ms.get(path).copied().unwrap_or(0.0);
            times.self_ms = (times.total_ms - inner).max(0.0);
        }
        Self { stages }
    }
}

/// Runs `work` with its stages recorded on `device`, and returns its result with their
/// profile (read after the device has finished the work).
pub fn record<T>(device: Device, work: impl FnOnce() -> T) -> (T, Profile) {
    let outer = RECORDING.with(|r| {
        r.borrow_mut().replace(Recording {
            device,
            open: Vec::new(),
            spans: Vec::new(),
        })
    });
    let result = work();
    let recording = RECORDING.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    device::synchronize(device);
    let profile = recording.map_or_else(Profile::default, |r| Profile::from_spans(&r.spans));
    (result, profile)
}
