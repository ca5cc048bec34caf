// Embedding lookup and its scatter-add backward with repeated tokens, against naive loops.
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(Embedding, ForwardGathersAndBackwardScatterAdds) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t V = 10, D = 7, N = 40;
  std::vector<int32_t> tok;
  for (int64_t n = 0; n < N; ++n) tok.push_back(int32_t(rng.below(V / 2)));  // many repeats
  Tensor tokens = i32_tensor(be, {N}, tok);
  Tensor wte = random_tensor(be, {V, D}, rng), out = be.alloc({N, D}, DType::f64);
  be.embedding_fwd(tokens, wte, out);
  const auto wv = values(wte);
  std::vector<double> ref;
  for (int32_t t : tok)
    for (int64_t i = 0; i < D; ++i) ref.push_back(wv[size_t(t * D + i)]);
  EXPECT_EQ(values(out), ref);

  Tensor dout = random_tensor(be, {N, D}, rng), dwte = random_tensor(be, {V, D}, rng);
  auto expect = values(dwte);
  const auto gv = values(dout);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < D; ++i) expect[size_t(tok[size_t(n)] * D + i)] += gv[size_t(n * D + i)];
  be.embedding_bwd(tokens, dout, dwte);
  EXPECT_LT(normalized_error(values(dwte), expect), 1e-15);
}

TEST(Embedding, RejectsTokenOutsideVocab) {
  CpuBackend be(DType::f32, 1);
  Tensor tokens = i32_tensor(be, {2}, {0, 5});
  Tensor wte = be.alloc({5, 3}, DType::f32), out = be.alloc({2, 3}, DType::f32);
  EXPECT_THROW(be.embedding_fwd(tokens, wte, out), Error);
}

}  // namespace
}  // namespace moelab::test
