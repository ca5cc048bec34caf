// The CPU backend refuses arguments that do not fit, with moelab::Error (the message names the op
// and the argument): shapes that disagree, dtypes that differ, indices outside their range.
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(Matmul, RejectsMismatchedShapes) {
  CpuBackend be(DType::f32, 1);
  Tensor A = be.alloc({4, 5}, DType::f32), B = be.alloc({6, 3}, DType::f32);
  Tensor C = be.alloc({4, 3}, DType::f32);
  EXPECT_THROW(be.matmul(A, false, B, false, C), Error);
  Tensor Bd = be.alloc({5, 3}, DType::f64);
  EXPECT_THROW(be.matmul(A, false, Bd, false, C), Error);
}

TEST(Attention, RejectsHeadCountNotDivisible) {
  CpuBackend be(DType::f32, 1);
  Tensor q = be.alloc({1, 4, 3, 8}, DType::f32), k = be.alloc({1, 4, 2, 8}, DType::f32);
  Tensor out = be.alloc(q.shape, DType::f32), lse = be.alloc({1, 3, 4}, DType::f32);
  EXPECT_THROW(be.attention_fwd(q, k, k, out, lse), Error);
}

TEST(RopeNorm, RejectsSequenceLongerThanTable) {
  CpuBackend be(DType::f32, 1);
  Tensor x = be.alloc({1, 9, 1, 4}, DType::f32), c = be.alloc({8, 2}, DType::f32), s = be.alloc({8, 2}, DType::f32);
  be.fill(c, 1.0f);
  be.fill(s, 0.0f);
  Tensor y = be.alloc(x.shape, DType::f32), rstd = be.alloc({1, 9, 1}, DType::f32);
  EXPECT_THROW(be.rope_norm_fwd(x, c, s, y, rstd), Error);
}

TEST(SoftcapXent, RejectsTargetOutsideVocab) {
  CpuBackend be(DType::f32, 1);
  Tensor logits = be.alloc({1, 4}, DType::f32), losses = be.alloc({1}, DType::f32);
  be.fill(logits, 0.0f);
  Tensor targets = i32_tensor(be, {1}, {4});
  EXPECT_THROW(be.softcap_xent(logits, targets, 15.0f, 1.0f, losses, logits), Error);
}

TEST(Embedding, RejectsTokenOutsideVocab) {
  CpuBackend be(DType::f32, 1);
  Tensor tokens = i32_tensor(be, {2}, {0, 5});
  Tensor wte = be.alloc({5, 3}, DType::f32), out = be.alloc({2, 3}, DType::f32);
  EXPECT_THROW(be.embedding_fwd(tokens, wte, out), Error);
}

}  // namespace
}  // namespace moelab::test
