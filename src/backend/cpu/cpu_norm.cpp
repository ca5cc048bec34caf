// Parameter-free RMSNorm and the fused rotary-embedding + per-head RMSNorm (QK-norm). Rows are
// independent, so rows are split over threads; sums of squares accumulate in double so the f32
// reference is as close to exact as its storage allows.
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

void CpuBackend::rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& rstd, const AmaxSink* amax) {
  const char* op = "rmsnorm_fwd";
  require_float(x, op, "x");
  require_like(x, y, op, "y");
  require_like(x, rstd, op, "rstd");
  require_numel(y, x.numel(), op, "y");
  require_numel(rstd, x.rows(), op, "rstd");
  const int64_t R = x.rows(), D = x.cols();
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    T* yp = ptr<T>(y);
    T* rp = ptr<T>(rstd);
    pool_.parallel_for(R, grain_for(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * D;
        double ss = 0;
        for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * double(xr[i]);
        const T rs = T(1.0 / std::sqrt(ss / double(D) + double(kNormEps)));
        rp[r] = rs;
        for (int64_t i = 0; i < D; ++i) yp[r * D + i] = xr[i] * rs;
      }
    });
  });
  if (amax) raise_tensor_amax(y, *amax, op);
}

void CpuBackend::rmsnorm_bwd(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                             bool accumulate, const AmaxSink* amax) {
  const char* op = "rmsnorm_bwd";
  require_float(x, op, "x");
  require_like(x, rstd, op, "rstd");
  require_like(x, dy, op, "dy");
  require_like(x, dx, op, "dx");
  require_numel(rstd, x.rows(), op, "rstd");
  require_numel(dy, x.numel(), op, "dy");
  require_numel(dx, x.numel(), op, "dx");
  const int64_t R = x.rows(), D = x.cols();
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    const T* dyp = ptr<T>(dy);
    const T* rp = ptr<T>(rstd);
    T* dxp = ptr<T>(dx);
    pool_.parallel_for(R, grain_for(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * D;
        const T* dyr = dyp + r * D;
        T* dxr = dxp + r * D;
        double dot = 0;
        for (int64_t i = 0; i < D; ++i) dot += double(dyr[i]) * double(xr[i]);
        const T rs = rp[r];
        // d(x * rstd)/dx = rstd * (I - rstd^2 x x^T / D)
        const T c = T(double(rs) * double(rs) * double(rs) * dot / double(D));
        for (int64_t i = 0; i < D; ++i) {
          const T g = rs * dyr[i] - c * xr[i];
          dxr[i] = accumulate ? dxr[i] + g : g;
        }
      }
    });
  });
  if (amax) raise_tensor_amax(dx, *amax, op);
}

namespace {

struct RopeDims {
  int64_t B, T, H, hd, half;
};

RopeDims check_rope(const Tensor& x, const Tensor& cos, const Tensor& sin, const char* op) {
  require_float(x, op, "x");
  require(x.ndim() == 4, op, "x is " + x.describe() + " but must be [B, T, H, hd]");
  RopeDims d{x.dim(0), x.dim(1), x.dim(2), x.dim(3), x.dim(3) / 2};
  require(d.hd % 2 == 0, op, "head dim " + std::to_string(d.hd) + " must be even for rotary pairs");
  for (const Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    require_float(*t, op, name);
    require(t->ndim() == 2 && t->dim(1) == d.half && t->dim(0) >= d.T, op,
            std::string(name) + " is " + t->describe() + " but must be [max_seq >= " +
                std::to_string(d.T) + ", " + std::to_string(d.half) +
                "]; raise model.max_seq or shorten train.seq_len");
  }
  return d;
}

// Table entry as double, whichever float type the table is stored in.
inline double table_at(const Tensor& t, int64_t i) {
  return t.dtype == DType::f64 ? ptr<double>(t)[i] : double(ptr<float>(t)[i]);
}

}  // namespace

void CpuBackend::rope_norm_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y,
                               Tensor& rstd) {
  const char* op = "rope_norm_fwd";
  const RopeDims d = check_rope(x, cos, sin, op);
  require_like(x, y, op, "y");
  require_like(x, rstd, op, "rstd");
  require_numel(y, x.numel(), op, "y");
  require_numel(rstd, d.B * d.T * d.H, op, "rstd");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    T* yp = ptr<T>(y);
    T* rp = ptr<T>(rstd);
    const int64_t rows = d.B * d.T;  // (b, t) rows, each holding H heads
    pool_.parallel_for(rows, grain_for(d.H * d.hd), [&](int64_t r0, int64_t r1) {
      std::vector<T> c(size_t(d.half)), s(size_t(d.half));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % d.T;
        for (int64_t i = 0; i < d.half; ++i) {
          c[size_t(i)] = T(table_at(cos, t * d.half + i));
          s[size_t(i)] = T(table_at(sin, t * d.half + i));
        }
        for (int64_t h = 0; h < d.H; ++h) {
          const int64_t base = (r * d.H + h) * d.hd;
          const T* xr = xp + base;
          T* yr = yp + base;
          double ss = 0;
          for (int64_t i = 0; i < d.half; ++i) {
            const T x1 = xr[i], x2 = xr[i + d.half];
            const T y1 = x1 * c[size_t(i)] + x2 * s[size_t(i)];
            const T y2 = x2 * c[size_t(i)] - x1 * s[size_t(i)];
            yr[i] = y1;
            yr[i + d.half] = y2;
            ss += double(y1) * double(y1) + double(y2) * double(y2);
          }
          const T rs = T(1.0 / std::sqrt(ss / double(d.hd) + double(kNormEps)));
          rp[r * d.H + h] = rs;
          for (int64_t i = 0; i < d.hd; ++i) yr[i] *= rs;
        }
      }
    });
  });
}

void CpuBackend::rope_norm_bwd(const Tensor& x, const Tensor& cos, const Tensor& sin,
                               const Tensor& rstd, const Tensor& dy, Tensor& dx, const AmaxSink* amax) {
  const char* op = "rope_norm_bwd";
  const RopeDims d = check_rope(x, cos, sin, op);
  require_like(x, rstd, op, "rstd");
  require_like(x, dy, op, "dy");
  require_like(x, dx, op, "dx");
  require_numel(rstd, d.B * d.T * d.H, op, "rstd");
  require_numel(dy, x.numel(), op, "dy");
  require_numel(dx, x.numel(), op, "dx");
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xp = ptr<T>(x);
    const T* dyp = ptr<T>(dy);
    const T* rp = ptr<T>(rstd);
    T* dxp = ptr<T>(dx);
    const int64_t rows = d.B * d.T;
    pool_.parallel_for(rows, grain_for(d.H * d.hd), [&](int64_t r0, int64_t r1) {
      std::vector<T> c(size_t(d.half)), s(size_t(d.half)), u(size_t(d.hd));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % d.T;
        for (int64_t i = 0; i < d.half; ++i) {
          c[size_t(i)] = T(table_at(cos, t * d.half + i));
          s[size_t(i)] = T(table_at(sin, t * d.half + i));
        }
        for (int64_t h = 0; h < d.H; ++h) {
          const int64_t base = (r * d.H + h) * d.hd;
          const T* xr = xp + base;
          const T* dyr = dyp + base;
          T* dxr = dxp + base;
          // Recompute the rotated vector u; the norm's backward needs <dy, u>.
          double dot = 0;
          for (int64_t i = 0; i < d.half; ++i) {
            const T x1 = xr[i], x2 = xr[i + d.half];
            u[size_t(i)] = x1 * c[size_t(i)] + x2 * s[size_t(i)];
            u[size_t(i + d.half)] = x2 * c[size_t(i)] - x1 * s[size_t(i)];
            dot += double(dyr[i]) * double(u[size_t(i)]) +
                   double(dyr[i + d.half]) * double(u[size_t(i + d.half)]);
          }
          const T rs = rp[r * d.H + h];
          const T k = T(double(rs) * double(rs) * double(rs) * dot / double(d.hd));
          for (int64_t i = 0; i < d.half; ++i) {
            const T du1 = rs * dyr[i] - k * u[size_t(i)];
            const T du2 = rs * dyr[i + d.half] - k * u[size_t(i + d.half)];
            // Transpose of the rotation [c s; -s c].
            dxr[i] = du1 * c[size_t(i)] - du2 * s[size_t(i)];
            dxr[i + d.half] = du1 * s[size_t(i)] + du2 * c[size_t(i)];
          }
        }
      }
    });
  });
  if (amax) raise_tensor_amax(dx, *amax, op);
}

}  // namespace moelab
