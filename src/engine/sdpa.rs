//! Which fused kernel scaled dot-product attention runs on CUDA. libtorch tries its
//! backends in a process-wide order (FlashAttention-2 first, then the memory-efficient
//! kernel, the math fallback, cuDNN last); a backend that cannot take an input (a head
//! size, a dtype) passes it to the next. Set through the C++ shim (csrc/attention.cpp);
//! the CPU picks its kernel by other rules, so the order changes nothing there.

use serde::Deserialize;

#[cfg(sdxld_cuda_shim)]
extern "C" {
    fn sdxld_sdp_set_priority(order: *const i64, count: i32) -> i32;
    fn sdxld_sdp_priority(order: *mut i64, capacity: i32) -> i32;
}

/// libtorch's `at::SDPBackend` values.
const MATH: i64 = 0;
const FLASH: i64 = 1;
const EFFICIENT: i64 = 2;
const CUDNN: i64 = 3;
const OVERRIDEABLE: i64 = 4;

/// The backend attention tries first on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBackend {
    /// FlashAttention-2 (libtorch's own order).
    #[default]
    Flash,
    /// cuDNN's fused attention (on Hopper, its FlashAttention-3-style kernels).
    Cudnn,
    /// The memory-efficient (xFormers-style) kernel.
    Efficient,
}

impl std::str::FromStr for AttentionBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flash" => Ok(Self::Flash),
            "cudnn" => Ok(Self::Cudnn),
            "efficient" => Ok(Self::Efficient),
            other => Err(format!(
                "`{other}` is not an attention backend (flash, cudnn, efficient)"
            )),
        }
    }
}

impl AttentionBackend {
    /// The order libtorch tries its backends in: this one first, the others after it in
    /// libtorch's own order.
    pub fn priority(self) -> [i64; 5] {
        let first = match self {
            Self::Flash => FLASH,
            Self::Cudnn => CUDNN,
            Self::Efficient => EFFICIENT,
        };
        let mut order = [first; 5];
        let rest = [FLASH, EFFICIENT, MATH, CUDNN, OVERRIDEABLE];
        for (slot, backend) in order[1..]
            .iter_mut()
            .zip(rest.into_iter().filter(|b| *b != first))
        {
            *slot = backend;
        }
        order
    }
}

/// Makes attention try `backend` first, process-wide. Whether libtorch took the order
/// (false in a build without the shim).
pub fn set_attention_backend(backend: AttentionBackend) -> bool {
    #[cfg(sdxld_cuda_shim)]
    {
        let order = backend.priority();
        // SAFETY: the shim reads `order.len()` integers and catches every C++ exception.
        return unsafe { sdxld_sdp_set_priority(order.as_ptr(), order.len() as i32) } == 0;
    }
    #[allow(unreachable_code)]
    {
        let _ = backend;
        false
    }
}

/// The order libtorch tries its attention backends in now (`at::SDPBackend` values); None
/// in a build without the shim.
pub fn attention_priority() -> Option<Vec<i64>> {
    #[cfg(sdxld_cuda_shim)]
    {
        let mut order = [0i64; 8];
        // SAFETY: the shim writes at most `order.len()` integers and catches every C++
        // exception.
        let count = unsafe { sdxld_sdp_priority(order.as_mut_ptr(), order.len() as i32) };
        return usize::try_from(count).ok().map(|n| order[..n].to_vec());
    }
    #[allow(unreachable_code)]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_takes_the_order_and_reports_it_back() {
        assert!(
            set_attention_backend(AttentionBackend::Cudnn),
            "a build with the shim sets the order"
        );
        assert_eq!(
            attention_priority(),
            Some(AttentionBackend::Cudnn.priority().to_vec())
        );
        assert!(set_attention_backend(AttentionBackend::Flash));
        assert_eq!(attention_priority(), Some(vec![1, 2, 0, 3, 4]));
    }

    #[test]
    fn each_backend_goes_first_and_keeps_the_others_in_libtorchs_order() {
        assert_eq!(AttentionBackend::Flash.priority(), [1, 2, 0, 3, 4]);
        assert_eq!(AttentionBackend::Cudnn.priority(), [3, 1, 2, 0, 4]);
        assert_eq!(AttentionBackend::Efficient.priority(), [2, 1, 0, 3, 4]);
        assert_eq!("cudnn".parse(), Ok(AttentionBackend::Cudnn));
        assert!("fa3"
            .parse::<AttentionBackend>()
            .is_err_and(|e| e.contains("flash, cudnn, efficient")));
    }
}
