// The state of libtorch's default CPU generator, read and restored around a draw that
// must leave the stream where it was (the generator is process-global). Every function
// catches C++ exceptions: nothing unwinds into Rust.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <mutex>

extern "C" {

// Copies the state into `out` when it fits in `capacity` bytes; its length either way,
// or -1.
int64_t sdxld_cpu_generator_state(uint8_t* out, int64_t capacity) {
  try {
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    const at::Tensor state = generator.get_state();
    const int64_t length = state.numel();
    if (length <= capacity) {
      std::memcpy(out, state.const_data_ptr<uint8_t>(), static_cast<size_t>(length));
    }
    return length;
  } catch (...) {
    return -1;
  }
}

// Restores a state read by sdxld_cpu_generator_state; -1 when libtorch refuses it.
int sdxld_cpu_generator_set_state(const uint8_t* data, int64_t length) {
  try {
    at::Tensor state = at::empty({length}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(state.data_ptr<uint8_t>(), data, static_cast<size_t>(length));
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
