// CudaBackend's device, stream, memory and host-transfer parts, and the CudaGraph helper. Kernel
// ops live in the .cu files named after their concern (elementwise, norms, attention, ...).
#include "backend/cuda/cuda_backend.hpp"
#include "backend/devices.hpp"

#include <cuda_profiler_api.h>

#include <cstring>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/cuda_memory.hpp"
#include "backend/cuda/gemm_cache.hpp"

namespace moelab {

bool CudaBackend::cuda_device_available() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

CudaBackend::CudaBackend(int device_index) : device_index_(device_index) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    cudaGetLastError();
    throw Error(std::string("device = \"cuda\" but no CUDA GPU is usable (") +
                (e != cudaSuccess ? cudaGetErrorString(e) : "no device found") +
                "): run on a machine with an NVIDIA GPU and driver, or set device = \"cpu\"");
  }
  if (device_index < 0 || device_index >= n)
    throw Error("cuda backend: device index " + std::to_string(device_index) + " out of range (" +
                std::to_string(n) + " GPUs)");
  MOELAB_CUDA_CHECK(cudaSetDevice(device_index));
  cudaDeviceProp prop{};
  MOELAB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_index));
  if (prop.major < 9)
    throw Error(std::string("cuda backend: ") + prop.name + " has compute capability " +
                std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                "; this build targets sm_90a (Hopper: H100/H200)");
  name_ = prop.name;
  sm_count_ = prop.multiProcessorCount;
  MOELAB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  memory_ = std::make_unique<CudaMemory>();
  gemm_ = std::make_unique<GemmCache>();
  MOELAB_CUBLAS_CHECK(cublasLtCreate(&gemm_->handle));
  gemm_->workspace_bytes = size_t(64) << 20;
  gemm_->workspace = memory_->allocate(gemm_->workspace_bytes);
  scratch_.resize(size_t(ScratchSlot::count));
  scratch_bytes_.assign(size_t(ScratchSlot::count), 0);
}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  scratch_.clear();
  gemm_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

Tensor CudaBackend::alloc(const Shape& shape, DType dtype) {
  Tensor t;
  t.shape = shape;
  t.dtype = dtype;
  t.device = Device::cuda;
  for (auto d : shape)
    if (d < 0) throw Error("cuda backend: alloc of negative shape " + shape_str(shape));
  t.storage = memory_->allocate(t.bytes());
  t.data = t.storage.get();
  return t;
}

size_t CudaBackend::current_memory_bytes() const { return memory_->current_bytes(); }
size_t CudaBackend::peak_memory_bytes() const { return memory_->peak_bytes(); }
void CudaBackend::reset_peak_memory() { memory_->reset_peak(); }
std::optional<size_t> CudaBackend::free_device_memory() const {
  size_t free_bytes = 0, total_bytes = 0;
  MOELAB_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return free_bytes;
}
void CudaBackend::synchronize() { MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void CudaBackend::profiler_range(bool start) {
  synchronize();
  MOELAB_CUDA_CHECK(start ? cudaProfilerStart() : cudaProfilerStop());
}

void* CudaBackend::scratch(ScratchSlot slot, size_t bytes) {
  size_t i = size_t(slot);
  if (bytes <= scratch_bytes_[i] && scratch_[i]) return scratch_[i].get();
  if (capturing_)
    throw Error("cuda backend: scratch buffer " + std::to_string(i) + " must grow to " +
                std::to_string(bytes) +
                " bytes during graph capture; run the step once eagerly before capturing");
  size_t grown = std::max(bytes, scratch_bytes_[i] + scratch_bytes_[i] / 2);
  // The old buffer may still be read by queued work: wait before letting it go.
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream_));
  scratch_[i] = memory_->allocate(grown);
  scratch_bytes_[i] = grown;
  return scratch_[i].get();
}

// --- host transfers (synchronous; used at start-up, for batches and for reading results) -------

void CudaBackend::write(Tensor& dst, const std::vector<float>& values) {
  if (dst.device != Device::cuda) throw Error("cuda backend: write to a non-GPU tensor " + dst.describe());
  if (int64_t(values.size()) != dst.numel())
    throw Error("cuda backend: write of " + std::to_string(values.size()) + " values into " + dst.describe());
  std::vector<unsigned char> host(dst.bytes());
  switch (dst.dtype) {
    case DType::f32: std::memcpy(host.data(), values.data(), dst.bytes()); break;
    case DType::bf16: {
      auto* h = reinterpret_cast<uint16_t*>(host.data());
      for (size_t i = 0; i < values.size(); ++i) h[i] = f32_to_bf16_bits(values[i]);
      break;
    }
    case DType::i32: {
      auto* h = reinterpret_cast<int32_t*>(host.data());
      for (size_t i = 0; i < values.size(); ++i) h[i] = int32_t(values[i]);
      break;
    }
    default: throw Error("cuda backend: write to unsupported dtype " + dst.describe());
  }
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(dst.data, host.data(), dst.bytes(), cudaMemcpyHostToDevice, stream_));
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::write_i32(Tensor& dst, const std::vector<int32_t>& values) {
  if (dst.device != Device::cuda || dst.dtype != DType::i32 || int64_t(values.size()) != dst.numel())
    throw Error("cuda backend: write_i32 of " + std::to_string(values.size()) + " values into " + dst.describe());
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(dst.data, values.data(), dst.bytes(), cudaMemcpyHostToDevice, stream_));
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::vector<float> CudaBackend::read(const Tensor& src) {
  if (src.device != Device::cuda) throw Error("cuda backend: read of a non-GPU tensor " + src.describe());
  std::vector<unsigned char> host(src.bytes());
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(host.data(), src.data, src.bytes(), cudaMemcpyDeviceToHost, stream_));
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<float> out(size_t(src.numel()));
  switch (src.dtype) {
    case DType::f32: std::memcpy(out.data(), host.data(), src.bytes()); break;
    case DType::bf16: {
      auto* h = reinterpret_cast<const uint16_t*>(host.data());
      for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_bits_to_f32(h[i]);
      break;
    }
    case DType::i32: {
      auto* h = reinterpret_cast<const int32_t*>(host.data());
      for (size_t i = 0; i < out.size(); ++i) out[i] = float(h[i]);
      break;
    }
    default: throw Error("cuda backend: read of unsupported dtype " + src.describe());
  }
  return out;
}

std::vector<int32_t> CudaBackend::read_i32(const Tensor& src) {
  if (src.device != Device::cuda || src.dtype != DType::i32)
    throw Error("cuda backend: read_i32 of " + src.describe());
  std::vector<int32_t> out(size_t(src.numel()));
  MOELAB_CUDA_CHECK(cudaMemcpyAsync(out.data(), src.data, src.bytes(), cudaMemcpyDeviceToHost, stream_));
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

// --- CudaGraph ----------------------------------------------------------------------------------

bool cuda_device_available() { return CudaBackend::cuda_device_available(); }

std::unique_ptr<Backend> make_cuda_backend(int device_index) { return std::make_unique<CudaBackend>(device_index); }

bool CudaBackend::supports(const Capability& c) const {
  switch (c.kind) {
    case Capability::Kind::graph_capture: return true;
    case Capability::Kind::compute_dtype: return c.dtype == DType::bf16;
    case Capability::Kind::attention: return fast_attention_head_dim(int(c.size));
    case Capability::Kind::fp8_scaling: return true;
    case Capability::Kind::expert_parallel: return false;
  }
  return false;
}

std::unique_ptr<CapturedGraph> CudaBackend::make_graph() { return std::make_unique<CudaGraph>(*this); }

CudaGraph::~CudaGraph() {
  if (exec_) cudaGraphExecDestroy(exec_);
  if (graph_) cudaGraphDestroy(graph_);
}

void CudaGraph::capture(const std::function<void()>& body) {
  if (exec_) {
    cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
  }
  if (graph_) {
    cudaGraphDestroy(graph_);
    graph_ = nullptr;
  }
  cudaStream_t s = backend_.stream();
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(s));
  MOELAB_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  backend_.begin_capture();
  try {
    body();
  } catch (...) {
    backend_.end_capture();
    cudaGraph_t broken = nullptr;
    cudaStreamEndCapture(s, &broken);
    if (broken) cudaGraphDestroy(broken);
    cudaGetLastError();
    throw;
  }
  backend_.end_capture();
  MOELAB_CUDA_CHECK(cudaStreamEndCapture(s, &graph_));
  MOELAB_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
}

void CudaGraph::recapture(const std::function<void()>& body) {
  if (!exec_) {
    capture(body);
    return;
  }
  // No synchronization: the stream may still be running earlier work (the forward/backward
  // graph) while the host records this body; recording launches nothing.
  cudaStream_t s = backend_.stream();
  MOELAB_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  backend_.begin_capture();
  cudaGraph_t fresh = nullptr;
  try {
    body();
  } catch (...) {
    backend_.end_capture();
    cudaStreamEndCapture(s, &fresh);
    if (fresh) cudaGraphDestroy(fresh);
    cudaGetLastError();
    throw;
  }
  backend_.end_capture();
  MOELAB_CUDA_CHECK(cudaStreamEndCapture(s, &fresh));
  cudaGraphExecUpdateResultInfo info{};
  if (cudaGraphExecUpdate(exec_, fresh, &info) != cudaSuccess) {
    // The topology changed (it should not for the same body): instantiate from scratch.
    cudaGetLastError();
    MOELAB_CUDA_CHECK(cudaGraphExecDestroy(exec_));
    exec_ = nullptr;
    MOELAB_CUDA_CHECK(cudaGraphInstantiate(&exec_, fresh, 0));
  }
  if (graph_) cudaGraphDestroy(graph_);
  graph_ = fresh;
}

void CudaGraph::replay() {
  if (!exec_) throw Error("CudaGraph::replay before capture");
  MOELAB_CUDA_CHECK(cudaGraphLaunch(exec_, backend_.stream()));
}

}  // namespace moelab
