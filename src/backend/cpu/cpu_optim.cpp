// Optimizer-side ops: the AdamW step, Frobenius normalization (Muon's pre-scaling before
// Newton-Schulz, of one matrix or of each matrix of a stack) and the sum of squares behind gradient-norm reporting. Norms use fixed-chunk
// double sums, so they are exact to f64 rounding and independent of the thread count.
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

namespace {
constexpr int64_t kElemGrain = 1 << 14;
}

void CpuBackend::adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                              const AdamWStep& s, const AmaxSink* amax) {
  const char* op = "adamw_update";
  require_float(param, op, "param");
  require_like(param, grad, op, "grad");
  require_like(param, m, op, "m");
  require_like(param, v, op, "v");
  const int64_t n = param.numel();
  require_numel(grad, n, op, "grad");
  require_numel(m, n, op, "m");
  require_numel(v, n, op, "v");
  require(s.step >= 1, op, "step " + std::to_string(s.step) + " must be 1-based");
  const double b1 = s.beta1, b2 = s.beta2;
  const double bc1 = 1.0 - std::pow(b1, double(s.step)), bc2 = 1.0 - std::pow(b2, double(s.step));
  const double decay = 1.0 - double(s.lr) * double(s.weight_decay);
  with_float(param.dtype, [&](auto te) {
    using T = decltype(te);
    T* p = ptr<T>(param);
    const T* g = ptr<T>(grad);
    T* mp = ptr<T>(m);
    T* vp = ptr<T>(v);
    const T tb1 = T(b1), tb2 = T(b2), tdecay = T(decay), lr = T(s.lr), eps = T(s.eps);
    const T inv_bc1 = T(1.0 / bc1), inv_sqrt_bc2 = T(1.0 / std::sqrt(bc2));
    pool_.parallel_for(n, kElemGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T gi = g[i];
        mp[i] = tb1 * mp[i] + (T(1) - tb1) * gi;
        vp[i] = tb2 * vp[i] + (T(1) - tb2) * gi * gi;
        const T mhat = mp[i] * inv_bc1;
        const T denom = std::sqrt(vp[i]) * inv_sqrt_bc2 + eps;  // sqrt(vhat) + eps
        p[i] = p[i] * tdecay - lr * mhat / denom;
      }
    });
  });
  if (!amax) return;
  const int64_t G = amax->amax.numel();
  require(!amax->per_expert() && amax->amax.dtype == DType::f32 && G > 0 && n % G == 0, op,
          "amax " + amax->amax.describe() + " must be an AmaxSink of parts (no offsets) splitting " + param.describe() +
              " evenly");
  float* am = ptr<float>(amax->amax);
  with_float(param.dtype, [&](auto te) {
    using T = decltype(te);
    const T* p = ptr<T>(param);
    for (int64_t i = 0; i < n; ++i) am[i / (n / G)] = std::max(am[i / (n / G)], float(std::fabs(double(p[i]))));
  });
}

void CpuBackend::sum_squares(const Tensor& x, Tensor& out, bool accumulate) {
  const char* op = "sum_squares";
  require_float(x, op, "x");
  require_float(out, op, "out");
  require_numel(out, 1, op, "out");
  const double s = with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    return fixed_chunk_sum(pool_, x.numel(), [&](int64_t i) { return double(xp[i]) * double(xp[i]); });
  });
  with_float(out.dtype, [&](auto oe) {
    using O = decltype(oe);
    O* o = ptr<O>(out);
    o[0] = accumulate ? O(double(o[0]) + s) : O(s);
  });
}

void CpuBackend::frobenius_normalize(const Tensor& x, Tensor& y, float eps) {
  const char* op = "frobenius_normalize";
  require_float(x, op, "x");
  require_like(x, y, op, "y");
  require_numel(y, x.numel(), op, "y");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    T* yp = ptr<T>(y);
    const double ss =
        fixed_chunk_sum(pool_, x.numel(), [&](int64_t i) { return double(xp[i]) * double(xp[i]); });
    const T inv = T(1.0 / (std::sqrt(ss) + double(eps)));
    pool_.parallel_for(x.numel(), kElemGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) yp[i] = xp[i] * inv;
    });
  });
}

// Slice by slice, each exactly as frobenius_normalize computes it (same chunked sums).
void CpuBackend::muon_momentum(const Tensor& grad, Tensor& momentum, Tensor& update, float mu, bool nesterov) {
  const char* op = "muon_momentum";
  require_float(momentum, op, "momentum");
  require_like(momentum, grad, op, "grad");
  require_like(momentum, update, op, "update");
  const int64_t n = momentum.numel();
  require_numel(grad, n, op, "grad");
  require_numel(update, n, op, "update");
  with_float(momentum.dtype, [&](auto te) {
    using T = decltype(te);
    const T* g = ptr<T>(grad);
    T* b = ptr<T>(momentum);
    T* u = ptr<T>(update);
    const T tm = T(mu), tg = T(1) - T(mu);
    pool_.parallel_for(n, kElemGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        b[i] = tg * g[i] + tm * b[i];
        u[i] = nesterov ? tm * b[i] + tg * g[i] : b[i];
      }
    });
  });
}

void CpuBackend::frobenius_normalize_batched(const Tensor& x, Tensor& y, float eps) {
  const char* op = "frobenius_normalize_batched";
  require_float(x, op, "x");
  require_like(x, y, op, "y");
  require(x.ndim() >= 1 && y.shape == x.shape, op,
          "x is " + x.describe() + " and y " + y.describe() + "; both need one shape [G, ...]");
  for (int64_t g = 0; g < x.dim(0); ++g) {
    Tensor yg = y.index(g);
    frobenius_normalize(x.index(g), yg, eps);
  }
}

// Matrix by matrix; each statistic is summed in index order in double.
void CpuBackend::normuon_update(const Tensor& x, Tensor& second_moment, Tensor& param, const NorMuonStep& st) {
  const char* op = "normuon_update";
  require_float(x, op, "x");
  require_like(x, second_moment, op, "second_moment");
  require_like(x, param, op, "param");
  require(x.ndim() == 3 && param.shape == x.shape, op,
          "x " + x.describe() + " and param " + param.describe() + " must both be one [G, m, n] stack");
  const int64_t G = x.dim(0), m = x.dim(1), n = x.dim(2);
  const bool per_row = m >= n;  // reduce over the longer side's partner: columns when tall
  const int64_t kept = per_row ? m : n, R = per_row ? n : m;
  require_numel(second_moment, G * kept, op, "second_moment");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    pool_.parallel_for(G, 1, [&](int64_t g0, int64_t g1) {
      std::vector<double> q(static_cast<size_t>(kept));
      for (int64_t g = g0; g < g1; ++g) {
        const T* xg = ptr<T>(x) + g * m * n;
        T* pg = ptr<T>(param) + g * m * n;
        T* v = ptr<T>(second_moment) + g * kept;
        std::fill(q.begin(), q.end(), 0.0);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) q[size_t(per_row ? i : j)] += double(xg[i * n + j]) * double(xg[i * n + j]);
        double norm2 = 0, scaled2 = 0;
        std::vector<double> s(static_cast<size_t>(kept));
        for (int64_t r = 0; r < kept; ++r) {
          q[size_t(r)] /= double(R);
          norm2 += q[size_t(r)] * double(R);
          v[r] = T(double(v[r]) + (1.0 - double(st.beta2)) * (q[size_t(r)] - double(v[r])));
          s[size_t(r)] = 1.0 / std::sqrt(std::max(double(v[r]), 1e-10));
          scaled2 += q[size_t(r)] * double(R) * s[size_t(r)] * s[size_t(r)];
        }
        const double keep_norm = std::sqrt(norm2) / std::max(std::sqrt(scaled2), 1e-10);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const double u = double(xg[i * n + j]) * s[size_t(per_row ? i : j)] * keep_norm;
            const double p = double(pg[i * n + j]);
            const bool decay = !st.cautious || u * p >= 0;
            pg[i * n + j] = T(p - double(st.lr) * u - (decay ? double(st.lr) * double(st.weight_decay) * p : 0.0));
          }
      }
    });
  });
}

}  // namespace moelab
