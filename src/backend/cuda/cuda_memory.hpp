// Tracked device memory: every cudaMalloc of the backend goes through here, so the backend can
// report the most bytes it held at once (nanochat's "peak memory"), independent of what other
// libraries in the process allocate. Allocations are meant to happen at start-up and during the
// warm-up step; none happen inside a captured step.
#pragma once
#include <cstddef>
#include <memory>

namespace moelab {

class CudaMemory {
 public:
  // Device memory of `bytes` (rounded up to 256), freed when the last owner lets go.
  std::shared_ptr<void> allocate(size_t bytes);
  size_t current_bytes() const { return *current_; }
  size_t peak_bytes() const { return *peak_; }
  void reset_peak() { *peak_ = *current_; }

 private:
  // Shared with the deleters, so tensors that outlive the backend still free cleanly.
  std::shared_ptr<size_t> current_ = std::make_shared<size_t>(0);
  std::shared_ptr<size_t> peak_ = std::make_shared<size_t>(0);
};

}  // namespace moelab
