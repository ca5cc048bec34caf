// Elementwise ops and whole-tensor sums: fill, copy (with dtype conversion), axpby, sum, ReLU^2.
// Each is split into fixed contiguous ranges; sums use fixed chunks so the bits do not depend on
// the thread count.
#include <algorithm>

#include "backend/cpu/convert.hpp"
#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

namespace {
constexpr int64_t kElemGrain = 1 << 15;
}

void CpuBackend::fill(Tensor& t, float value) {
  require_host(t, "fill", "t");
  with_element(t.dtype, "fill", [&](auto e) {
    using E = decltype(e);
    const E v = from_double<E>(double(value));
    E* p = ptr<E>(t);
    pool_.parallel_for(t.numel(), kElemGrain, [&](int64_t b, int64_t end) {
      std::fill(p + b, p + end, v);
    });
  });
}

void CpuBackend::copy(const Tensor& src, Tensor& dst) {
  require_host(src, "copy", "src");
  require_host(dst, "copy", "dst");
  require(src.numel() == dst.numel(), "copy",
          "src " + src.describe() + " and dst " + dst.describe() + " differ in element count");
  if (src.data == dst.data && src.dtype == dst.dtype) return;
  const size_t ss = dtype_size(src.dtype), ds = dtype_size(dst.dtype);
  pool_.parallel_for(src.numel(), kElemGrain, [&](int64_t b, int64_t e) {
    convert_elements(src.dtype, static_cast<const char*>(src.data) + size_t(b) * ss, dst.dtype,
                     static_cast<char*>(dst.data) + size_t(b) * ds, e - b, "copy");
  });
}

void CpuBackend::axpby(float a, const Tensor& x, float b, Tensor& y) {
  require_host(x, "axpby", "x");
  require_host(y, "axpby", "y");
  require(x.numel() == y.numel(), "axpby",
          "x " + x.describe() + " and y " + y.describe() + " differ in element count");
  require(x.dtype != DType::i32 && y.dtype != DType::i32, "axpby", "x and y must be float tensors");
  with_element(x.dtype, "axpby", [&](auto xe) {
    using X = decltype(xe);
    with_element(y.dtype, "axpby", [&](auto ye) {
      using Y = decltype(ye);
      const X* xp = ptr<X>(x);
      Y* yp = ptr<Y>(y);
      pool_.parallel_for(y.numel(), kElemGrain, [&](int64_t i0, int64_t i1) {
        if constexpr (std::is_same_v<X, Y> && std::is_floating_point_v<X>) {
          const X av = X(a), bv = X(b);
          // b == 0 ignores y's old contents (NaN included), like matmul's beta.
          if (b == 0.0f)
            for (int64_t i = i0; i < i1; ++i) yp[i] = av * xp[i];
          else
            for (int64_t i = i0; i < i1; ++i) yp[i] = av * xp[i] + bv * yp[i];
        } else {
          for (int64_t i = i0; i < i1; ++i) {
            const double yo = b == 0.0f ? 0.0 : double(b) * to_double(yp[i]);
            yp[i] = from_double<Y>(double(a) * to_double(xp[i]) + yo);
          }
        }
      });
    });
  });
}

void CpuBackend::sum(const Tensor& x, Tensor& out, bool accumulate) {
  require_host(x, "sum", "x");
  require_float(out, "sum", "out");
  require_numel(out, 1, "sum", "out");
  double s = with_element(x.dtype, "sum", [&](auto xe) {
    using X = decltype(xe);
    const X* xp = ptr<X>(x);
    return fixed_chunk_sum(pool_, x.numel(), [&](int64_t i) { return to_double(xp[i]); });
  });
  with_float(out.dtype, [&](auto oe) {
    using O = decltype(oe);
    O* o = ptr<O>(out);
    o[0] = accumulate ? O(double(o[0]) + s) : O(s);
  });
}

void CpuBackend::relu2_fwd(const Tensor& h, Tensor& a, const AmaxSink* amax) {
  require_float(h, "relu2_fwd", "h");
  require_like(h, a, "relu2_fwd", "a");
  require_numel(a, h.numel(), "relu2_fwd", "a");
  with_float(h.dtype, [&](auto te) {
    using T = decltype(te);
    const T* hp = ptr<T>(h);
    T* ap = ptr<T>(a);
    pool_.parallel_for(h.numel(), kElemGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T r = hp[i] > T(0) ? hp[i] : T(0);
        ap[i] = r * r;
      }
    });
  });
  if (amax) raise_expert_amax(a, *amax, "relu2_fwd");
}

void CpuBackend::relu2_bwd(const Tensor& h, const Tensor& da, Tensor& dh, const AmaxSink* amax) {
  require_float(h, "relu2_bwd", "h");
  require_like(h, da, "relu2_bwd", "da");
  require_like(h, dh, "relu2_bwd", "dh");
  require_numel(da, h.numel(), "relu2_bwd", "da");
  require_numel(dh, h.numel(), "relu2_bwd", "dh");
  with_float(h.dtype, [&](auto te) {
    using T = decltype(te);
    const T* hp = ptr<T>(h);
    const T* dap = ptr<T>(da);
    T* dhp = ptr<T>(dh);
    pool_.parallel_for(h.numel(), kElemGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dhp[i] = hp[i] > T(0) ? T(2) * hp[i] * dap[i] : T(0);
    });
  });
  if (amax) raise_expert_amax(dh, *amax, "relu2_bwd");
}

}  // namespace moelab
