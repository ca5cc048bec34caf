// Determinism: a mix of ops on sizes large enough to be split over threads gives bit-identical
// outputs when run twice, and with 1, 2 or 3 threads (each output element is computed by one
// thread in a fixed order; reductions use fixed chunks).
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

// Runs the ops on inputs drawn from seed and returns every output's bytes.
std::vector<std::vector<unsigned char>> run_ops(CpuBackend& be, uint64_t seed) {
  Rng rng(seed);
  std::vector<std::vector<unsigned char>> outs;
  auto keep = [&](const Tensor& t) {
    const auto* p = static_cast<const unsigned char*>(t.data);
    outs.emplace_back(p, p + t.bytes());
  };
  const DType dt = be.master_dtype();
  {
    Tensor A = random_tensor(be, {300, 260}, rng), B = random_tensor(be, {200, 260}, rng);
    Tensor C = random_tensor(be, {300, 200}, rng);
    be.matmul(A, false, B, true, C, 0.7f, 0.3f);
    keep(C);
    Tensor D = be.alloc({260, 260}, dt);
    be.matmul(A, true, A, false, D);
    keep(D);
  }
  {
    Tensor q = random_tensor(be, {2, 40, 4, 16}, rng), k = random_tensor(be, {2, 40, 2, 16}, rng),
           v = random_tensor(be, {2, 40, 2, 16}, rng);
    Tensor out = be.alloc(q.shape, dt), lse = be.alloc({2, 4, 40}, dt);
    be.attention_fwd(q, k, v, out, lse);
    Tensor dout = random_tensor(be, q.shape, rng);
    Tensor dq = be.alloc(q.shape, dt), dk = be.alloc(k.shape, dt), dv = be.alloc(v.shape, dt);
    be.attention_bwd(q, k, v, out, lse, dout, dq, dk, dv);
    for (const Tensor* t : {&out, &lse, &dq, &dk, &dv}) keep(*t);
  }
  {
    Tensor x = random_tensor(be, {512, 96}, rng), y = be.alloc(x.shape, dt), r = be.alloc({512}, dt);
    be.rmsnorm_fwd(x, y, r);
    Tensor dy = random_tensor(be, x.shape, rng), dx = be.alloc(x.shape, dt);
    be.rmsnorm_bwd(x, r, dy, dx, false);
    keep(y);
    keep(dx);
  }
  {
    Tensor logits = random_tensor(be, {128, 500}, rng, 10.0);
    std::vector<int32_t> tg;
    for (int i = 0; i < 128; ++i) tg.push_back(int32_t(rng.below(500)));
    Tensor targets = i32_tensor(be, {128}, tg), losses = be.alloc({128}, dt);
    be.softcap_xent(logits, targets, 15.0f, 1.0f / 128, losses, logits);
    keep(losses);
    keep(logits);
  }
  {
    const int64_t T = 2000, E = 8, D = 32;
    Tensor logits = random_tensor(be, {T, E}, rng), probs = be.alloc({T, E}, dt),
           idx = be.alloc({T, 2}, DType::i32), gates = be.alloc({T, 2}, dt);
    be.router_topk(logits, 2, probs, idx, gates);
    Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32),
           offsets = be.alloc({E + 1}, DType::i32), slot = be.alloc({T * 2}, DType::i32),
           row_token = be.alloc({T * 2}, DType::i32);
    be.moe_plan(idx, int(E), 0, routed, counts, offsets, slot, row_token);
    Tensor x = random_tensor(be, {T, D}, rng), xp = be.alloc({T * 2, D}, dt);
    be.moe_permute(x, row_token, offsets, xp);
    Tensor W = random_tensor(be, {E, 48, D}, rng), h = be.alloc({T * 2, 48}, dt);
    be.grouped_matmul(xp, W, true, h, offsets);
    Tensor dW = be.alloc({E, 48, D}, dt);
    be.grouped_matmul_wgrad(h, xp, dW, offsets, 0.0f);
    Tensor y = be.alloc({T, D}, dt);
    be.moe_combine(xp, slot, gates, y, false);
    Tensor dgates = be.alloc({T, 2}, dt), dyp = be.alloc({T * 2, D}, dt);
    be.moe_combine_bwd(y, xp, slot, gates, dyp, dgates);
    Tensor dlogits = be.alloc({T, E}, dt);
    be.router_bwd(probs, idx, gates, dgates, routed, 0.01f, 1.0f, dlogits);
    for (const Tensor* t : {&probs, &gates, &h, &dW, &y, &dyp, &dgates, &dlogits}) keep(*t);
  }
  {
    std::vector<int32_t> tok;
    for (int i = 0; i < 3000; ++i) tok.push_back(int32_t(rng.below(50)));
    Tensor tokens = i32_tensor(be, {3000}, tok), dout = random_tensor(be, {3000, 64}, rng);
    Tensor dwte = be.alloc({50, 64}, dt);
    be.fill(dwte, 0.0f);
    be.embedding_bwd(tokens, dout, dwte);
    keep(dwte);
    Tensor ss = be.alloc({1}, dt), s = be.alloc({1}, dt);
    be.sum_squares(dout, ss, false);
    be.sum(dout, s, false);
    keep(ss);
    keep(s);
  }
  return outs;
}

TEST(Determinism, SameBitsTwiceAndForAnyThreadCount) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (DType dt : {DType::f32, DType::f64}) {
    CpuBackend one(dt, 1), two(dt, 2), three(dt, 3);
    const auto ref = run_ops(one, seed);
    EXPECT_EQ(run_ops(one, seed), ref) << dtype_name(dt) << ": twice on one thread";
    const auto r2 = run_ops(two, seed);
    EXPECT_EQ(run_ops(two, seed), r2) << dtype_name(dt) << ": twice on two threads";
    ASSERT_EQ(r2.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(r2[i], ref[i]) << dtype_name(dt) << " output " << i << ": 1 vs 2 threads";
    const auto r3 = run_ops(three, seed);
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(r3[i], ref[i]) << dtype_name(dt) << " output " << i << ": 1 vs 3 threads";
  }
}

// The residual mix and value gate ops on their own, with 1 and 3 threads.
TEST(ValueGate, SameBitsForAnyThreadCount) {
  Rng rng(fresh_seed());
  const int64_t N = 300, D = 64, H = 4, C = 32, hd = 16;
  std::vector<std::vector<double>> outs;
  for (int threads : {1, 3}) {
    CpuBackend be(DType::f32, threads);
    Rng r = rng;  // same inputs for both
    Tensor x = random_tensor(be, {N, D}, r), w = random_tensor(be, {H, C}, r), ve = random_tensor(be, {N, H * hd}, r);
    Tensor v = random_tensor(be, {N, H * hd}, r), gate = be.alloc({N, H}, DType::f32);
    be.value_gate_fwd(x, w, ve, v, gate);
    Tensor dv = random_tensor(be, {N, H * hd}, r), dve = be.alloc({N, H * hd}, DType::f32);
    Tensor dw = random_tensor(be, {H, C}, r), dx = random_tensor(be, {N, D}, r);
    be.value_gate_bwd(x, w, ve, gate, dv, dve, dw, dx);
    Tensor a = random_tensor(be, {1}, r), b = random_tensor(be, {1}, r), da = random_tensor(be, {1}, r);
    Tensor db = random_tensor(be, {1}, r), dx0 = random_tensor(be, {N, D}, r);
    be.lambda_mix_bwd(a, x, b, ve.view({N, D}), dx, dx, dx0, da, db);
    std::vector<double> all;
    for (const Tensor* t : {&v, &gate, &dve, &dw, &dx, &dx0, &da, &db}) {
      auto vals = values(*t);
      all.insert(all.end(), vals.begin(), vals.end());
    }
    outs.push_back(all);
  }
  EXPECT_EQ(outs[0], outs[1]);
}

}  // namespace
}  // namespace moelab::test
