// Check and timing of the cuDNN attention path (backend/cuda/cudnn_attention.hpp), causal bf16,
// forward + backward, over a list of shapes: the PyTorch peer's (bench/cuda peer script
// torch_attention_ref.py) and odd ones (T not a multiple of 64, one head, one kv head, windows).
//
// Per shape, on fresh random inputs (seed printed), with every output poisoned (NaN) first:
//  - cuDNN's out, lse, dq, dk, dv against an fp64 host reference on one batch row and kv group;
//  - against the own kernels (flash::forward/backward, head_dim 64 and 128) on the whole tensors;
//    their window counts the keys before the query (t - w .. t), cuDNN's the keys up to and
//    including it (t - W < j <= t), so W here is w = W - 1 there;
//  - the same calls captured in a CUDA graph and replayed against the direct calls;
// all by normalized error ||a - b|| / ||b||, NaN failing. Then fwd, bwd and fwd+bwd are timed
// (median of 30 CUDA-event-timed calls after 5 warm-ups) and a table is printed, TFLOP/s counted
// as the peer counts them: 3.5 * 4*B*H*T*T*D/2 for fwd+bwd (the causal count, also for windows).
//
//   bench_cudnn_attention                      # the shape list
//   bench_cudnn_attention B T Hq Hkv D [W]     # one shape (W: window, 0 = full causal)
// Exit status 1 if any check fails or a shape of the list is unsupported.
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
#include <thread>
#include <vector>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/cudnn_attention.hpp"
#include "backend/cuda/flash_attention.cuh"
#include "bench_check.hpp"
#include "bench_timing.hpp"
#include "core/dtype.hpp"
#include "core/rng.hpp"

using namespace moelab;
using bf16 = __nv_bfloat16;
using Shape = cudnn_attention::Shape;

namespace {

constexpr int kWarmup = 5, kReps = 30;
constexpr double kOwnTol = 1e-2;    // cuDNN vs own kernels (both bf16 P, dS in the products)
constexpr double kRefTol = 2e-2;    // vs fp64 (bf16 rounding of P and dS before the products)
constexpr double kGraphTol = 1e-3;  // graph replay vs direct call (only accumulation order may differ)

template <class E>
struct DevBuf {
  E* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    MOELAB_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(E)));
    poison();
  }
  // NaN everywhere. cudaMemset runs on the legacy stream, which the bench's non-blocking stream
  // does not wait for: synchronize, or the poison could land after the work it should precede.
  void poison() {
    MOELAB_CUDA_CHECK(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(E)));
    MOELAB_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

std::vector<float> to_host(const bf16* dev, size_t n) {
  std::vector<uint16_t> bits(n);
  MOELAB_CUDA_CHECK(cudaMemcpy(bits.data(), dev, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = bf16_bits_to_f32(bits[i]);
  return out;
}
std::vector<float> to_host(const float* dev, size_t n) {
  std::vector<float> out(n);
  MOELAB_CUDA_CHECK(cudaMemcpy(out.data(), dev, n * 4, cudaMemcpyDeviceToHost));
  return out;
}

unsigned n_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// Runs fn(i) for i in [0, n) over all cores.
void parallel_for(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> pool;
  const int nt = int(std::min<unsigned>(n_threads(), unsigned(std::max(n, 1))));
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([&, t] {
      for (int i = t; i < n; i += nt) fn(i);
    });
  for (auto& th : pool) th.join();
}

// Random normal bf16 tensor on the device; returns the rounded values kept on the host.
std::vector<float> fill_random(bf16* dev, size_t n, uint64_t seed) {
  std::vector<uint16_t> bits(n);
  std::vector<float> host(n);
  constexpr size_t kChunk = 1 << 20;
  parallel_for(int((n + kChunk - 1) / kChunk), [&](int c) {
    Rng rng(seed, uint64_t(c));
    for (size_t i = size_t(c) * kChunk; i < std::min(n, size_t(c + 1) * kChunk); ++i) {
      bits[i] = f32_to_bf16_bits(float(rng.normal()));
      host[i] = bf16_bits_to_f32(bits[i]);
    }
  });
  MOELAB_CUDA_CHECK(cudaMemcpy(dev, bits.data(), n * 2, cudaMemcpyHostToDevice));
  MOELAB_CUDA_CHECK(cudaDeviceSynchronize());  // as in poison(): the copy is not ordered with our stream
  return host;
}


// fp64 reference for batch row b and kv head g: out, lse, dq of the group's query heads
// ([group][T][D], [group][T]) and dk, dv of the kv head ([T][D]). Query i sees keys
// max(0, i - W + 1) .. i (W = T without a window).
struct HostRef {
  std::vector<double> out, lse, dq, dk, dv;
};

HostRef host_reference(const Shape& s, const std::vector<float>& q, const std::vector<float>& k,
                       const std::vector<float>& v, const std::vector<float>& dout, int b, int g) {
  const int T = s.T, D = s.D, group = s.Hq / s.Hkv;
  const int W = s.window > 0 ? s.window : T;
  const double scale = 1.0 / std::sqrt(double(D));
  HostRef r;
  r.out.assign(size_t(group) * T * D, 0);
  r.lse.assign(size_t(group) * T, 0);
  r.dq.assign(size_t(group) * T * D, 0);
  r.dk.assign(size_t(T) * D, 0);
  r.dv.assign(size_t(T) * D, 0);
  std::vector<double> Dsum(size_t(group) * T);
  auto qi = [&](int t, int h) { return ((size_t(b) * T + t) * s.Hq + h) * D; };
  auto ki = [&](int t) { return ((size_t(b) * T + t) * s.Hkv + g) * D; };
  auto dot = [&](const std::vector<float>& x, size_t xo, const std::vector<float>& y, size_t yo) {
    double acc = 0;
    for (int c = 0; c < D; ++c) acc += double(x[xo + c]) * y[yo + c];
    return acc;
  };
  // Pass 1, by query row: softmax stats, out, Dsum = dO . out, dq.
  parallel_for(group * T, [&](int row) {
    const int hh = row / T, i = row % T, h = g * group + hh, j0 = std::max(0, i - W + 1);
    std::vector<double> p(size_t(i - j0 + 1));
    double m = -INFINITY;
    for (int j = j0; j <= i; ++j) m = std::max(m, p[size_t(j - j0)] = dot(q, qi(i, h), k, ki(j)) * scale);
    double l = 0;
    for (auto& x : p) l += (x = std::exp(x - m));
    double* o = &r.out[(size_t(hh) * T + i) * D];
    for (int j = j0; j <= i; ++j) {
      p[size_t(j - j0)] /= l;
      for (int c = 0; c < D; ++c) o[c] += p[size_t(j - j0)] * v[ki(j) + c];
    }
    r.lse[size_t(hh) * T + i] = m + std::log(l);
    double di = 0;
    for (int c = 0; c < D; ++c) di += double(dout[qi(i, h) + c]) * o[c];
    Dsum[size_t(hh) * T + i] = di;
    double* dqr = &r.dq[(size_t(hh) * T + i) * D];
    for (int j = j0; j <= i; ++j) {
      const double ds = p[size_t(j - j0)] * (dot(dout, qi(i, h), v, ki(j)) - di);
      for (int c = 0; c < D; ++c) dqr[c] += ds * k[ki(j) + c] * scale;
    }
  });
  // Pass 2, by key: dk, dv summed over the group's heads and the rows that see the key.
  parallel_for(T, [&](int j) {
    double* dkr = &r.dk[size_t(j) * D];
    double* dvr = &r.dv[size_t(j) * D];
    for (int hh = 0; hh < group; ++hh) {
      const int h = g * group + hh;
      for (int i = j; i < std::min(T, j + W); ++i) {
        const double p = std::exp(dot(q, qi(i, h), k, ki(j)) * scale - r.lse[size_t(hh) * T + i]);
        const double ds = p * (dot(dout, qi(i, h), v, ki(j)) - Dsum[size_t(hh) * T + i]);
        for (int c = 0; c < D; ++c) {
          dkr[c] += ds * q[qi(i, h) + c] * scale;
          dvr[c] += p * dout[qi(i, h) + c];
        }
      }
    }
  });
  return r;
}

// nerr of a device tensor's slice (batch b, heads [h0, h0 + nh) of H) against a reference laid
// out [nh][T][D], or [nh][T] for lse (device layout [B, H, T]).
double slice_err(const std::vector<float>& dev, const std::vector<double>& ref, const Shape& s, int H, int b, int h0,
                 int nh, bool is_lse) {
  std::vector<float> out, rf;
  for (int hh = 0; hh < nh; ++hh)
    for (int t = 0; t < s.T; ++t) {
      if (is_lse) {
        out.push_back(dev[(size_t(b) * H + h0 + hh) * s.T + t]);
        rf.push_back(float(ref[size_t(hh) * s.T + t]));
      } else {
        for (int c = 0; c < s.D; ++c) {
          out.push_back(dev[((size_t(b) * s.T + t) * H + h0 + hh) * s.D + c]);
          rf.push_back(float(ref[(size_t(hh) * s.T + t) * s.D + c]));
        }
      }
    }
  return nerr(out, rf);
}

struct Row {
  Shape s;
  std::string status;  // "ok", "FAIL", or the reason it is unsupported
  double fwd_ms = NAN, bwd_ms = NAN, step_ms = NAN, own_ms = NAN;
};

bool report(const char* what, const char* tensor, double err, double tol) {
  const bool ok = err < tol;  // NaN compares false: fails
  std::printf("  check %-10s %-4s nerr %.3e  %s\n", what, tensor, err, ok ? "PASS" : "FAIL");
  return ok;
}

// The peer's count: the causal T*T/2 score pairs, also for a window.
double flops(const Shape& s) { return 3.5 * 4.0 * s.B * s.Hq * double(s.T) * s.T * s.D / 2; }
// The same with the pairs a query actually sees (min(i + 1, window)): the work done under a window.
double flops_exact(const Shape& s) {
  const double W = s.window > 0 ? s.window : s.T, T = s.T;
  const double pairs = W >= T ? T * (T + 1) / 2 : W * (W + 1) / 2 + (T - W) * W;
  return 3.5 * 4.0 * s.B * s.Hq * pairs * s.D;
}

Row run_shape(const Shape& s, uint64_t seed, cudaStream_t stream) {
  Row row{s, "ok"};
  std::printf("\n== B=%d T=%d Hq=%d Hkv=%d D=%d window=%d\n", s.B, s.T, s.Hq, s.Hkv, s.D, s.window);
  std::string why;
  const auto t0 = std::chrono::steady_clock::now();
  if (!cudnn_attention::supported(s, &why)) {
    std::printf("  UNSUPPORTED: %s\n", why.c_str());
    row.status = "unsupported";
    return row;
  }
  const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  plans built in %.2f s: %s\n", build_s, cudnn_attention::describe(s).c_str());

  const size_t nq = size_t(s.B) * s.T * s.Hq * s.D, nkv = size_t(s.B) * s.T * s.Hkv * s.D;
  const size_t nstat = size_t(s.B) * s.Hq * s.T;
  DevBuf<bf16> q(nq), k(nkv), v(nkv), dout(nq), out(nq), dq(nq), dk(nkv), dv(nkv);
  DevBuf<float> lse(nstat);
  const auto hq = fill_random(q.p, nq, seed), hk = fill_random(k.p, nkv, seed + 1),
             hv = fill_random(v.p, nkv, seed + 2), hdo = fill_random(dout.p, nq, seed + 3);
  const size_t ws_bytes = cudnn_attention::workspace_bytes(s);
  DevBuf<char> ws(ws_bytes);

  auto cudnn_fwd = [&] { cudnn_attention::forward(s, q.p, k.p, v.p, out.p, lse.p, ws.p, stream); };
  auto cudnn_bwd = [&] {
    cudnn_attention::backward(s, q.p, k.p, v.p, out.p, dout.p, lse.p, dq.p, dk.p, dv.p, ws.p, stream);
  };
  cudnn_fwd();
  cudnn_bwd();
  MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
  MOELAB_CUDA_CHECK(cudaGetLastError());
  const auto c_out = to_host(out.p, nq), c_lse = to_host(lse.p, nstat), c_dq = to_host(dq.p, nq),
             c_dk = to_host(dk.p, nkv), c_dv = to_host(dv.p, nkv);

  bool ok = true;
  {  // fp64 reference on batch row 0 and the last kv group (the last heads catch head-offset bugs).
    const int g = s.Hkv - 1, group = s.Hq / s.Hkv;
    const HostRef r = host_reference(s, hq, hk, hv, hdo, 0, g);
    ok &= report("vs fp64", "out", slice_err(c_out, r.out, s, s.Hq, 0, g * group, group, false), kRefTol);
    ok &= report("vs fp64", "lse", slice_err(c_lse, r.lse, s, s.Hq, 0, g * group, group, true), kRefTol);
    ok &= report("vs fp64", "dq", slice_err(c_dq, r.dq, s, s.Hq, 0, g * group, group, false), kRefTol);
    ok &= report("vs fp64", "dk", slice_err(c_dk, r.dk, s, s.Hkv, 0, g, 1, false), kRefTol);
    ok &= report("vs fp64", "dv", slice_err(c_dv, r.dv, s, s.Hkv, 0, g, 1, false), kRefTol);
  }

  const bool own = flash::supports_head_dim(s.D) && s.window != 1;  // the own tensor-core kernels' domain
  const int own_window = s.window > 0 ? s.window - 1 : 0;
  const float scale = 1.0f / std::sqrt(float(s.D));
  DevBuf<bf16> o_out(own ? nq : 0), o_dq(own ? nq : 0), o_dk(own ? nkv : 0), o_dv(own ? nkv : 0);
  DevBuf<float> o_lse(own ? nstat : 0), o_D(own ? nstat : 0);
  auto own_step = [&] {
    flash::forward(q.p, k.p, v.p, o_out.p, o_lse.p, s.B, s.T, s.Hq, s.Hkv, s.D, own_window, scale, stream);
    flash::row_dot(o_out.p, dout.p, o_D.p, s.B, s.T, s.Hq, s.D, stream);
    flash::backward(q.p, k.p, v.p, dout.p, o_lse.p, o_D.p, o_dq.p, o_dk.p, o_dv.p, DType::bf16, s.B, s.T, s.Hq,
                    s.Hkv, s.D, own_window, scale, stream);
  };
  if (own) {
    own_step();
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOELAB_CUDA_CHECK(cudaGetLastError());
    ok &= report("vs own", "out", nerr(c_out, to_host(o_out.p, nq)), kOwnTol);
    ok &= report("vs own", "lse", nerr(c_lse, to_host(o_lse.p, nstat)), kOwnTol);
    ok &= report("vs own", "dq", nerr(c_dq, to_host(o_dq.p, nq)), kOwnTol);
    ok &= report("vs own", "dk", nerr(c_dk, to_host(o_dk.p, nkv)), kOwnTol);
    ok &= report("vs own", "dv", nerr(c_dv, to_host(o_dv.p, nkv)), kOwnTol);
  }

  {  // CUDA graph: capture fwd+bwd (on the cached workspace) and replay onto poisoned outputs.
    cudnn_attention::prepare(s);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    MOELAB_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      cudnn_attention::forward(s, q.p, k.p, v.p, out.p, lse.p, nullptr, stream);
      cudnn_attention::backward(s, q.p, k.p, v.p, out.p, dout.p, lse.p, dq.p, dk.p, dv.p, nullptr, stream);
    } catch (...) {
      cudaStreamEndCapture(stream, &graph);  // leave the stream usable for the next shape
      cudaGetLastError();
      throw;
    }
    MOELAB_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    MOELAB_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (auto* b : {&out, &dq, &dk, &dv}) b->poison();
    lse.poison();
    MOELAB_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MOELAB_CUDA_CHECK(cudaStreamSynchronize(stream));
    ok &= report("graph", "out", nerr(to_host(out.p, nq), c_out), kGraphTol);
    ok &= report("graph", "lse", nerr(to_host(lse.p, nstat), c_lse), kGraphTol);
    ok &= report("graph", "dq", nerr(to_host(dq.p, nq), c_dq), kGraphTol);
    ok &= report("graph", "dk", nerr(to_host(dk.p, nkv), c_dk), kGraphTol);
    ok &= report("graph", "dv", nerr(to_host(dv.p, nkv), c_dv), kGraphTol);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }

  auto median_ms = [](cudaStream_t st, const std::function<void()>& fn) { return median_event_ms(st, fn, kWarmup, kReps); };
  row.fwd_ms = median_ms(stream, cudnn_fwd);
  row.bwd_ms = median_ms(stream, cudnn_bwd);
  row.step_ms = median_ms(stream, [&] {
    cudnn_fwd();
    cudnn_bwd();
  });
  if (own) row.own_ms = median_ms(stream, own_step);
  MOELAB_CUDA_CHECK(cudaGetLastError());
  row.status = ok ? "ok" : "FAIL";
  std::printf("  cuDNN fwd %.3f ms, bwd %.3f ms, fwd+bwd %.3f ms (%.1f TFLOP/s)", row.fwd_ms, row.bwd_ms, row.step_ms,
              flops(s) / row.step_ms / 1e9);
  if (own) std::printf("; own fwd+bwd %.3f ms (%.1f TFLOP/s)", row.own_ms, flops(s) / row.own_ms / 1e9);
  std::printf("\n");
  return row;
}

int run(int argc, char** argv) {
  std::vector<Shape> shapes;
  if (argc == 6 || argc == 7) {
    shapes.push_back({std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]),
                      std::atoi(argv[5]), argc == 7 ? std::atoi(argv[6]) : 0});
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: %s [B T Hq Hkv D [window]]\n", argv[0]);
    return 2;
  } else {
    shapes = {
        // the peer's shapes (Hq = Hkv = H)
        {16, 1024, 12, 12, 64, 0},
        {16, 1024, 6, 6, 128, 0},
        {8, 2048, 8, 8, 128, 0},
        {8, 2048, 10, 10, 128, 0},
        {4, 4096, 16, 16, 128, 0},
        {8, 2048, 8, 8, 128, 1024},
        // grouped-query at the seed's size, against the own kernels
        {16, 1024, 12, 4, 64, 0},
        // odd: T not a multiple of 64, one head, one kv head, windows of T/2
        {4, 1000, 8, 8, 64, 0},
        {4, 1000, 8, 8, 128, 0},
        {2, 1024, 1, 1, 64, 0},
        {2, 1024, 1, 1, 128, 0},
        {4, 1024, 8, 1, 64, 0},
        {4, 1024, 8, 1, 128, 0},
        {4, 1000, 8, 2, 64, 500},
        {4, 1000, 8, 2, 128, 500},
    };
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "bench_cudnn_attention: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop{};
  MOELAB_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const uint64_t seed = uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  std::printf("device %s, cuDNN %d (built against %d), seed %llu\n", prop.name, cudnn_attention::version(),
              cudnn_attention::compiled_version(), (unsigned long long)seed);
  cudaStream_t stream;
  MOELAB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::vector<Row> rows;
  for (size_t i = 0; i < shapes.size(); ++i) {
    try {
      rows.push_back(run_shape(shapes[i], seed + 16 * i, stream));
    } catch (const std::exception& e) {  // report and go on with the next shape
      std::printf("  ERROR: %s\n", e.what());
      rows.push_back(Row{shapes[i], "error"});
      MOELAB_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }

  std::printf("\nTFLOP/s: the peer's count (causal T*T/2 pairs); 'seen' counts the pairs a window leaves.\n");
  std::printf("%-24s %6s %9s %9s %9s %8s %8s %9s %8s  %s\n", "B,T,Hq,Hkv,D", "window", "fwd_ms", "bwd_ms",
              "cudnn_ms", "TFLOP/s", "seen", "own_ms", "TFLOP/s", "checks");
  bool all_ok = true;
  for (const Row& r : rows) {
    char shape[64];
    std::snprintf(shape, sizeof shape, "%d,%d,%d,%d,%d", r.s.B, r.s.T, r.s.Hq, r.s.Hkv, r.s.D);
    std::printf("%-24s %6d %9.3f %9.3f %9.3f %8.1f %8.1f", shape, r.s.window, r.fwd_ms, r.bwd_ms, r.step_ms,
                flops(r.s) / r.step_ms / 1e9, flops_exact(r.s) / r.step_ms / 1e9);
    if (std::isnan(r.own_ms))
      std::printf(" %9s %8s", "-", "-");
    else
      std::printf(" %9.3f %8.1f", r.own_ms, flops(r.s) / r.own_ms / 1e9);
    std::printf("  %s\n", r.status.c_str());
    all_ok &= r.status == "ok";
  }
  cudaStreamDestroy(stream);
  std::printf("%s\n", all_ok ? "ALL CHECKS PASSED" : "SOME CHECKS FAILED OR SHAPES UNSUPPORTED");
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cudnn_attention: %s\n", e.what());
    return 1;
  }
}
