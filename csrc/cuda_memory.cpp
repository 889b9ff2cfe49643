// What tch does not expose of libtorch's CUDA caching allocator: emptying its cache and
// its memory statistics. Every function catches C++ exceptions: nothing unwinds into Rust.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdint>

namespace {
constexpr size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
}

extern "C" {

// Returns 0 on success, -1 when the allocator refused.
int sdxld_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Bytes allocated now and at peak since the last reset, and bytes reserved by the cache;
// -1 on failure.
int sdxld_cuda_memory(int device, int64_t* allocated, int64_t* peak, int64_t* reserved) {
  try {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *allocated = stats.allocated_bytes[kAggregate].current;
    *peak = stats.allocated_bytes[kAggregate].peak;
    *reserved = stats.reserved_bytes[kAggregate].current;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Caps the allocator at `fraction` of the device's memory (beyond it: out of memory).
int sdxld_cuda_set_memory_fraction(int device, double fraction) {
  try {
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

int sdxld_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
}
