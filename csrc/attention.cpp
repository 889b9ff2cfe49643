// The order in which scaled dot-product attention tries its fused backends on CUDA
// (libtorch's global context; the CPU picks its kernel by other rules). Every function
// catches C++ exceptions: nothing unwinds into Rust.
#include <ATen/Context.h>

#include <vector>

extern "C" {

// Sets the order from `count` at::SDPBackend values; -1 when libtorch refuses it.
int sdxld_sdp_set_priority(const int64_t* order, int count) {
  try {
    at::globalContext().setSDPPriorityOrder(std::vector<int64_t>(order, order + count));
    return 0;
  } catch (...) {
    return -1;
  }
}

// Writes the current order (at most `capacity` values) to `order`; their count, or -1.
int sdxld_sdp_priority(int64_t* order, int capacity) {
  try {
    const auto current = at::globalContext().sDPPriorityOrder();
    int count = 0;
    for (const auto backend : current) {
      if (count == capacity) {
        break;
      }
      order[count++] = static_cast<int64_t>(backend);
    }
    return count;
  } catch (...) {
    return -1;
  }
}
}
