// The op table on the CPU: every row's f32 outputs against the same op at f64, plus the oracle
// checks only an f64 reference allows (backwards against finite differences, forwards against
// naive references). This validates the machinery the CUDA run (tests/cuda) uses on the device.
#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.hpp"
#include "ops/op_harness.hpp"
#include "ops/op_names.hpp"

namespace moelab::ops {
namespace {

class OpTable : public ::testing::TestWithParam<size_t> {};

TEST_P(OpTable, CpuF32AgainstF64) {
  CpuBackend test(DType::f32, 2), ref(DType::f64, 2);
  run_case(op_cases()[GetParam()], test, ref);
}

INSTANTIATE_TEST_SUITE_P(Rows, OpTable, ::testing::Range(size_t(0), op_cases().size()), row_name);

}  // namespace
}  // namespace moelab::ops
