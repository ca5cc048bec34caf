// Benchmark of the MoE routing work of one MoE layer and one micro-batch on the GPU: the router
// matmul, scores + top-k, the dispatch plan, the balance terms (balance loss, router statistics),
// the router backward with its two matmuls, and the aux-loss-free bias update, each recorded in a
// CUDA graph and replayed, as a training step runs them. Prints the median of 50 CUDA-event-timed
// replays (after 5 warm-ups) for each piece alone and for the whole chain, for several router
// settings, so their share of a step (bench/RESULTS.md's step times) can be read off.
// Shapes: the seed's (d_model 768, 8 experts top-2, 16 x 1024 tokens) and a fine-grained one
// (d_model 1024, 64 experts top-8, expert hidden 512, 8 x 2048 tokens); or pass
// `bench_routing D,E,k,rows,seq ...`. Before timing, the chain's outputs are checked finite and
// the top-k choices of the first 512 tokens against the CPU reference (exit status 1 on failure).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "bench_timing.hpp"
#include "core/dtype.hpp"
#include "core/rng.hpp"

using namespace moelab;

namespace {

struct RoutingShape {
  int D, E, k, rows, seq;
};

struct Variant {
  const char* name;
  RouterScore score;
  bool norm_topk;
  float route_scale;
  bool aux_free, sequence_scope;
  float z_coef;
  int groups, topk_groups;
};

std::vector<float> randn(Rng& rng, size_t n, float scale) {
  std::vector<float> v(n);
  for (auto& x : v) x = round_to_bf16(float(rng.normal()) * scale);
  return v;
}

int run_shape(CudaBackend& be, const RoutingShape& s) {
  const int64_t T = int64_t(s.rows) * s.seq, E = s.E, D = s.D;
  const int k = s.k;
  Rng rng(uint64_t(s.D) * 131 + uint64_t(s.E));
  Tensor xn = be.alloc({T, D}, DType::bf16), w = be.alloc({E, D}, DType::bf16);
  be.write(xn, randn(rng, size_t(T * D), 1.0f));
  be.write(w, randn(rng, size_t(E * D), 1.0f / std::sqrt(float(D))));
  Tensor logits = be.alloc({T, E}, DType::f32), probs = be.alloc({T, E}, DType::f32);
  Tensor idx = be.alloc({T, k}, DType::i32), gates = be.alloc({T, k}, DType::f32);
  Tensor routed = be.alloc({E}, DType::i32), counts = be.alloc({E}, DType::i32), offsets = be.alloc({E + 1}, DType::i32);
  Tensor slot = be.alloc({T * k}, DType::i32), row_token = be.alloc({T * k}, DType::i32);
  Tensor bal = be.alloc({1}, DType::f32), acc = be.alloc({2}, DType::f32), load = be.alloc({E}, DType::f32);
  Tensor bias = be.alloc({E}, DType::f32), dgates = be.alloc({T, k}, DType::f32);
  Tensor dlogits = be.alloc({T, E}, DType::f32), dl_act = be.alloc({T, E}, DType::bf16);
  Tensor dxn = be.alloc({T, D}, DType::bf16), dw = be.alloc({E, D}, DType::f32);
  be.fill(bias, 0.0f);
  be.fill(acc, 0.0f);
  be.fill(load, 0.0f);
  be.fill(dw, 0.0f);
  be.fill(dxn, 0.0f);
  std::vector<float> dg(size_t(T * k));
  for (auto& x : dg) x = float(rng.normal()) * 0.01f;
  be.write(dgates, dg);

  const Variant variants[] = {
      {"softmax, aux_loss (default)", RouterScore::softmax, true, 1.0f, false, false, 0.0f, 1, 1},
      {"softmax, aux_loss, z-loss", RouterScore::softmax, true, 1.0f, false, false, 0.001f, 1, 1},
      {"softmax, aux_loss per sequence", RouterScore::softmax, true, 1.0f, false, true, 0.0f, 1, 1},
      {"sigmoid, aux_free, scale 2.5", RouterScore::sigmoid, true, 2.5f, true, false, 0.0f, 1, 1},
      {"sigmoid, aux_free, groups E/8 keep half", RouterScore::sigmoid, true, 2.5f, true, false, 0.0f,
       s.E >= 16 ? 8 : 1, s.E >= 16 ? 4 : 1},
  };
  std::printf("\nshape: d_model %d, %d experts top-%d, %d x %d = %lld tokens (one MoE layer, one micro-batch)\n", s.D,
              s.E, s.k, s.rows, s.seq, (long long)T);
  std::printf("%-42s %9s %9s %9s %9s %9s %9s %9s | %9s\n", "variant (median us)", "matmul", "topk", "plan", "balance",
              "stats", "bwd", "bias", "chain");
  int failures = 0;
  for (const Variant& v : variants) {
    RouterSpec spec;
    spec.score = v.score;
    spec.k = k;
    spec.norm_topk = v.norm_topk;
    spec.route_scale = v.route_scale;
    spec.groups = v.groups;
    spec.topk_groups = v.topk_groups;
    BalanceSpec bs;
    bs.score = v.score;
    bs.coef = v.aux_free ? 0.0f : 0.01f;
    bs.grad_scale = 1.0f;
    bs.seq_len = v.sequence_scope ? s.seq : 0;
    bs.z_coef = v.z_coef;
    const Tensor* b = v.aux_free ? &bias : nullptr;
    std::vector<std::function<void()>> pieces = {
        [&] { be.matmul(xn, false, w, true, logits); },
        [&] { be.router_topk(logits, spec, b, probs, idx, gates); },
        [&] { be.moe_plan(idx, s.E, 0, routed, counts, offsets, slot, row_token); },
        [&] {
          if (!v.aux_free) be.balance_loss(probs, idx, routed, bs, bal);
        },
        [&] { be.router_stats(logits, probs, v.score, acc); },
        [&] {
          be.router_bwd(logits, probs, idx, gates, dgates, routed, spec, bs, dlogits);
          be.copy(dlogits, dl_act);
          be.matmul(dl_act, false, w, false, dxn, 1.0f, 1.0f);
          be.matmul(dl_act, true, xn, false, dw, 1.0f, 1.0f);
        },
        [&] {
          if (v.aux_free) {
            be.copy(routed, load);
            be.router_bias_update(load, 0.001f, bias);
          }
        },
    };
    auto chain = [&] {
      for (auto& p : pieces) p();
    };
    chain();  // eager: sizes the scratch buffers before any capture
    be.synchronize();
    // Checks: finite outputs, and the first 512 tokens' choices as the CPU routes them.
    {
      const auto g = be.read(gates), dl = be.read(dlogits);
      bool finite = std::isfinite(be.read(bal)[0]);
      for (float x : g) finite = finite && std::isfinite(x);
      for (float x : dl) finite = finite && std::isfinite(x);
      const int64_t Tc = std::min<int64_t>(T, 512);
      CpuBackend cpu(DType::f32, 1);
      Tensor cl = cpu.alloc({Tc, E}, DType::f32), cp = cpu.alloc({Tc, E}, DType::f32);
      Tensor ci = cpu.alloc({Tc, k}, DType::i32), cg = cpu.alloc({Tc, k}, DType::f32), cb = cpu.alloc({E}, DType::f32);
      const auto lv = be.read(logits);
      cpu.write(cl, std::vector<float>(lv.begin(), lv.begin() + Tc * E));
      cpu.write(cb, be.read(bias));
      cpu.router_topk(cl, spec, b ? &cb : nullptr, cp, ci, cg);
      const auto gi = be.read_i32(idx), cidx = cpu.read_i32(ci);
      int64_t differ = 0;
      for (int64_t i = 0; i < Tc * k; ++i) differ += gi[size_t(i)] != cidx[size_t(i)];
      if (!finite || differ > 0) {
        std::printf("  CHECK FAILED for %s: %s, %lld of %lld choices differ from the CPU\n", v.name,
                    finite ? "finite" : "non-finite output", (long long)differ, (long long)(Tc * k));
        ++failures;
      }
    }
    std::vector<double> us;
    for (auto& p : pieces) {
      CudaGraph g(be);
      g.capture(p);
      us.push_back(1e3 * median_event_ms(be.stream(), [&] { g.replay(); }, 5, 50));
    }
    CudaGraph whole(be);
    whole.capture(chain);
    const double chain_us = 1e3 * median_event_ms(be.stream(), [&] { whole.replay(); }, 5, 50);
    std::printf("%-42s", v.name);
    for (double u : us) std::printf(" %9.1f", u);
    std::printf(" | %9.1f\n", chain_us);
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (!CudaBackend::cuda_device_available()) {
    std::printf("no CUDA GPU on this machine\n");
    return 0;
  }
  std::vector<RoutingShape> shapes;
  for (int i = 1; i < argc; ++i) {
    RoutingShape s{};
    if (std::sscanf(argv[i], "%d,%d,%d,%d,%d", &s.D, &s.E, &s.k, &s.rows, &s.seq) != 5) {
      std::fprintf(stderr, "usage: bench_routing [D,E,k,rows,seq ...]\n");
      return 2;
    }
    shapes.push_back(s);
  }
  if (shapes.empty()) shapes = {{768, 8, 2, 16, 1024}, {1024, 64, 8, 8, 2048}};
  CudaBackend be;
  std::printf("bench_routing on %s\n", be.name().c_str());
  int failures = 0;
  for (const RoutingShape& s : shapes) failures += run_shape(be, s);
  return failures ? 1 : 0;
}
