// The backend's core family: identity, memory, host transfers, what the backend can do (the
// capability query), and graph capture. Every op family derives from it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/fp8_recipe.hpp"
#include "core/tensor.hpp"

namespace moelab {

// A question to Backend::supports, asked before a run allocates anything so that a choice the
// backend cannot run is refused by name instead of failing mid-step (as ggml's supports_op).
struct Capability {
  enum class Kind : uint8_t {
    graph_capture,    // make_graph() records and replays steps
    compute_dtype,    // activations and matmul operands in `dtype`
    attention,        // attention at head dim `size` on its fast kernels
    fp8_scaling,      // the FP8 GEMMs of every family under `scaling`
    expert_parallel,  // expert parallel ranks (the expert exchange) on this device
  };
  Kind kind = Kind::graph_capture;
  DType dtype = DType::f32;
  int64_t size = 0;
  Fp8Scaling scaling = Fp8Scaling::tensorwise;

  static Capability capture() { return {Kind::graph_capture}; }
  static Capability compute(DType d) { return {Kind::compute_dtype, d}; }
  static Capability attention_head_dim(int64_t hd) { return {Kind::attention, DType::f32, hd}; }
  static Capability fp8(Fp8Scaling s) { return {Kind::fp8_scaling, DType::f32, 0, s}; }
  static Capability experts_across_ranks() { return {Kind::expert_parallel}; }
};

// A recorded sequence of a backend's ops, replayed as one (a CUDA graph). capture records body
// once; recapture records it again and updates the recorded graph in place (same ops, new launch
// arguments such as a step's learning rate); replay runs it. Ops inside body must not allocate
// or read the device back to the host.
class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  virtual void capture(const std::function<void()>& body) = 0;
  virtual void recapture(const std::function<void()>& body) = 0;
  virtual void replay() = 0;
  virtual bool captured() const = 0;
};

class BackendCore {
 public:
  virtual ~BackendCore() = default;

  // --- identity and what the backend can do ---------------------------------------------------
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3"
  virtual DType act_dtype() const = 0;
  virtual DType master_dtype() const = 0;
  virtual bool supports(const Capability& c) const = 0;
  // A graph to capture steps into; null where the backend has no capture (Capability::capture).
  virtual std::unique_ptr<CapturedGraph> make_graph() { return nullptr; }

  // --- memory -----------------------------------------------------------------------------------
  // Uninitialized memory of the given shape and type on this backend's device.
  virtual Tensor alloc(const Shape& shape, DType dtype) = 0;
  // Most device bytes held at once since start (or since reset_peak_memory()).
  virtual size_t peak_memory_bytes() const = 0;
  virtual void reset_peak_memory() = 0;
  // Bytes the device can still allocate (a GPU's free memory), so a run too large for the card
  // is refused before it allocates; nullopt where the device's memory is the host's (the CPU).
  virtual std::optional<size_t> free_device_memory() const { return std::nullopt; }
  // Wait for all queued work (no-op on the CPU).
  virtual void synchronize() = 0;
  // Marks where an external profiler (ncu --profile-from-start off) records; no-op on the CPU.
  virtual void profiler_range(bool /*start*/) {}

  // --- host transfer (converting to/from the tensor's dtype) ---------------------------------
  virtual void write(Tensor& dst, const std::vector<float>& values) = 0;
  virtual void write_i32(Tensor& dst, const std::vector<int32_t>& values) = 0;
  virtual std::vector<float> read(const Tensor& src) = 0;
  virtual std::vector<int32_t> read_i32(const Tensor& src) = 0;
  virtual void fill(Tensor& t, float value) = 0;
  // dst = src, converting dtype (same element count).
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
};

}  // namespace moelab
