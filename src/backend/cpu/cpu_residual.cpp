// Residual-stream mixing with learned scalars (y = a x + b x0) and the gated value embedding of
// the attention's values, with their backwards. Rows are split over threads; the scalar and
// gate-weight gradients are reduced in a fixed order, so the bits do not depend on the thread
// count.
#include <cmath>
#include <initializer_list>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

void CpuBackend::lambda_mix_fwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0, Tensor& y) {
  const char* op = "lambda_mix_fwd";
  require_float(x, op, "x");
  require_like(x, x0, op, "x0");
  require_like(x, y, op, "y");
  require_like(x, a, op, "a");
  require_like(x, b, op, "b");
  require_numel(a, 1, op, "a");
  require_numel(b, 1, op, "b");
  require(x0.numel() == x.numel() && y.numel() == x.numel(), op,
          "x " + x.describe() + ", x0 " + x0.describe() + " and y " + y.describe() + " differ in size");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T av = ptr<T>(a)[0], bv = ptr<T>(b)[0];
    const T* xp = ptr<T>(x);
    const T* x0p = ptr<T>(x0);
    T* yp = ptr<T>(y);
    pool_.parallel_for(x.numel(), 1 << 15, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) yp[i] = av * xp[i] + bv * x0p[i];
    });
  });
}

void CpuBackend::lambda_mix_bwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0,
                                const Tensor& dy, Tensor& dx, Tensor& dx0, Tensor& da, Tensor& db) {
  const char* op = "lambda_mix_bwd";
  require_float(x, op, "x");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&x0, &dy, &dx, &dx0, &a, &b, &da, &db}) require_like(x, *t, op, "tensor");
  require_numel(a, 1, op, "a");
  require_numel(b, 1, op, "b");
  require_numel(da, 1, op, "da");
  require_numel(db, 1, op, "db");
  const int64_t n = x.numel();
  require(x0.numel() == n && dy.numel() == n && dx.numel() == n && dx0.numel() == n, op,
          "x, x0, dy, dx and dx0 must have the same size");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    const T* x0p = ptr<T>(x0);
    const T* dyp = ptr<T>(dy);
    // The scalar gradients first: dx may alias dy.
    const double ga = fixed_chunk_sum(pool_, n, [&](int64_t i) { return double(xp[i]) * double(dyp[i]); });
    const double gb = fixed_chunk_sum(pool_, n, [&](int64_t i) { return double(x0p[i]) * double(dyp[i]); });
    const T av = ptr<T>(a)[0], bv = ptr<T>(b)[0];
    T* dxp = ptr<T>(dx);
    T* dx0p = ptr<T>(dx0);
    pool_.parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T g = dyp[i];
        dx0p[i] += bv * g;
        dxp[i] = av * g;
      }
    });
    ptr<T>(da)[0] += T(ga);
    ptr<T>(db)[0] += T(gb);
  });
}

namespace {

struct GateShape {
  int64_t N, D, H, C, hd;
};

GateShape gate_shape(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& gate, const char* op) {
  require(x.ndim() == 2 && w.ndim() == 2, op, "x " + x.describe() + " must be [N, D] and w " + w.describe() + " [H, C]");
  GateShape s{x.dim(0), x.dim(1), w.dim(0), w.dim(1), 0};
  require(s.C <= s.D && s.C > 0, op, "w " + w.describe() + " reads more columns than x " + x.describe() + " has");
  require(s.H > 0 && ve.numel() % (s.N * s.H) == 0 && ve.numel() > 0, op,
          "ve " + ve.describe() + " is not [N, H * hd] for N = " + std::to_string(s.N) + ", H = " + std::to_string(s.H));
  s.hd = ve.numel() / (s.N * s.H);
  require_numel(gate, s.N * s.H, op, "gate");
  return s;
}

}  // namespace

void CpuBackend::value_gate_fwd(const Tensor& x, const Tensor& w, const Tensor& ve, Tensor& v, Tensor& gate) {
  const char* op = "value_gate_fwd";
  require_float(x, op, "x");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&w, &ve, &v, &gate}) require_like(x, *t, op, "tensor");
  const GateShape s = gate_shape(x, w, ve, gate, op);
  require(v.numel() == ve.numel(), op, "v " + v.describe() + " and ve " + ve.describe() + " differ in size");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    const T* wp = ptr<T>(w);
    const T* vep = ptr<T>(ve);
    T* vp = ptr<T>(v);
    T* gp = ptr<T>(gate);
    pool_.parallel_for(s.N, grain_for(s.H * (s.C + s.hd)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t h = 0; h < s.H; ++h) {
          double z = 0;
          for (int64_t c = 0; c < s.C; ++c) z += double(xp[n * s.D + c]) * double(wp[h * s.C + c]);
          const T g = T(2.0 / (1.0 + std::exp(-z)));
          gp[n * s.H + h] = g;
          const int64_t o = (n * s.H + h) * s.hd;
          for (int64_t d = 0; d < s.hd; ++d) vp[o + d] += g * vep[o + d];
        }
    });
  });
}

void CpuBackend::value_gate_bwd(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& gate,
                                const Tensor& dv, Tensor& dve, Tensor& dw, Tensor& dx) {
  const char* op = "value_gate_bwd";
  require_float(x, op, "x");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&w, &ve, &gate, &dv, &dve, &dw, &dx}) require_like(x, *t, op, "tensor");
  const GateShape s = gate_shape(x, w, ve, gate, op);
  require(dv.numel() == ve.numel() && dve.numel() == ve.numel(), op, "dv and dve must have ve's size");
  require_shape(dw, w.shape, op, "dw");
  require_shape(dx, x.shape, op, "dx");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    const T* wp = ptr<T>(w);
    const T* vep = ptr<T>(ve);
    const T* gp = ptr<T>(gate);
    const T* dvp = ptr<T>(dv);
    T* dvep = ptr<T>(dve);
    T* dxp = ptr<T>(dx);
    std::vector<double> dz(size_t(s.N * s.H));
    pool_.parallel_for(s.N, grain_for(s.H * (s.C + s.hd)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t h = 0; h < s.H; ++h) {
          const int64_t o = (n * s.H + h) * s.hd;
          const double g = double(gp[n * s.H + h]);
          double dg = 0;
          for (int64_t d = 0; d < s.hd; ++d) {
            dg += double(dvp[o + d]) * double(vep[o + d]);
            dvep[o + d] = T(g * double(dvp[o + d]));
          }
          // g = 2 sigmoid(z): dg/dz = 2 sigmoid (1 - sigmoid) = g (1 - g / 2).
          dz[size_t(n * s.H + h)] = dg * g * (1.0 - 0.5 * g);
        }
        for (int64_t c = 0; c < s.C; ++c) {
          double acc = 0;
          for (int64_t h = 0; h < s.H; ++h) acc += dz[size_t(n * s.H + h)] * double(wp[h * s.C + c]);
          dxp[n * s.D + c] += T(acc);
        }
      }
    });
    // dw[h, c] = sum_n dz[n, h] x[n, c]: each entry over all tokens in order.
    T* dwp = ptr<T>(dw);
    pool_.parallel_for(s.H * s.C, grain_for(s.N), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = i / s.C, c = i % s.C;
        double acc = 0;
        for (int64_t n = 0; n < s.N; ++n) acc += dz[size_t(n * s.H + h)] * double(xp[n * s.D + c]);
        dwp[i] += T(acc);
      }
    });
  });
}

}  // namespace moelab
