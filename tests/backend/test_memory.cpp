// Allocation: 64-byte alignment, current/peak byte accounting as tensors (and views of them)
// come and go, reset_peak_memory, and tensors that outlive their backend.
#include <thread>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(Memory, AlignedAndCounted) {
  CpuBackend be(DType::f32, 2);
  const size_t base = be.current_memory_bytes();
  be.reset_peak_memory();
  {
    Tensor a = be.alloc({100}, DType::f32);  // 400 bytes
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data) % 64, 0u);
    Tensor b = be.alloc({3, 7}, DType::f64);  // 168 bytes
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data) % 64, 0u);
    EXPECT_EQ(be.current_memory_bytes(), base + 568);
    EXPECT_EQ(be.peak_memory_bytes(), base + 568);
    Tensor view = a.view({10, 10});  // a view keeps the allocation alive
    a = Tensor{};
    EXPECT_EQ(be.current_memory_bytes(), base + 568);
    view = Tensor{};
    EXPECT_EQ(be.current_memory_bytes(), base + 168);
    Tensor c = be.alloc({10}, DType::bf16);  // 20 bytes; peak stays at 568
    EXPECT_EQ(be.peak_memory_bytes(), base + 568);
    be.reset_peak_memory();
    EXPECT_EQ(be.peak_memory_bytes(), base + 188);
  }
  EXPECT_EQ(be.current_memory_bytes(), base);
  EXPECT_EQ(be.peak_memory_bytes(), base + 188);
}

TEST(Memory, CountsAllocationsFromManyThreads) {
  CpuBackend be(DType::f32, 1);
  be.reset_peak_memory();
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] {
      for (int j = 0; j < 500; ++j) {
        Tensor t = be.alloc({64}, DType::f32);
        t.as<float>()[0] = 1.0f;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(be.current_memory_bytes(), 0u);
  EXPECT_GE(be.peak_memory_bytes(), 256u);
  EXPECT_LE(be.peak_memory_bytes(), 4 * 256u);
}

TEST(Memory, TensorMayOutliveBackend) {
  Tensor t;
  {
    CpuBackend be(DType::f32, 2);
    t = be.alloc({1000}, DType::f32);
    be.fill(t, 2.0f);
  }
  EXPECT_EQ(t.as<float>()[999], 2.0f);
  t = Tensor{};  // the deleter must not touch the destroyed backend
}

TEST(Memory, RejectsUnsupportedMasterDtype) {
  EXPECT_THROW(CpuBackend(DType::bf16, 1), Error);
}

}  // namespace
}  // namespace moelab::test
