// CUDA graphs: the kernels one thread queues on a device, captured once and replayed as
// one launch. Every function catches C++ exceptions: nothing unwinds into Rust.
// (No c10 guard headers: their inline code calls the CUDA runtime, which the binary does
// not link; the device and stream are set and restored through c10_cuda's functions.)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {
struct Graph {
  at::cuda::CUDAGraph graph;
  // While capturing: the stream that was current before the side stream the capture
  // runs on (captures cannot run on the default stream).
  std::optional<c10::cuda::CUDAStream> previous;

  void restore_stream() {
    if (previous) {
      c10::cuda::setCurrentCUDAStream(*previous);
      previous.reset();
    }
  }

  // Ends a capture still open (a capture that failed half-way) and restores the stream.
  void end_capture_quietly() {
    if (previous) {
      try {
        graph.capture_end();
      } catch (...) {
      }
      restore_stream();
    }
  }
};
}  // namespace

extern "C" {

// Starts capturing, into a new graph, what this thread queues on `device`: on a side
// stream, once the device is idle (the capture's inputs written before it are then in
// place). Null on failure.
void* sdxld_cuda_graph_begin(int device) {
  Graph* graph = nullptr;
  try {
    const auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::set_device(index);
    c10::cuda::device_synchronize();
    graph = new Graph();
    graph->previous = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
    graph->graph.capture_begin();
    return graph;
  } catch (...) {
    if (graph != nullptr) {
      graph->restore_stream();
      delete graph;
    }
    return nullptr;
  }
}

// Ends the capture and readies the graph; -1 when the capture failed (the graph is then
// not to be replayed).
int sdxld_cuda_graph_end(void* handle) {
  auto* graph = static_cast<Graph*>(handle);
  try {
    graph->graph.capture_end();
    graph->restore_stream();
    return 0;
  } catch (...) {
    graph->restore_stream();
    return -1;
  }
}

// Queues the captured kernels on the current stream; -1 on failure.
int sdxld_cuda_graph_replay(void* handle) {
  try {
    static_cast<Graph*>(handle)->graph.replay();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Frees the graph and the memory pool its tensors came from (ending a capture left open).
void sdxld_cuda_graph_free(void* handle) {
  auto* graph = static_cast<Graph*>(handle);
  try {
    graph->end_capture_quietly();
    delete graph;
  } catch (...) {
  }
}
}
