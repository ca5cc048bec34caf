// Kernel lab: benchmark and check of the flash-attention variants (attention_variants_hd64.cuh) at the seed's
// shape (B=16, T=1024, Hq=Hkv=12, head_dim 64, causal; `bench_attention_variants B T Hq [Hkv]` for others).
// Every variant of each pass runs on the same fresh random inputs, and its outputs (out, lse / dq
// / dk, dv, with bf16 and with f32 gradients) are compared with the base kernels' by normalized
// error; the base kernels themselves are compared with an fp64 host reference on one batch row
// and kv group. Timings are the median of many CUDA-event-timed calls after a warm-up.
// FLOP counts are the causal ones: one T x T x 64 product = 2*B*Hq*T*T*64/2 flops; the forward
// runs 2 of them, dq 3, dk/dv 4, and "bwd" quotes dq + dk/dv against the 5 a fused backward needs.
// Exit status 1 if any check fails.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.hpp"
#include "attention_variants_hd64.cuh"
#include "core/dtype.hpp"
#include "core/rng.hpp"
#include "bench_check.hpp"
#include "bench_timing.hpp"

using namespace moelab;
using bf16 = __nv_bfloat16;

namespace {

constexpr int kHd = 64;
constexpr int kWarmup = 5, kReps = 30;

double median_us(cudaStream_t stream, const std::function<void()>& fn) {
  return 1e3 * median_event_ms(stream, fn, kWarmup, kReps);
}
constexpr double kTol = 1e-2;      // variant vs base, normalized error
constexpr double kRefTol = 2e-2;   // base (bf16 P and dS in the products) vs fp64

// A device buffer of n elements of E, freed on scope exit.
template <class E>
struct DevBuf {
  E* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    MOELAB_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(E)));
    MOELAB_CUDA_CHECK(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(E)));  // NaN-ish poison
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

std::vector<float> to_host(const void* dev, size_t n, DType dt) {
  std::vector<float> out(n);
  if (dt == DType::f32) {
    MOELAB_CUDA_CHECK(cudaMemcpy(out.data(), dev, n * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<uint16_t> bits(n);
    MOELAB_CUDA_CHECK(cudaMemcpy(bits.data(), dev, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = bf16_bits_to_f32(bits[i]);
  }
  return out;
}

// Random normal bf16 tensor on the device; returns the rounded values kept on the host.
std::vector<float> fill_random(bf16* dev, size_t n, Rng& rng) {
  std::vector<uint16_t> bits(n);
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) {
    bits[i] = f32_to_bf16_bits(float(rng.normal()));
    host[i] = bf16_bits_to_f32(bits[i]);
  }
  MOELAB_CUDA_CHECK(cudaMemcpy(dev, bits.data(), n * 2, cudaMemcpyHostToDevice));
  return host;
}


struct Shape {
  int B, T, Hq, Hkv;
  size_t q_elems() const { return size_t(B) * T * Hq * kHd; }
  size_t kv_elems() const { return size_t(B) * T * Hkv * kHd; }
  size_t rows() const { return size_t(B) * Hq * T; }
};

bool report_check(const char* what, const char* tensor, double err, double tol) {
  const bool ok = err < tol;
  std::printf("  check %-12s %-4s nerr %.3e  %s\n", what, tensor, err, ok ? "PASS" : "FAIL");
  return ok;
}

// fp64 reference of out, lse, dq (query heads of kv group g, batch row b) and dk, dv (kv head g).
struct HostRef {
  std::vector<double> out, lse, dq, dk, dv;  // out/dq: [group][T][64], lse: [group][T], dk/dv: [T][64]
};

HostRef host_reference(const Shape& s, const std::vector<float>& q, const std::vector<float>& k,
                       const std::vector<float>& v, const std::vector<float>& dout, int b, int g, double scale) {
  const int T = s.T, group = s.Hq / s.Hkv;
  HostRef r;
  r.out.assign(size_t(group) * T * kHd, 0);
  r.lse.assign(size_t(group) * T, 0);
  r.dq.assign(size_t(group) * T * kHd, 0);
  r.dk.assign(size_t(T) * kHd, 0);
  r.dv.assign(size_t(T) * kHd, 0);
  auto qi = [&](int t, int h) { return ((size_t(b) * T + t) * s.Hq + h) * kHd; };
  auto ki = [&](int t) { return ((size_t(b) * T + t) * s.Hkv + g) * kHd; };
  std::vector<double> p(static_cast<size_t>(T));
  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    for (int i = 0; i < T; ++i) {
      double m = -INFINITY;
      for (int j = 0; j <= i; ++j) {
        double acc = 0;
        for (int c = 0; c < kHd; ++c) acc += double(q[qi(i, h) + c]) * k[ki(j) + c];
        p[size_t(j)] = acc * scale;
        m = std::max(m, p[size_t(j)]);
      }
      double l = 0;
      for (int j = 0; j <= i; ++j) l += (p[size_t(j)] = std::exp(p[size_t(j)] - m));
      double* o = &r.out[(size_t(hh) * T + i) * kHd];
      for (int j = 0; j <= i; ++j) {
        p[size_t(j)] /= l;
        for (int c = 0; c < kHd; ++c) o[c] += p[size_t(j)] * v[ki(j) + c];
      }
      r.lse[size_t(hh) * T + i] = m + std::log(l);
      double Di = 0;
      for (int c = 0; c < kHd; ++c) Di += double(dout[qi(i, h) + c]) * o[c];
      double* dqr = &r.dq[(size_t(hh) * T + i) * kHd];
      for (int j = 0; j <= i; ++j) {
        double dp = 0;
        for (int c = 0; c < kHd; ++c) dp += double(dout[qi(i, h) + c]) * v[ki(j) + c];
        const double ds = p[size_t(j)] * (dp - Di);
        for (int c = 0; c < kHd; ++c) {
          dqr[c] += ds * k[ki(j) + c] * scale;
          r.dk[size_t(j) * kHd + c] += ds * q[qi(i, h) + c] * scale;
          r.dv[size_t(j) * kHd + c] += p[size_t(j)] * dout[qi(i, h) + c];
        }
      }
    }
  }
  return r;
}

// nerr of the device tensor's slice (rows of batch b, heads [h0, h0 + nh)) against a reference
// laid out [nh][T][64] (or [nh][T] for lse, whose device layout is [B, H, T]).
double slice_err(const std::vector<float>& dev, const std::vector<double>& ref, const Shape& s, int H, int b, int h0,
                 int nh, bool is_lse) {
  std::vector<float> out, rf;
  for (int hh = 0; hh < nh; ++hh)
    for (int t = 0; t < s.T; ++t) {
      if (is_lse) {
        out.push_back(dev[(size_t(b) * H + h0 + hh) * s.T + t]);
        rf.push_back(float(ref[size_t(hh) * s.T + t]));
      } else {
        for (int c = 0; c < kHd; ++c) {
          out.push_back(dev[((size_t(b) * s.T + t) * H + h0 + hh) * kHd + c]);
          rf.push_back(float(ref[(size_t(hh) * s.T + t) * kHd + c]));
        }
      }
    }
  return nerr(out, rf);
}

int run(int argc, char** argv) {
  Shape s{16, 1024, 12, 12};
  if (argc >= 4) {
    s.B = std::atoi(argv[1]);
    s.T = std::atoi(argv[2]);
    s.Hq = std::atoi(argv[3]);
    s.Hkv = argc >= 5 ? std::atoi(argv[4]) : s.Hq;
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: %s [B T Hq [Hkv]]   (default 16 1024 12 12)\n", argv[0]);
    return 2;
  }
  if (s.B <= 0 || s.T <= 0 || s.Hq <= 0 || s.Hkv <= 0 || s.Hq % s.Hkv != 0) {
    std::fprintf(stderr, "bench_attention: need positive B, T, Hq, Hkv with Hq %% Hkv == 0\n");
    return 2;
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "bench_attention: no CUDA GPU\n");
    return 1;
  }
  cudaDeviceProp prop{};
  MOELAB_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  MOELAB_CUDA_CHECK(cudaStreamCreate(&st));
  const float scale = 1.f / std::sqrt(float(kHd));
  const uint64_t seed = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  Rng rng(seed);
  std::printf("device: %s   B=%d T=%d Hq=%d Hkv=%d hd=%d causal   seed %llu\n", prop.name, s.B, s.T, s.Hq, s.Hkv, kHd,
              (unsigned long long)seed);
  std::printf("production: %s, %s, %s\n", flash_lab::name(flash_lab::kProduction.fwd), flash_lab::name(flash_lab::kProduction.dq),
              flash_lab::name(flash_lab::kProduction.dkv));

  DevBuf<bf16> q(s.q_elems()), k(s.kv_elems()), v(s.kv_elems()), dout(s.q_elems());
  const auto hq = fill_random(q.p, q.n, rng), hk = fill_random(k.p, k.n, rng), hv = fill_random(v.p, v.n, rng),
             hdo = fill_random(dout.p, dout.n, rng);
  DevBuf<bf16> out_ref(s.q_elems()), out(s.q_elems());
  DevBuf<float> lse_ref(s.rows()), lse(s.rows()), D(s.rows());
  // Gradient buffers sized for f32; bf16 runs use the first half of the bytes.
  DevBuf<float> dq_ref(s.q_elems()), dk_ref(s.kv_elems()), dv_ref(s.kv_elems());
  DevBuf<float> dq(s.q_elems()), dk(s.kv_elems()), dv(s.kv_elems());

  const int B = s.B, T = s.T, Hq = s.Hq, Hkv = s.Hkv;
  const double one_product = 2.0 * B * Hq * double(T) * T * kHd / 2;  // causal flops of one T x T x 64 product
  bool all_ok = true;

  // --- base kernels vs fp64 on one (batch row, kv group) ---
  flash_lab::forward_with(flash_lab::FwdKernel::base, q.p, k.p, v.p, out_ref.p, lse_ref.p, B, T, Hq, Hkv, scale, st);
  flash_lab::row_dot(out_ref.p, dout.p, D.p, B, T, Hq, st);
  flash_lab::dq_with(flash_lab::DqKernel::base, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dq_ref.p, DType::f32, B, T, Hq, Hkv,
                 scale, st);
  flash_lab::dkv_with(flash_lab::DkvKernel::base, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dk_ref.p, dv_ref.p, DType::f32, B, T,
                  Hq, Hkv, scale, st);
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(st));
  {
    const int b = int(rng.below(uint64_t(B))), g = int(rng.below(uint64_t(Hkv))), group = Hq / Hkv;
    std::printf("base kernels vs fp64 host reference (batch %d, kv head %d, f32 gradients):\n", b, g);
    const HostRef r = host_reference(s, hq, hk, hv, hdo, b, g, scale);
    const auto o = to_host(out_ref.p, out_ref.n, DType::bf16), l = to_host(lse_ref.p, lse_ref.n, DType::f32);
    const auto gq = to_host(dq_ref.p, dq_ref.n, DType::f32), gk = to_host(dk_ref.p, dk_ref.n, DType::f32),
               gv = to_host(dv_ref.p, dv_ref.n, DType::f32);
    all_ok &= report_check("base/fp64", "out", slice_err(o, r.out, s, Hq, b, g * group, group, false), kRefTol);
    all_ok &= report_check("base/fp64", "lse", slice_err(l, r.lse, s, Hq, b, g * group, group, true), kRefTol);
    all_ok &= report_check("base/fp64", "dq", slice_err(gq, r.dq, s, Hq, b, g * group, group, false), kRefTol);
    all_ok &= report_check("base/fp64", "dk", slice_err(gk, r.dk, s, Hkv, b, g, 1, false), kRefTol);
    all_ok &= report_check("base/fp64", "dv", slice_err(gv, r.dv, s, Hkv, b, g, 1, false), kRefTol);
  }

  // --- forward variants ---
  const auto o_ref = to_host(out_ref.p, out_ref.n, DType::bf16), l_ref = to_host(lse_ref.p, lse_ref.n, DType::f32);
  std::printf("\n%-12s %10s %10s %8s\n", "kernel", "us", "TFLOP/s", "vs base");
  double fwd_base_us = 0, fwd_best_us = 1e30;
  for (auto kv : {flash_lab::FwdKernel::base, flash_lab::FwdKernel::lean64, flash_lab::FwdKernel::m128}) {
    auto run = [&] { flash_lab::forward_with(kv, q.p, k.p, v.p, out.p, lse.p, B, T, Hq, Hkv, scale, st); };
    MOELAB_CUDA_CHECK(cudaMemset(out.p, 0xff, out.n * sizeof(bf16)));
    run();
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(st));
    const double e_out = nerr(to_host(out.p, out.n, DType::bf16), o_ref);
    const double e_lse = nerr(to_host(lse.p, lse.n, DType::f32), l_ref);
    const double us = median_us(st, run);
    if (kv == flash_lab::FwdKernel::base) fwd_base_us = us;
    fwd_best_us = std::min(fwd_best_us, us);
    std::printf("%-12s %10.1f %10.1f %7.2fx\n", flash_lab::name(kv), us, 2 * one_product / (us * 1e-6) / 1e12,
                fwd_base_us / us);
    all_ok &= report_check(flash_lab::name(kv), "out", e_out, kTol);
    all_ok &= report_check(flash_lab::name(kv), "lse", e_lse, 1e-3);
  }

  // --- backward variants: both gradient dtypes are checked, bf16 (the model's) is timed ---
  // Inputs of the backward are the base forward's out/lse, so every variant sees the same ones.
  std::vector<float> ref_bf[3], ref_f32[3];
  for (DType dt : {DType::bf16, DType::f32}) {
    flash_lab::dq_with(flash_lab::DqKernel::base, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dq_ref.p, dt, B, T, Hq, Hkv, scale,
                   st);
    flash_lab::dkv_with(flash_lab::DkvKernel::base, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dk_ref.p, dv_ref.p, dt, B, T, Hq,
                    Hkv, scale, st);
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(st));
    auto& dst = dt == DType::bf16 ? ref_bf : ref_f32;
    dst[0] = to_host(dq_ref.p, dq_ref.n, dt);
    dst[1] = to_host(dk_ref.p, dk_ref.n, dt);
    dst[2] = to_host(dv_ref.p, dv_ref.n, dt);
  }
  double dq_base_us = 0, dq_best_us = 1e30;
  for (auto kv : {flash_lab::DqKernel::base, flash_lab::DqKernel::lean64, flash_lab::DqKernel::m128}) {
    double errs[2];
    for (DType dt : {DType::bf16, DType::f32}) {
      MOELAB_CUDA_CHECK(cudaMemset(dq.p, 0xff, dq.n * sizeof(float)));
      flash_lab::dq_with(kv, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dq.p, dt, B, T, Hq, Hkv, scale, st);
      MOELAB_CUDA_CHECK(cudaStreamSynchronize(st));
      errs[dt == DType::f32] = nerr(to_host(dq.p, dq.n, dt), (dt == DType::bf16 ? ref_bf : ref_f32)[0]);
    }
    const double us = median_us(st, [&] {
      flash_lab::dq_with(kv, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dq.p, DType::bf16, B, T, Hq, Hkv, scale, st);
    });
    if (kv == flash_lab::DqKernel::base) dq_base_us = us;
    dq_best_us = std::min(dq_best_us, us);
    std::printf("%-12s %10.1f %10.1f %7.2fx\n", flash_lab::name(kv), us, 3 * one_product / (us * 1e-6) / 1e12,
                dq_base_us / us);
    all_ok &= report_check(flash_lab::name(kv), "dq", errs[0], kTol);
    all_ok &= report_check(flash_lab::name(kv), "dq32", errs[1], kTol);
  }
  double dkv_base_us = 0, dkv_best_us = 1e30;
  for (auto kv : {flash_lab::DkvKernel::base, flash_lab::DkvKernel::lean64, flash_lab::DkvKernel::n128}) {
    double ek[2], ev[2];
    for (DType dt : {DType::bf16, DType::f32}) {
      MOELAB_CUDA_CHECK(cudaMemset(dk.p, 0xff, dk.n * sizeof(float)));
      MOELAB_CUDA_CHECK(cudaMemset(dv.p, 0xff, dv.n * sizeof(float)));
      flash_lab::dkv_with(kv, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dk.p, dv.p, dt, B, T, Hq, Hkv, scale, st);
      MOELAB_CUDA_CHECK(cudaStreamSynchronize(st));
      const auto& rf = dt == DType::bf16 ? ref_bf : ref_f32;
      ek[dt == DType::f32] = nerr(to_host(dk.p, dk.n, dt), rf[1]);
      ev[dt == DType::f32] = nerr(to_host(dv.p, dv.n, dt), rf[2]);
    }
    const double us = median_us(st, [&] {
      flash_lab::dkv_with(kv, q.p, k.p, v.p, dout.p, lse_ref.p, D.p, dk.p, dv.p, DType::bf16, B, T, Hq, Hkv, scale, st);
    });
    if (kv == flash_lab::DkvKernel::base) dkv_base_us = us;
    dkv_best_us = std::min(dkv_best_us, us);
    std::printf("%-12s %10.1f %10.1f %7.2fx\n", flash_lab::name(kv), us, 4 * one_product / (us * 1e-6) / 1e12,
                dkv_base_us / us);
    all_ok &= report_check(flash_lab::name(kv), "dk", ek[0], kTol);
    all_ok &= report_check(flash_lab::name(kv), "dv", ev[0], kTol);
    all_ok &= report_check(flash_lab::name(kv), "dk32", ek[1], kTol);
    all_ok &= report_check(flash_lab::name(kv), "dv32", ev[1], kTol);
  }

  std::printf("\nsummary (TFLOP/s with 2 products fwd, 5 bwd):\n");
  std::printf("  fwd  base %7.1f us %6.1f TF/s   best %7.1f us %6.1f TF/s  (%.2fx)\n", fwd_base_us,
              2 * one_product / (fwd_base_us * 1e-6) / 1e12, fwd_best_us,
              2 * one_product / (fwd_best_us * 1e-6) / 1e12, fwd_base_us / fwd_best_us);
  const double bwd_base = dq_base_us + dkv_base_us, bwd_best = dq_best_us + dkv_best_us;
  std::printf("  bwd  base %7.1f us %6.1f TF/s   best %7.1f us %6.1f TF/s  (%.2fx)\n", bwd_base,
              5 * one_product / (bwd_base * 1e-6) / 1e12, bwd_best, 5 * one_product / (bwd_best * 1e-6) / 1e12,
              bwd_base / bwd_best);
  std::printf("%s\n", all_ok ? "ALL PASS" : "SOME CHECKS FAILED");
  cudaStreamDestroy(st);
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // a CUDA error (launch, memory) names its call site
    std::fprintf(stderr, "bench_attention: %s\n", e.what());
    return 1;
  }
}
