// Kernel lab: grouped BF16 GEMM benchmark at the seed's MoE shape: 8 experts x 8192 rows (or the
// rows BENCH_EXPERT_ROWS gives), 768 -> 1536 (up) and 1536 -> 768 (down), each as forward, data
// gradient and weight gradient. Each grouped GEMM
// is timed against one cuBLASLt GEMM of the same total size measured in the same run, and checked
// against per-expert cuBLASLt GEMMs on the same random inputs. The forward is also timed with the
// earlier kernels (v1 mma.sync, v2 wgmma fed by cp.async, v3 one TMA tile per block; the variants
// are in grouped_gemm_variants.cu) to show what each step gains; the backend runs v3's
// persistent form. Also times the attention kernels
// at the seed shape for reference. Prints a table (median of many CUDA-event-timed runs).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/grouped_gemm.cuh"
#include "grouped_gemm_variants.cuh"
#include "bench_timing.hpp"
#include "core/rng.hpp"
#include "bench_check.hpp"

using namespace moelab;

namespace {

double median_ms(CudaBackend& be, const std::function<void()>& fn, int warmup = 5, int reps = 50) {
  return median_event_ms(be.stream(), fn, warmup, reps);
}


void fill_random(CudaBackend& be, Tensor& t, Rng& rng, float scale) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  for (auto& x : v) x = float(rng.normal()) * scale;
  be.write(t, v);
}

}  // namespace

int main(int argc, char** argv) {
  if (!CudaBackend::cuda_device_available()) {
    std::fprintf(stderr, "bench_grouped_gemm: no CUDA GPU\n");
    return 1;
  }
  CudaBackend be;
  Rng rng(uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()));
  // Rows per expert: 8192 each, or BENCH_EXPERT_ROWS="r0,r1,...,r7" (a training step's uneven
  // routing, e.g. its expert loads at the seed shape).
  const int E = 8;
  std::vector<int32_t> off(E + 1, 0);
  {
    const char* env = std::getenv("BENCH_EXPERT_ROWS");
    std::vector<int32_t> rows;
    for (const char* p = env; p && *p;) {
      char* end = nullptr;
      const long v = std::strtol(p, &end, 10);
      if (end == p || v < 1) break;  // not a positive count: the size check below reports it
      rows.push_back(int32_t(v));
      p = *end == ',' ? end + 1 : end;
    }
    if (env && rows.size() != size_t(E)) {
      std::fprintf(stderr, "bench_grouped_gemm: BENCH_EXPERT_ROWS needs %d row counts, got \"%s\"\n", E, env);
      return 1;
    }
    for (int e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + (env ? rows[size_t(e)] : 8192);
  }
  const int64_t R = off[size_t(E)];
  auto rows_of = [&](const Tensor& t, int e) { return t.rows_slice(off[size_t(e)], off[size_t(e) + 1]); };
  std::printf("device: %s\n", be.name().c_str());
  std::printf("%-34s %10s %10s %10s %10s %8s %10s\n", "gemm", "grp ms", "grp TF/s", "blas ms", "blas TF/s", "ratio",
              "check");
  Tensor offsets = be.alloc({E + 1}, DType::i32);
  be.write_i32(offsets, off);
  bool ok = true;

  struct Dims {
    int K, N;
    const char* name;
  };
  for (Dims d : {Dims{768, 1536, "768->1536"}, Dims{1536, 768, "1536->768"}}) {
    const int K = d.K, N = d.N;
    Tensor X = be.alloc({R, K}, DType::bf16), W = be.alloc({E, N, K}, DType::bf16);
    Tensor Y = be.alloc({R, N}, DType::bf16), dY = be.alloc({R, N}, DType::bf16);
    Tensor dX = be.alloc({R, K}, DType::bf16), dW = be.alloc({E, N, K}, DType::f32);
    Tensor Yref = be.alloc({R, N}, DType::bf16), dXref = be.alloc({R, K}, DType::bf16),
           dWref = be.alloc({E, N, K}, DType::f32);
    fill_random(be, X, rng, 1.f);
    fill_random(be, W, rng, 0.05f);
    fill_random(be, dY, rng, 1.f);
    const double flops = 2.0 * double(R) * K * N;

    struct Case {
      std::string name;
      std::function<void()> grouped, blas, per_expert;
      Tensor out, ref;
    };
    Tensor W0 = W.index(0);
    std::vector<Case> cases;
    cases.push_back({std::string(d.name) + " fwd", [&] { be.grouped_matmul(X, W, true, Y, offsets); },
                     [&] { be.matmul(X, false, W0, true, Y); },
                     [&] {
                       for (int e = 0; e < E; ++e) {
                         Tensor ye = rows_of(Yref, e);
                         be.matmul(rows_of(X, e), false, W.index(e),
                                   true, ye);
                       }
                     },
                     Y, Yref});
    cases.push_back({std::string(d.name) + " fwd (mma.sync v1)",
                     [&] {
                       grouped_gemm::forward(X.as<__nv_bfloat16>(), W.as<__nv_bfloat16>(), true, Y.data, Y.dtype,
                                             offsets.as<int32_t>(), E, R, N, K, be.stream());
                     },
                     [&] { be.matmul(X, false, W0, true, Y); }, [] {}, Y, Yref});
    cases.push_back({std::string(d.name) + " fwd (cp.async wgmma v2)",
                     [&] {
                       grouped_gemm_lab::forward_sm90(X.as<__nv_bfloat16>(), W.as<__nv_bfloat16>(), Y.data, Y.dtype,
                                                  offsets.as<int32_t>(), E, R, N, K, be.stream());
                     },
                     [&] { be.matmul(X, false, W0, true, Y); }, [] {}, Y, Yref});
    cases.push_back({std::string(d.name) + " dgrad", [&] { be.grouped_matmul(dY, W, false, dX, offsets); },
                     [&] { be.matmul(dY, false, W0, false, dX); },
                     [&] {
                       for (int e = 0; e < E; ++e) {
                         Tensor xe = rows_of(dXref, e);
                         be.matmul(rows_of(dY, e), false,
                                   W.index(e), false, xe);
                       }
                     },
                     dX, dXref});
    cases.push_back({std::string(d.name) + " wgrad", [&] { be.grouped_matmul_wgrad(dY, X, dW, offsets, 0.f); },
                     [&] {
                       Tensor dw_all = dW.view({int64_t(E) * N, K}).rows_slice(0, N);
                       // One GEMM of the same total size: reduction over all R rows.
                       be.matmul(dY, true, X, false, dw_all);
                     },
                     [&] {
                       for (int e = 0; e < E; ++e) {
                         Tensor we = dWref.index(e);
                         be.matmul(rows_of(dY, e), true,
                                   rows_of(X, e), false, we);
                       }
                     },
                     dW, dWref});
    cases.push_back({std::string(d.name) + " fwd (tma tile 128x128)",
                     [&] {
                       grouped_gemm_lab::forward_sm90_tma(X.as<__nv_bfloat16>(), W.as<__nv_bfloat16>(), Y.data, Y.dtype,
                                                      offsets.as<int32_t>(), E, R, N, K, be.stream(), 128);
                     },
                     [&] { be.matmul(X, false, W0, true, Y); }, [] {}, Y, Yref});
    cases.push_back({std::string(d.name) + " fwd (tma one tile a block, 128x256)",
                     [&] {
                       grouped_gemm_lab::forward_sm90_tma(X.as<__nv_bfloat16>(), W.as<__nv_bfloat16>(), Y.data, Y.dtype,
                                                      offsets.as<int32_t>(), E, R, N, K, be.stream(), 256);
                     },
                     [&] { be.matmul(X, false, W0, true, Y); }, [] {}, Y, Yref});
    cases.push_back({std::string(d.name) + " fwd (tma persistent, 128x256)",
                     [&] {
                       grouped_gemm::forward_sm90_tma_persistent(X.as<__nv_bfloat16>(), W.as<__nv_bfloat16>(), false, Y.data, Y.dtype,
                                                      offsets.as<int32_t>(), E, R, N, K, be.sm_count(), be.stream(), 256);
                     },
                     [&] { be.matmul(X, false, W0, true, Y); }, [] {}, Y, Yref});
    cases.push_back({std::string(d.name) + " wgrad (tma tile 128x128)",
                     [&] {
                       grouped_gemm::wgrad_sm90_tma(dY.as<__nv_bfloat16>(), X.as<__nv_bfloat16>(), dW.data, dW.dtype,
                                                    offsets.as<int32_t>(), E, R, N, K, 0.f, be.stream(), 128);
                     },
                     [&] {
                       Tensor dw_all = dW.view({int64_t(E) * N, K}).rows_slice(0, N);
                       be.matmul(dY, true, X, false, dw_all);
                     },
                     [] {}, dW, dWref});
    cases.push_back({std::string(d.name) + " wgrad (tma tile 128x256)",
                     [&] {
                       grouped_gemm::wgrad_sm90_tma(dY.as<__nv_bfloat16>(), X.as<__nv_bfloat16>(), dW.data, dW.dtype,
                                                    offsets.as<int32_t>(), E, R, N, K, 0.f, be.stream(), 256);
                     },
                     [&] {
                       Tensor dw_all = dW.view({int64_t(E) * N, K}).rows_slice(0, N);
                       be.matmul(dY, true, X, false, dw_all);
                     },
                     [] {}, dW, dWref});
    cases.push_back({std::string(d.name) + " wgrad (mma.sync v1)",
                     [&] {
                       grouped_gemm::wgrad(dY.as<__nv_bfloat16>(), X.as<__nv_bfloat16>(), dW.data, dW.dtype,
                                           offsets.as<int32_t>(), E, N, K, 0.f, be.stream());
                     },
                     [&] {
                       Tensor dw_all = dW.view({int64_t(E) * N, K}).rows_slice(0, N);
                       be.matmul(dY, true, X, false, dw_all);
                     },
                     [] {}, dW, dWref});
    for (auto& c : cases) {
      c.per_expert();
      c.grouped();
      be.synchronize();
      double err = nerr(be.read(c.out), be.read(c.ref));
      bool pass = err < 1e-2;
      ok &= pass;
      double tg = median_ms(be, c.grouped), tb = median_ms(be, c.blas);
      std::printf("%-34s %10.3f %10.1f %10.3f %10.1f %8.3f %10.2e%s\n", c.name.c_str(), tg, flops / tg / 1e9, tb,
                  flops / tb / 1e9, tb / tg, err, pass ? "" : " FAIL");
    }
  }

  // Attention at the seed shape (B 16, T 1024, 12 heads of 64), causal: forward and backward.
  {
    const int64_t B = 16, T = 1024, H = 12, hd = 64;
    Tensor q = be.alloc({B, T, H, hd}, DType::bf16), k = be.alloc({B, T, H, hd}, DType::bf16),
           v = be.alloc({B, T, H, hd}, DType::bf16), o = be.alloc({B, T, H, hd}, DType::bf16),
           lse = be.alloc({B, H, T}, DType::f32), dout = be.alloc({B, T, H, hd}, DType::bf16),
           dq = be.alloc({B, T, H, hd}, DType::bf16), dk = be.alloc({B, T, H, hd}, DType::bf16),
           dv = be.alloc({B, T, H, hd}, DType::bf16);
    for (Tensor* t : {&q, &k, &v, &dout}) fill_random(be, *t, rng, 1.f);
    const double fwd_flops = 4.0 * B * H * T * T * hd / 2;  // causal half
    double tf = median_ms(be, [&] { be.attention_fwd(q, k, v, o, lse); }, 2, 10);
    double tbw = median_ms(be, [&] { be.attention_bwd(q, k, v, o, lse, dout, dq, dk, dv); }, 2, 10);
    std::printf("attention fwd  B16 T1024 H12 hd64: %8.3f ms %8.1f TF/s\n", tf, fwd_flops / tf / 1e9);
    std::printf("attention bwd  B16 T1024 H12 hd64: %8.3f ms %8.1f TF/s\n", tbw, 2.5 * fwd_flops / tbw / 1e9);
  }
  std::printf("peak memory: %.1f MiB\n", double(be.peak_memory_bytes()) / (1 << 20));
  std::printf("%s\n", ok ? "ALL CHECKS PASSED" : "SOME CHECKS FAILED");
  return ok ? 0 : 2;
}
