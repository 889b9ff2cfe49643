//! The device the engine runs on: where and in which precision the models run, and what
//! tch does not expose of libtorch's CUDA runtime, through a small C++ shim (csrc/): the
//! caching allocator (emptying its cache, reading its statistics) and timing events. On
//! the CPU, or in a build without the CUDA headers, the allocator has nothing to report
//! and there are no events.

use tch::{Device, Kind, Tensor};

use crate::engine::error::{EngineError, Result};
use crate::engine::weights::{WeightLayout, Weights};

/// Where and in which precision the models run, and how the UNets, ControlNets and VAEs
/// lay out their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The device.
    pub device: Device,
    /// The floating-point kind of the weights and activations.
    pub kind: Kind,
    /// The UNets', ControlNets' and VAEs' weight layout.
    pub layout: WeightLayout,
    /// On CUDA, the UNet's plain calls replayed as CUDA graphs.
    pub cuda_graphs: bool,
    /// The VAE decoder's layers on more rows than this run that many rows at a time.
    pub vae_band_rows: Option<i64>,
}

impl Placement {
    /// CPU, float32: the configuration that matches diffusers bit for bit (nearly).
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            layout: WeightLayout::default(),
            cuda_graphs: false,
            vae_band_rows: None,
        }
    }

    /// The same placement with weights laid out as `layout` says.
    pub fn with_layout(self, layout: WeightLayout) -> Self {
        Self { layout, ..self }
    }

    /// The weights of the model component in `dir` (`stem.safetensors` or its shards),
    /// loaded at this placement and laid out as it says.
    pub fn open_component(&self, dir: &std::path::Path, stem: &str) -> Result<Weights> {
        Ok(Weights::open_component(dir, stem, self.device, self.kind)?.with_layout(self.layout))
    }

    /// The same placement with the UNet's plain calls replayed as CUDA graphs (on CUDA).
    pub fn with_cuda_graphs(self, cuda_graphs: bool) -> Self {
        Self {
            cuda_graphs,
            ..self
        }
    }

    /// The same placement with the VAE decoder's large layers run `rows` rows at a time
    /// (0: whole).
    pub fn with_vae_band_rows(self, rows: u32) -> Self {
        Self {
            vae_band_rows: (rows > 0).then_some(i64::from(rows)),
            ..self
        }
    }

    /// Parses `auto`, `cpu`, `cuda` or `cuda:N` and `float32`, `float16` or `bfloat16`.
    pub fn parse(device: &str, dtype: &str) -> Result<Self> {
        let device = match device {
            "auto" => Device::cuda_if_available(),
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Device::Cuda(index),
                _ => {
                    return Err(EngineError::Device(format!(
                        "unknown device `{other}` (auto, cpu, cuda or cuda:N)"
                    )))
                }
            },
        };
        if let Device::Cuda(index) = device {
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                return Err(EngineError::Device(format!(
                    "cuda:{index} is not available ({count} CUDA devices)"
                )));
            }
        }
        let kind = match dtype {
            "float32" | "fp32" => Kind::Float,
            "float16" | "fp16" | "half" => Kind::Half,
            "bfloat16" | "bf16" => Kind::BFloat16,
            other => {
                return Err(EngineError::Device(format!(
                    "unknown dtype `{other}` (float32, float16 or bfloat16)"
                )))
            }
        };
        if device == Device::Cpu && kind != Kind::Float {
            return Err(EngineError::Device(
                "half precision needs a CUDA device; use float32 on the CPU".into(),
            ));
        }
        Ok(Self {
            device,
            kind,
            layout: WeightLayout::default(),
            cuda_graphs: false,
            vae_band_rows: None,
        })
    }

    /// The device as configuration names it (`cpu`, `cuda:0`).
    pub fn device_name(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".to_string(),
        }
    }

    /// The dtype as configuration names it.
    pub fn dtype_name(&self) -> &'static str {
        match self.kind {
            Kind::Half => "float16",
            Kind::BFloat16 => "bfloat16",
            _ => "float32",
        }
    }
}

#[cfg(sdxld_cuda_shim)]
extern "C" {
    fn sdxld_cuda_empty_cache() -> i32;
    fn sdxld_cuda_memory(
        device: i32,
        allocated: *mut i64,
        peak: *mut i64,
        reserved: *mut i64,
    ) -> i32;
    fn sdxld_cuda_reset_peak(device: i32) -> i32;
    fn sdxld_cuda_set_memory_fraction(device: i32, fraction: f64) -> i32;
    fn sdxld_cuda_event_record(device: i32) -> *mut std::ffi::c_void;
    fn sdxld_cuda_event_elapsed_ms(
        start: *mut std::ffi::c_void,
        end: *mut std::ffi::c_void,
        ms: *mut f64,
    ) -> i32;
    fn sdxld_cuda_event_free(event: *mut std::ffi::c_void);
    fn sdxld_cuda_graph_begin(device: i32) -> *mut std::ffi::c_void;
    fn sdxld_cuda_graph_end(graph: *mut std::ffi::c_void) -> i32;
    fn sdxld_cuda_graph_replay(graph: *mut std::ffi::c_void) -> i32;
    fn sdxld_cuda_graph_free(graph: *mut std::ffi::c_void);
}

/// The caching allocator's view of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by tensors now.
    pub allocated: u64,
    /// Most bytes held by tensors since the last reset.
    pub peak: u64,
    /// Bytes the cache holds from the driver (allocated plus cached).
    pub reserved: u64,
}

fn cuda_index(device: Device) -> Option<i32> {
    match device {
        Device::Cuda(index) if tch::Cuda::is_available() => Some(index as i32),
        _ => None,
    }
}

/// The allocator's statistics for `device` (None on the CPU).
pub fn memory(device: Device) -> Option<MemoryStats> {
    let _index = cuda_index(device)?;
    #[cfg(sdxld_cuda_shim)]
    {
        let (mut allocated, mut peak, mut reserved) = (0i64, 0i64, 0i64);
        // SAFETY: the shim writes three integers through valid pointers and catches every
        // C++ exception.
        let status = unsafe { sdxld_cuda_memory(_index, &mut allocated, &mut peak, &mut reserved) };
        if status == 0 {
            return Some(MemoryStats {
                allocated: allocated.max(0) as u64,
                peak: peak.max(0) as u64,
                reserved: reserved.max(0) as u64,
            });
        }
    }
    None
}

/// Starts a new peak measurement on `device`.
pub fn reset_peak(device: Device) {
    let Some(_index) = cuda_index(device) else {
        return;
    };
    #[cfg(sdxld_cuda_shim)]
    // SAFETY: a call into libtorch that catches its exceptions.
    unsafe {
        sdxld_cuda_reset_peak(_index);
    }
}

/// Returns the cache's unused blocks to the driver (after an out-of-memory, or once
/// models were evicted).
pub fn empty_cache(device: Device) {
    if cuda_index(device).is_none() {
        return;
    }
    #[cfg(sdxld_cuda_shim)]
    // SAFETY: a call into libtorch that catches its exceptions.
    unsafe {
        sdxld_cuda_empty_cache();
    }
}

/// Caps libtorch's allocator on `device` at `fraction` of the device's memory (as
/// `torch.cuda.set_per_process_memory_fraction`). Whether the cap is in place.
pub fn set_memory_fraction(device: Device, fraction: f64) -> bool {
    let Some(_index) = cuda_index(device) else {
        return false;
    };
    // The allocator sets up its devices lazily, on the first allocation.
    let _first = tch::Tensor::zeros([1], (tch::Kind::Float, device));
    #[cfg(sdxld_cuda_shim)]
    // SAFETY: a call into libtorch that catches its exceptions.
    unsafe {
        return sdxld_cuda_set_memory_fraction(_index, fraction) == 0;
    }
    #[allow(unreachable_code)]
    false
}

/// `t`, a host tensor, copied to `device` without making the host wait for the device: an
/// asynchronous copy, for which the driver stages pageable memory at once (a blocking copy
/// would first wait for the stream's queued work). On the CPU, `t` itself.
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    if cuda_index(device).is_none() {
        return t.to_device(device);
    }
    t.f_to_device_(device, t.kind(), true, false)
        .unwrap_or_else(|_| t.to_device(device))
}

/// Waits until `device` has finished the work queued on it (nothing on the CPU).
pub fn synchronize(device: Device) {
    if let Some(index) = cuda_index(device) {
        tch::Cuda::synchronize(i64::from(index));
    }
}

/// A timing event recorded on a CUDA device's current stream.
pub struct DeviceEvent(std::ptr::NonNull<std::ffi::c_void>);

impl DeviceEvent {
    /// An event recorded now on `device`'s stream; None on the CPU or without the shim.
    pub fn record(device: Device) -> Option<Self> {
        let _index = cuda_index(device)?;
        #[cfg(sdxld_cuda_shim)]
        // SAFETY: the shim returns a new event or null, catching every C++ exception.
        unsafe {
            return std::ptr::NonNull::new(sdxld_cuda_event_record(_index)).map(Self);
        }
        #[allow(unreachable_code)]
        None
    }

    /// Milliseconds from this event to `later`, once the device has reached `later`.
    pub fn elapsed_ms(&self, later: &DeviceEvent) -> Option<f64> {
        let mut _ms = 0.0;
        #[cfg(sdxld_cuda_shim)]
        // SAFETY: both pointers are live events from the shim; it catches exceptions.
        unsafe {
            if sdxld_cuda_event_elapsed_ms(self.0.as_ptr(), later.0.as_ptr(), &mut _ms) == 0 {
                return Some(_ms);
            }
        }
        None
    }
}

impl Drop for DeviceEvent {
    fn drop(&mut self) {
        #[cfg(sdxld_cuda_shim)]
        // SAFETY: the event came from the shim and is freed once.
        unsafe {
            sdxld_cuda_event_free(self.0.as_ptr());
        }
    }
}

/// Kernels queued on a CUDA device, captured once and replayed as one launch (a CUDA
/// graph). The graph keeps the memory of the tensors made while it was captured.
pub struct CudaGraph(std::ptr::NonNull<std::ffi::c_void>);

impl CudaGraph {
    /// Captures what `record` queues on `device` from this thread: the graph, and what
    /// `record` returned (tensors in the graph's memory, written only when it is
    /// replayed). None on the CPU, without the shim, or when the capture failed (an
    /// operation that cannot be captured, a panic in `record`).
    pub fn capture<T>(device: Device, record: impl FnOnce() -> T) -> Option<(Self, T)> {
        let _index = cuda_index(device)?;
        #[cfg(sdxld_cuda_shim)]
        {
            // SAFETY: the shim returns a new graph or null, catching every C++ exception.
            let graph = Self(std::ptr::NonNull::new(unsafe {
                sdxld_cuda_graph_begin(_index)
            })?);
            let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(record));
            // SAFETY: a live graph from the shim, its capture open.
            let ended = unsafe { sdxld_cuda_graph_end(graph.0.as_ptr()) } == 0;
            match recorded {
                Ok(value) if ended => Some((graph, value)),
                _ => None,
            }
        }
        #[cfg(not(sdxld_cuda_shim))]
        {
            drop(record);
            None
        }
    }

    /// Queues the captured kernels on the current stream; whether that worked.
    pub fn replay(&self) -> bool {
        #[cfg(sdxld_cuda_shim)]
        // SAFETY: a live, captured graph from the shim.
        unsafe {
            return sdxld_cuda_graph_replay(self.0.as_ptr()) == 0;
        }
        #[allow(unreachable_code)]
        false
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(sdxld_cuda_shim)]
        // SAFETY: the graph came from the shim and is freed once.
        unsafe {
            sdxld_cuda_graph_free(self.0.as_ptr());
        }
    }
}

/// glibc's mmap threshold for the process: blocks below it come from the heap.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// glibc's trim threshold for the process: free memory at the heap's top up to this is
/// kept for the next allocation.
const TRIM_THRESHOLD: i32 = 128 << 20;

/// Keeps the tensors a CPU pass frees in glibc's heap for the next layer. By default
/// glibc maps every block above its (adaptive) mmap threshold afresh and hands the
/// heap's top back to the system at every free above twice that: a network's
/// activations, freed and allocated again at every layer, then fault their pages in on
/// every layer, which made small passes a third slower than the same libtorch calls
/// under Python (whose objects hold the heap's top). Fixed thresholds keep them; what a
/// job freed still goes back to the system between jobs
/// ([`release_freed_host_memory`]). Called once, at start.
pub fn keep_freed_tensors_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Hands the host memory a job freed back to the system. libtorch's CPU tensors come
/// from glibc's malloc, which keeps freed memory in its arenas for reuse (and, after a
/// large tensor is freed, raises its mmap threshold so that later large tensors are kept
/// too): without this, one large job leaves the process hundreds of MiB larger for good.
/// Called between jobs, where its few milliseconds delay no step.
pub fn release_freed_host_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
