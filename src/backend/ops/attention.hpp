// Attention: rotary embedding with QK-norm, causal (windowed, grouped-query) attention and its
// backward, and attention over a KV cache for sampling.
#pragma once
#include <algorithm>
#include <cmath>
#include "core/error.hpp"
#include "backend/ops/core.hpp"
#include "backend/ops/fp8_types.hpp"

namespace moelab {


class AttentionOps : public virtual BackendCore {
 public:
  // --- rotary embedding then per-head RMSNorm (QK-norm), on x [B, T, H, hd] ---------------------
  // cos, sin: [max_seq, hd/2] f32 tables; position of x[b, t] is t. Rotation pairs (i, i + hd/2):
  // y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos; then y = rmsnorm(y) per (b, t, h).
  virtual void rope_norm_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y,
                             Tensor& rstd) = 0;
  virtual void rope_norm_bwd(const Tensor& x, const Tensor& cos, const Tensor& sin,
                             const Tensor& rstd, const Tensor& dy, Tensor& dx, const AmaxSink* amax = nullptr) = 0;

  // --- causal self-attention, softmax scale 1/sqrt(hd) ------------------------------------------
  // q [B, T, Hq, hd]; k, v [B, T, Hkv, hd] with Hq % Hkv == 0 (grouped-query: query head h reads
  // kv head h / (Hq / Hkv)); out [B, T, Hq, hd]; lse [B, Hq, T] f32 (log-sum-exp of scores).
  // window > 0 is a sliding window as flash-attn's window_size = (window, 0): query t sees keys
  // j with t - window <= j <= t. window <= 0 (or >= T) is full causal attention.
  virtual void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                             Tensor& lse, int window = 0) = 0;
  virtual void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                             Tensor& dv, int window = 0) = 0;
  // Incremental decoding: the queries q [B, Tq, Hq, hd] are the last Tq of S positions whose keys
  // and values k, v [B, S, Hkv, hd] (a KV cache's first S rows) hold, S >= Tq; query i sits at
  // position S - Tq + i and sees keys as attention_fwd (causal, window). With S == Tq it is
  // attention_fwd's out. This default runs on the host (read, compute in f64, write), so any
  // backend decodes through the same code; a backend overrides it with its own kernel.
  virtual void attention_cached_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, int window = 0) {
    const int64_t B = q.dim(0), Tq = q.dim(1), Hq = q.dim(2), hd = q.dim(3), S = k.dim(1), Hkv = k.dim(2);
    if (k.ndim() != 4 || k.shape != v.shape || k.dim(0) != B || k.dim(3) != hd || S < Tq || Hkv <= 0 || Hq % Hkv ||
        out.shape != q.shape)
      throw Error("attention_cached_fwd: q " + q.describe() + ", k " + k.describe() + ", v " + v.describe() +
                  ", out " + out.describe() + " do not fit");
    const std::vector<float> qh = read(q), kh = read(k), vh = read(v);
    std::vector<float> oh(qh.size());
    std::vector<double> p(static_cast<size_t>(S)), acc(static_cast<size_t>(hd));
    const double scale = 1.0 / std::sqrt(double(hd));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t t = S - Tq + i, hk = h / (Hq / Hkv);
          const int64_t j0 = window > 0 && t > window ? t - window : 0;
          const float* qt = &qh[size_t(((b * Tq + i) * Hq + h) * hd)];
          double m = -INFINITY, l = 0;
          for (int64_t j = j0; j <= t; ++j) {
            const float* kj = &kh[size_t(((b * S + j) * Hkv + hk) * hd)];
            double s = 0;
            for (int64_t c = 0; c < hd; ++c) s += double(qt[c]) * double(kj[c]);
            p[size_t(j)] = s * scale;
            m = std::max(m, p[size_t(j)]);
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = j0; j <= t; ++j) {
            const double e = std::exp(p[size_t(j)] - m);
            l += e;
            const float* vj = &vh[size_t(((b * S + j) * Hkv + hk) * hd)];
            for (int64_t c = 0; c < hd; ++c) acc[size_t(c)] += e * double(vj[c]);
          }
          for (int64_t c = 0; c < hd; ++c) oh[size_t(((b * Tq + i) * Hq + h) * hd + c)] = float(acc[size_t(c)] / l);
        }
    write(out, oh);
  }
};

}  // namespace moelab
