// The op table on the GPU: every row's CUDA outputs against the CPU reference (f32), the rows of
// tests/ops/op_cases.cpp run by the same runner the CPU's f32-against-f64 run validates. Rows
// tagged "attention" run on both tensor-core paths (automatic: cuDNN where it plans the shape;
// and the own kernels forced). Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <memory>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "ops/op_harness.hpp"
#include "ops/op_names.hpp"

namespace moelab::ops {
namespace {

class OpTableCuda : public ::testing::TestWithParam<size_t> {};

TEST_P(OpTableCuda, AgainstCpu) {
  if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
  const OpCase& row = op_cases()[GetParam()];
  if (row.tags.find("cpu") != std::string::npos) GTEST_SKIP() << "a shape only the CPU backend takes";
  static std::unique_ptr<CudaBackend> gpu = std::make_unique<CudaBackend>();  // one context for every row
  device_bytes() = [](const Tensor& t) {  // FP8 codes: CudaBackend::read has no FP8 decode
    std::vector<uint8_t> out(t.bytes());
    gpu->synchronize();
    if (cudaMemcpy(out.data(), t.data, t.bytes(), cudaMemcpyDeviceToHost) != cudaSuccess)
      throw Error("op table: reading " + t.describe() + " back failed");
    return out;
  };
  CpuBackend cpu(DType::f32, 2);
  if (row.tags.find("attention") == std::string::npos) return run_case(row, *gpu, cpu);
  using AK = CudaBackend::AttentionKernels;
  for (const AK path : {AK::automatic, AK::flash}) {
    SCOPED_TRACE(path == AK::flash ? "own attention kernels" : "automatic attention path");
    gpu->set_attention_kernels(path);
    run_case(row, *gpu, cpu);
  }
  gpu->set_attention_kernels(AK::automatic);
}

INSTANTIATE_TEST_SUITE_P(Rows, OpTableCuda, ::testing::Range(size_t(0), op_cases().size()), row_name);

}  // namespace
}  // namespace moelab::ops
