// Timing events on a device's current stream, for per-stage profiles: recording one does
// not wait for the device. Each event is a heap object the caller frees. Every function
// catches C++ exceptions: nothing unwinds into Rust.
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>

extern "C" {

// A timing event recorded on `device`'s current stream; null on failure.
void* sdxld_cuda_event_record(int device) {
  try {
    auto event = new c10::Event(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    event->record(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)));
    return event;
  } catch (...) {
    return nullptr;
  }
}

// Milliseconds between two recorded events, waiting for the later one; -1 on failure.
int sdxld_cuda_event_elapsed_ms(void* start, void* end, double* ms) {
  try {
    const auto* later = static_cast<c10::Event*>(end);
    later->synchronize();
    *ms = static_cast<c10::Event*>(start)->elapsedTime(*later);
    return 0;
  } catch (...) {
    return -1;
  }
}

void sdxld_cuda_event_free(void* event) {
  try {
    delete static_cast<c10::Event*>(event);
  } catch (...) {
  }
}
}
