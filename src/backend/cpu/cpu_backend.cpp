// CpuBackend identity, memory accounting and host transfer. Allocations are 64-byte aligned
// (vector loads, cache lines) and owned by Tensor::storage, whose deleter returns the bytes to a
// counter shared with the backend, so peak memory is exact and safe from any thread.
#include "backend/cpu/cpu_backend.hpp"
#include "backend/devices.hpp"

#include <cstdlib>
#include <new>

#include "backend/cpu/convert.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

CpuBackend::CpuBackend(DType master, int threads)
    : master_(master), pool_(threads), memory_(std::make_shared<MemoryCounter>()) {
  if (master != DType::f32 && master != DType::f64)
    throw Error(std::string("cpu backend: master dtype ") + dtype_name(master) +
                " is not supported; the CPU computes in f32 (or f64 for gradient checks)");
}

CpuBackend::~CpuBackend() = default;

std::unique_ptr<Backend> make_cpu_backend(DType master, int threads) {
  return std::make_unique<CpuBackend>(master, threads);
}

bool CpuBackend::supports(const Capability& c) const {
  switch (c.kind) {
    case Capability::Kind::graph_capture: return false;
    case Capability::Kind::compute_dtype: return c.dtype == master_;
    case Capability::Kind::attention:
    case Capability::Kind::fp8_scaling:
    case Capability::Kind::expert_parallel: return true;
  }
  return false;
}

std::string CpuBackend::name() const {
  return "cpu (" + std::to_string(pool_.size()) + " thread" + (pool_.size() == 1 ? "" : "s") +
         ", " + dtype_name(master_) + ")";
}

Tensor CpuBackend::alloc(const Shape& shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.device = Device::cpu;
  t.shape = shape;
  for (auto d : shape)
    require(d >= 0, "alloc", "shape " + shape_str(shape) + " has a negative dimension");
  const size_t bytes = t.bytes();
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p)
    throw Error("cpu backend, alloc: out of host memory allocating " + std::to_string(bytes) +
                " bytes for " + t.describe() + "; reduce batch size or model size");
  auto counter = memory_;
  const size_t now = counter->current.fetch_add(bytes) + bytes;
  size_t peak = counter->peak.load();
  while (now > peak && !counter->peak.compare_exchange_weak(peak, now)) {
  }
  t.storage = std::shared_ptr<void>(p, [counter, bytes](void* q) {
    counter->current.fetch_sub(bytes);
    std::free(q);
  });
  t.data = p;
  return t;
}

size_t CpuBackend::current_memory_bytes() const { return memory_->current.load(); }
size_t CpuBackend::peak_memory_bytes() const { return memory_->peak.load(); }
void CpuBackend::reset_peak_memory() { memory_->peak.store(memory_->current.load()); }

void CpuBackend::write(Tensor& dst, const std::vector<float>& values) {
  require_host(dst, "write", "dst");
  require(int64_t(values.size()) == dst.numel(), "write",
          "got " + std::to_string(values.size()) + " values for " + dst.describe());
  convert_elements(DType::f32, values.data(), dst.dtype, dst.data, dst.numel(), "write");
}

void CpuBackend::write_i32(Tensor& dst, const std::vector<int32_t>& values) {
  require_i32(dst, "write_i32", "dst");
  require(int64_t(values.size()) == dst.numel(), "write_i32",
          "got " + std::to_string(values.size()) + " values for " + dst.describe());
  convert_elements(DType::i32, values.data(), DType::i32, dst.data, dst.numel(), "write_i32");
}

std::vector<float> CpuBackend::read(const Tensor& src) {
  require_host(src, "read", "src");
  std::vector<float> out(size_t(src.numel()));
  convert_elements(src.dtype, src.data, DType::f32, out.data(), src.numel(), "read");
  return out;
}

std::vector<int32_t> CpuBackend::read_i32(const Tensor& src) {
  require_i32(src, "read_i32", "src");
  std::vector<int32_t> out(size_t(src.numel()));
  convert_elements(DType::i32, src.data, DType::i32, out.data(), src.numel(), "read_i32");
  return out;
}

}  // namespace moelab
