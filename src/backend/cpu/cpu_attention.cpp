// Causal grouped-query attention, plainly: per (batch, head) and query, scores against the keys of
// its window (every key up to the query, or the last `window` + 1 of them), a max-shifted softmax,
// and the weighted sum of values; the log-sum-exp is saved so
// the backward recomputes probabilities instead of storing the T x T matrix. The backward runs per
// (batch, kv head) and loops over that kv head's query heads, so dk and dv are each written by one
// thread in a fixed order (no atomics; results independent of the thread count). The per-item
// loops use the vector dot/axpy of simd.hpp and are compiled for AVX2+FMA and the baseline.
#include <cmath>
#include <limits>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"
#include "backend/cpu/simd.hpp"

namespace moelab {

using namespace cpu;

namespace {

struct AttnDims {
  int64_t B, T, Hq, Hkv, hd;
  int64_t window;  // keys t - window .. t are visible to query t (window >= T: full causal)
  // Keys per batch row and the position of query 0: S = T and 0, except when decoding over a KV
  // cache (attention_cached_fwd: the queries are the last T of S positions).
  int64_t S = 0, q0 = 0;
  int64_t first_key(int64_t t) const { return t > window ? t - window : 0; }
};

AttnDims check_attention(const Tensor& q, const Tensor& k, const Tensor& v, int window, const char* op) {
  require_float(q, op, "q");
  require_like(q, k, op, "k");
  require_like(q, v, op, "v");
  require(q.ndim() == 4 && k.ndim() == 4, op,
          "q " + q.describe() + " and k " + k.describe() + " must be [B, T, H, hd]");
  AttnDims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), window > 0 ? window : q.dim(1), q.dim(1), 0};
  require_shape(k, {d.B, d.T, d.Hkv, d.hd}, op, "k");
  require_shape(v, {d.B, d.T, d.Hkv, d.hd}, op, "v");
  require(d.Hkv > 0 && d.Hq % d.Hkv == 0, op,
          "query heads " + std::to_string(d.Hq) + " must be a multiple of kv heads " +
              std::to_string(d.Hkv) + "; fix model.kv_heads");
  return d;
}

// Everything one (batch, head) item of the forward or backward needs.
template <class T>
struct AttnArgs {
  const T *q, *k, *v, *out, *lse, *dout;
  T *o, *l, *dq, *dk, *dv;
  AttnDims d;
  T* scratch;  // T + hd elements per thread
};

// Forward for query head h of batch b.
template <class T>
MOELAB_CPU_INLINE void fwd_item(const AttnArgs<T>& a, int64_t b, int64_t h) {
  const AttnDims& d = a.d;
  const int64_t hk = h / (d.Hq / d.Hkv);
  const T scale = T(1.0 / std::sqrt(double(d.hd)));
  T* p = a.scratch;
  T* acc = a.scratch + d.S;
  for (int64_t i = 0; i < d.T; ++i) {
    const int64_t t = d.q0 + i;  // the query's position among the keys
    const T* qt = a.q + ((b * d.T + i) * d.Hq + h) * d.hd;
    T m = -std::numeric_limits<T>::infinity();
    const int64_t j0 = d.first_key(t);
    for (int64_t j = j0; j <= t; ++j) {
      const T s = dot(qt, a.k + ((b * d.S + j) * d.Hkv + hk) * d.hd, d.hd) * scale;
      p[j] = s;
      m = s > m ? s : m;
    }
    T l = 0;
    for (int64_t j = j0; j <= t; ++j) {
      p[j] = std::exp(p[j] - m);
      l += p[j];
    }
    for (int64_t c = 0; c < d.hd; ++c) acc[c] = T(0);
    for (int64_t j = j0; j <= t; ++j) axpy(p[j], a.v + ((b * d.S + j) * d.Hkv + hk) * d.hd, acc, d.hd);
    T* ot = a.o + ((b * d.T + i) * d.Hq + h) * d.hd;
    const T inv = T(1) / l;
    for (int64_t c = 0; c < d.hd; ++c) ot[c] = acc[c] * inv;
    if (a.l) a.l[(b * d.Hq + h) * d.T + i] = m + std::log(l);  // decoding keeps no lse
  }
}

// Backward for kv head hk of batch b: zeroes its dk, dv, then walks its query heads in order.
template <class T>
MOELAB_CPU_INLINE void bwd_item(const AttnArgs<T>& a, int64_t b, int64_t hk) {
  const AttnDims& d = a.d;
  const int64_t group = d.Hq / d.Hkv;
  const T scale = T(1.0 / std::sqrt(double(d.hd)));
  T* dqt = a.scratch;
  auto kv_off = [&](int64_t j) { return ((b * d.T + j) * d.Hkv + hk) * d.hd; };
  for (int64_t j = 0; j < d.T; ++j)
    for (int64_t i = 0; i < d.hd; ++i) a.dk[kv_off(j) + i] = a.dv[kv_off(j) + i] = T(0);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t qo = ((b * d.T + t) * d.Hq + h) * d.hd;
      const T* qt = a.q + qo;
      const T* got = a.dout + qo;
      const T Dt = dot(got, a.out + qo, d.hd);  // sum_j p_j <dout, v_j>
      const T l = a.lse[(b * d.Hq + h) * d.T + t];
      for (int64_t i = 0; i < d.hd; ++i) dqt[i] = T(0);
      for (int64_t j = d.first_key(t); j <= t; ++j) {
        const T* kj = a.k + kv_off(j);
        const T pj = std::exp(dot(qt, kj, d.hd) * scale - l);
        axpy(pj, got, a.dv + kv_off(j), d.hd);
        const T ds = pj * (dot(got, a.v + kv_off(j), d.hd) - Dt) * scale;
        axpy(ds, kj, dqt, d.hd);
        axpy(ds, qt, a.dk + kv_off(j), d.hd);
      }
      for (int64_t i = 0; i < d.hd; ++i) a.dq[qo + i] = dqt[i];
    }
  }
}

MOELAB_CPU_CLONES void fwd_item_f32(const AttnArgs<float>& a, int64_t b, int64_t h) { fwd_item(a, b, h); }
MOELAB_CPU_CLONES void fwd_item_f64(const AttnArgs<double>& a, int64_t b, int64_t h) { fwd_item(a, b, h); }
MOELAB_CPU_CLONES void bwd_item_f32(const AttnArgs<float>& a, int64_t b, int64_t h) { bwd_item(a, b, h); }
MOELAB_CPU_CLONES void bwd_item_f64(const AttnArgs<double>& a, int64_t b, int64_t h) { bwd_item(a, b, h); }

inline void run_fwd_item(const AttnArgs<float>& a, int64_t b, int64_t h) { fwd_item_f32(a, b, h); }
inline void run_fwd_item(const AttnArgs<double>& a, int64_t b, int64_t h) { fwd_item_f64(a, b, h); }
inline void run_bwd_item(const AttnArgs<float>& a, int64_t b, int64_t h) { bwd_item_f32(a, b, h); }
inline void run_bwd_item(const AttnArgs<double>& a, int64_t b, int64_t h) { bwd_item_f64(a, b, h); }

// The forward over every (batch, query head) item, in parallel: training attention and
// attention over a KV cache differ only in their dims (key offset, cache length) and whether
// the log-sum-exp is kept.
template <class Pool>
void forward_items(Pool& pool, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor* lse,
                   const AttnDims& d) {
  with_float(q.dtype, [&](auto te) {
    using T = decltype(te);
    AttnArgs<T> base{};
    base.q = ptr<T>(q);
    base.k = ptr<T>(k);
    base.v = ptr<T>(v);
    base.o = ptr<T>(out);
    base.l = lse ? ptr<T>(*lse) : nullptr;
    base.d = d;
    pool.parallel_for(d.B * d.Hq, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> scratch(static_cast<size_t>(d.S + d.hd));
      AttnArgs<T> a = base;
      a.scratch = scratch.data();
      for (int64_t item = i0; item < i1; ++item) run_fwd_item(a, item / d.Hq, item % d.Hq);
    });
  });
}

}  // namespace

void CpuBackend::attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                               Tensor& lse, int window) {
  const char* op = "attention_fwd";
  const AttnDims d = check_attention(q, k, v, window, op);
  require_like(q, out, op, "out");
  require_like(q, lse, op, "lse");
  require_shape(out, q.shape, op, "out");
  require_numel(lse, d.B * d.Hq * d.T, op, "lse");
  forward_items(pool_, q, k, v, out, &lse, d);
}

void CpuBackend::attention_cached_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, int window) {
  const char* op = "attention_cached_fwd";
  require_float(q, op, "q");
  require_like(q, k, op, "k");
  require_like(q, v, op, "v");
  require_like(q, out, op, "out");
  require(q.ndim() == 4 && k.ndim() == 4, op, "q " + q.describe() + " and k " + k.describe() + " must be [B, T, H, hd]");
  require_shape(out, q.shape, op, "out");
  const int64_t S = k.dim(1), Tq = q.dim(1);
  AttnDims d{q.dim(0), Tq, q.dim(2), k.dim(2), q.dim(3), window > 0 ? window : S, S, S - Tq};
  require(S >= Tq, op, "the cache's " + std::to_string(S) + " positions must include the " + std::to_string(Tq) + " queries");
  require_shape(k, {d.B, S, d.Hkv, d.hd}, op, "k");
  require_shape(v, {d.B, S, d.Hkv, d.hd}, op, "v");
  require(d.Hkv > 0 && d.Hq % d.Hkv == 0, op,
          "query heads " + std::to_string(d.Hq) + " must be a multiple of kv heads " + std::to_string(d.Hkv));
  forward_items(pool_, q, k, v, out, nullptr, d);  // no log-sum-exp: nothing runs backward
}

void CpuBackend::attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& out, const Tensor& lse, const Tensor& dout,
                               Tensor& dq, Tensor& dk, Tensor& dv, int window) {
  const char* op = "attention_bwd";
  const AttnDims d = check_attention(q, k, v, window, op);
  require_like(q, out, op, "out");
  require_like(q, lse, op, "lse");
  require_like(q, dout, op, "dout");
  require_like(q, dq, op, "dq");
  require_like(q, dk, op, "dk");
  require_like(q, dv, op, "dv");
  require_shape(out, q.shape, op, "out");
  require_shape(dout, q.shape, op, "dout");
  require_shape(dq, q.shape, op, "dq");
  require_shape(dk, k.shape, op, "dk");
  require_shape(dv, v.shape, op, "dv");
  require_numel(lse, d.B * d.Hq * d.T, op, "lse");
  with_float(q.dtype, [&](auto te) {
    using T = decltype(te);
    AttnArgs<T> base{};
    base.q = ptr<T>(q);
    base.k = ptr<T>(k);
    base.v = ptr<T>(v);
    base.out = ptr<T>(out);
    base.lse = ptr<T>(lse);
    base.dout = ptr<T>(dout);
    base.dq = ptr<T>(dq);
    base.dk = ptr<T>(dk);
    base.dv = ptr<T>(dv);
    base.d = d;
    pool_.parallel_for(d.B * d.Hkv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> scratch(static_cast<size_t>(d.hd));
      AttnArgs<T> a = base;
      a.scratch = scratch.data();
      for (int64_t item = i0; item < i1; ++item) run_bwd_item(a, item / d.Hkv, item % d.Hkv);
    });
  });
}

}  // namespace moelab
