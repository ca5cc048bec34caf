// Benchmark of the engine's attention (CudaBackend::attention_fwd / attention_bwd) on both of its
// tensor-core paths: "engine" (the automatic choice the model runs: cuDNN's fused engine where it
// plans the shape) and "own" (the kernels of flash_attention.cu, forced), at the PyTorch peer's shapes (shared/anchors/torch_attention_ref.py), with sliding
// windows and grouped-query heads; `bench_attention B,T,H,D[,Hkv[,window]] ...` for others.
// Every shape runs on fresh random bf16 inputs and is checked before it is timed: the last 64
// query rows of out and dq and the first 64 keys of dk and dv of one (batch, head) against an f64
// host reference computed from the same bf16 inputs (normalized error under 2e-2; NaN fails).
// Times are medians of 30 CUDA-event-timed calls after 5 warm-ups. TFLOP/s is counted as the
// peer counts it (3.5 x the causal forward's 2 * 2*B*H*T*T*D/2), and for a window over the
// visited span (T*window - window^2/2 instead of T^2/2 score pairs). Exit status 1 on a failed check.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "bench_check.hpp"
#include "bench_timing.hpp"
#include "core/dtype.hpp"
#include "core/rng.hpp"

using namespace moelab;

namespace {

struct Shape4 {
  int B, T, H, D, Hkv, window;
};

std::vector<float> randn_bf16(Rng& rng, size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = round_to_bf16(float(rng.normal()));
  return v;
}

// f64 reference for (b = 0, head h = 0 of kv group 0): out/dq rows [T-64, T), dk/dv keys [0, 64).
struct Reference {
  std::vector<float> out, dq, dk, dv;
};

Reference reference(const Shape4& s, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<float>& dout) {
  const int T = s.T, D = s.D, W = s.window > 0 && s.window < T ? s.window : T;
  const int group = s.H / s.Hkv;
  const double scale = 1.0 / std::sqrt(double(D));
  auto qrow = [&](int t, int h) { return &q[(size_t(t) * s.H + h) * D]; };
  auto krow = [&](int t) { return &k[size_t(t) * s.Hkv * D]; };  // kv head 0
  auto vrow = [&](int t) { return &v[size_t(t) * s.Hkv * D]; };
  auto drow = [&](int t, int h) { return &dout[(size_t(t) * s.H + h) * D]; };
  auto dot = [&](const float* a, const float* b) {
    double acc = 0;
    for (int i = 0; i < D; ++i) acc += double(a[i]) * b[i];
    return acc;
  };
  // Per query row of head h: probabilities over its span, out row, and D = <dout, out>.
  auto row = [&](int t, int h, std::vector<double>& p, std::vector<double>& o) {
    const int j0 = std::max(0, t - W);
    p.assign(size_t(t - j0 + 1), 0.0);
    double m = -INFINITY, z = 0;
    for (int j = j0; j <= t; ++j) m = std::max(m, p[size_t(j - j0)] = dot(qrow(t, h), krow(j)) * scale);
    for (auto& x : p) z += (x = std::exp(x - m));
    for (auto& x : p) x /= z;
    o.assign(size_t(D), 0.0);
    for (int j = j0; j <= t; ++j)
      for (int i = 0; i < D; ++i) o[size_t(i)] += p[size_t(j - j0)] * vrow(j)[i];
  };
  Reference r;
  std::vector<double> p, o;
  for (int t = T - 64; t < T; ++t) {
    row(t, 0, p, o);
    double Dt = 0;
    for (int i = 0; i < D; ++i) Dt += o[size_t(i)] * drow(t, 0)[i];
    std::vector<double> dq(size_t(D), 0.0);
    const int j0 = std::max(0, t - W);
    for (int j = j0; j <= t; ++j) {
      const double ds = p[size_t(j - j0)] * (dot(drow(t, 0), vrow(j)) - Dt) * scale;
      for (int i = 0; i < D; ++i) dq[size_t(i)] += ds * krow(j)[i];
    }
    for (int i = 0; i < D; ++i) r.out.push_back(float(o[size_t(i)])), r.dq.push_back(float(dq[size_t(i)]));
  }
  std::vector<double> dk(size_t(64) * D, 0.0), dv(size_t(64) * D, 0.0);
  for (int h = 0; h < group; ++h)
    for (int t = 0; t < std::min(T, 64 + W); ++t) {
      row(t, h, p, o);
      double Dt = 0;
      for (int i = 0; i < D; ++i) Dt += o[size_t(i)] * drow(t, h)[i];
      const int j0 = std::max(0, t - W);
      for (int j = j0; j <= std::min(t, 63); ++j) {
        const double pj = p[size_t(j - j0)], ds = pj * (dot(drow(t, h), vrow(j)) - Dt) * scale;
        for (int i = 0; i < D; ++i) {
          dv[size_t(j) * D + i] += pj * drow(t, h)[i];
          dk[size_t(j) * D + i] += ds * qrow(t, h)[i];
        }
      }
    }
  for (auto x : dk) r.dk.push_back(float(x));
  for (auto x : dv) r.dv.push_back(float(x));
  return r;
}

// Rows [r0, r0 + n) of head h of a [T, H, D] slice (batch 0) of a device tensor read back.
std::vector<float> rows_of(const std::vector<float>& all, int r0, int n, int h, int H, int D) {
  std::vector<float> out;
  for (int t = r0; t < r0 + n; ++t)
    out.insert(out.end(), all.begin() + (size_t(t) * H + h) * D, all.begin() + (size_t(t) * H + h + 1) * D);
  return out;
}


}  // namespace

int main(int argc, char** argv) {
  if (!CudaBackend::cuda_device_available()) {
    std::fprintf(stderr, "bench_attention: no CUDA GPU\n");
    return 2;
  }
  std::vector<Shape4> shapes;
  for (int i = 1; i < argc; ++i) {
    Shape4 s{0, 0, 0, 0, 0, 0};
    const int n = std::sscanf(argv[i], "%d,%d,%d,%d,%d,%d", &s.B, &s.T, &s.H, &s.D, &s.Hkv, &s.window);
    if (n < 4) {
      std::fprintf(stderr, "usage: bench_attention [B,T,H,D[,Hkv[,window]] ...]\n");
      return 2;
    }
    if (n < 5 || s.Hkv == 0) s.Hkv = s.H;
    shapes.push_back(s);
  }
  if (shapes.empty())
    shapes = {{16, 1024, 12, 64, 12, 0},  {16, 1024, 6, 128, 6, 0},  {8, 2048, 8, 128, 8, 0},
              {8, 2048, 10, 128, 10, 0},  {4, 4096, 16, 128, 16, 0}, {16, 1024, 12, 64, 12, 512},
              {8, 2048, 8, 128, 8, 1024}, {8, 2048, 8, 128, 2, 0},   {8, 2048, 8, 128, 1, 1024},
              {8, 2048, 10, 128, 10, 1024}, {16, 1024, 6, 128, 6, 512}, {4, 4096, 16, 128, 16, 2048}};
  CudaBackend gpu;
  std::printf("device: %s\n", gpu.name().c_str());
  Rng rng(uint64_t(std::time(nullptr)));
  bool ok = true;
  std::printf("%-22s %-9s %9s %9s %9s %8s  %s\n", "B,T,H,D,Hkv,window", "path", "fwd ms", "bwd ms", "f+b ms",
              "TFLOP/s", "check (out dq dk dv)");
  for (const Shape4& s : shapes) {
    const size_t nq = size_t(s.B) * s.T * s.H * s.D, nk = size_t(s.B) * s.T * s.Hkv * s.D;
    const auto hq = randn_bf16(rng, nq), hk = randn_bf16(rng, nk), hv = randn_bf16(rng, nk),
               hdo = randn_bf16(rng, nq);
    Tensor q = gpu.alloc({s.B, s.T, s.H, s.D}, DType::bf16), k = gpu.alloc({s.B, s.T, s.Hkv, s.D}, DType::bf16),
           v = gpu.alloc(k.shape, DType::bf16), dout = gpu.alloc(q.shape, DType::bf16);
    gpu.write(q, hq);
    gpu.write(k, hk);
    gpu.write(v, hv);
    gpu.write(dout, hdo);
    Tensor out = gpu.alloc(q.shape, DType::bf16), lse = gpu.alloc({s.B, s.H, s.T}, DType::f32);
    Tensor dq = gpu.alloc(q.shape, DType::bf16), dk = gpu.alloc(k.shape, DType::bf16), dv = gpu.alloc(k.shape, DType::bf16);
    // Batch 0 only: the host reference reads the first T*H*D elements.
    const Reference ref = reference(s, hq, hk, hv, hdo);
    char name[64];
    std::snprintf(name, sizeof name, "%d,%d,%d,%d,%d,%d", s.B, s.T, s.H, s.D, s.Hkv, s.window);
    using AK = CudaBackend::AttentionKernels;
    for (const AK path : {AK::automatic, AK::flash}) {
      gpu.set_attention_kernels(path);
      for (Tensor* t : {&out, &dq, &dk, &dv}) gpu.fill(*t, NAN);  // every checked element must be written
      gpu.attention_fwd(q, k, v, out, lse, s.window);
      gpu.attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, s.window);
      gpu.synchronize();
      const int kvrow = std::min(64, s.T);
      const double e_out = nerr(rows_of(gpu.read(out), s.T - 64, 64, 0, s.H, s.D), ref.out);
      const double e_dq = nerr(rows_of(gpu.read(dq), s.T - 64, 64, 0, s.H, s.D), ref.dq);
      const double e_dk = nerr(rows_of(gpu.read(dk), 0, kvrow, 0, s.Hkv, s.D), ref.dk);
      const double e_dv = nerr(rows_of(gpu.read(dv), 0, kvrow, 0, s.Hkv, s.D), ref.dv);
      const bool pass = e_out < 2e-2 && e_dq < 2e-2 && e_dk < 2e-2 && e_dv < 2e-2;
      ok = ok && pass;
      const double fwd = median_event_ms(gpu.stream(), [&] { gpu.attention_fwd(q, k, v, out, lse, s.window); });
      const double bwd = median_event_ms(gpu.stream(), [&] { gpu.attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, s.window); });
      const double both = median_event_ms(gpu.stream(), [&] {
        gpu.attention_fwd(q, k, v, out, lse, s.window);
        gpu.attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, s.window);
      });
      const double W = s.window > 0 && s.window < s.T ? s.window : s.T;
      const double pairs = double(s.T) * W - W * W / 2;  // score pairs (query, visible key)
      const double flops = 3.5 * 4.0 * s.B * s.H * pairs * s.D;
      std::printf("%-22s %-9s %9.3f %9.3f %9.3f %8.1f  %s %.1e %.1e %.1e %.1e\n", name,
                  path == AK::flash ? "own" : "engine", fwd, bwd, both, flops / both / 1e9, pass ? "ok" : "FAIL",
                  e_out, e_dq, e_dk, e_dv);
    }
  }
  return ok ? 0 : 1;
}
