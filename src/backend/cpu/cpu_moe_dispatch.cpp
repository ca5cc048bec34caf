// MoE dispatch: the plan (which permuted row each (token, choice) lands in, with GShard's
// capacity drop rule), the gather of token rows into expert order, the gated scatter back, and
// their backwards. The plan is a serial counting pass (it is O(T k)); the data movement is split
// over tokens or permuted rows so every output row is written by one thread.
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

void CpuBackend::moe_plan(const Tensor& topk_idx, int experts, int capacity, Tensor& routed,
                          Tensor& counts, Tensor& offsets, Tensor& slot, Tensor& row_token, DropOrder order) {
  const char* op = "moe_plan";
  require_i32(topk_idx, op, "topk_idx");
  require(topk_idx.ndim() == 2, op, "topk_idx is " + topk_idx.describe() + " but must be [T, k]");
  require(experts >= 1, op, "experts = " + std::to_string(experts) + " must be positive");
  for (const Tensor* t : {&routed, &counts, &offsets, &slot, &row_token}) require_i32(*t, op, "plan tensor");
  const int64_t T = topk_idx.dim(0), k = topk_idx.dim(1), E = experts;
  require_numel(routed, E, op, "routed");
  require_numel(counts, E, op, "counts");
  require_numel(offsets, E + 1, op, "offsets");
  require_numel(slot, T * k, op, "slot");
  const int32_t* idx = ptr<int32_t>(topk_idx);
  int32_t* rt = ptr<int32_t>(routed);
  int32_t* ct = ptr<int32_t>(counts);
  int32_t* of = ptr<int32_t>(offsets);
  int32_t* sl = ptr<int32_t>(slot);
  int32_t* tok = ptr<int32_t>(row_token);
  std::fill(rt, rt + E, 0);
  // Pass 1, in priority order (rank j, then token t; or flat token-major (t, j)): each
  // assignment's rank within its expert, kept in slot for now.
  for (int64_t a = 0; a < T * k; ++a) {
    const int64_t t = order == DropOrder::token ? a / k : a % T;
    const int64_t j = order == DropOrder::token ? a % k : a / T;
      const int32_t e = idx[t * k + j];
      require(e >= 0 && e < E, op,
              "topk_idx[" + std::to_string(t) + ", " + std::to_string(j) + "] = " +
                  std::to_string(e) + " is not an expert in [0, " + std::to_string(E) + ")");
      sl[t * k + j] = rt[e]++;
    }
  of[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    ct[e] = capacity > 0 ? std::min(rt[e], int32_t(capacity)) : rt[e];
    of[e + 1] = of[e] + ct[e];
  }
  require(row_token.numel() >= of[E], op,
          "row_token " + row_token.describe() + " is smaller than the " + std::to_string(of[E]) +
              " kept rows; allocate at least T * k rows");
  // Pass 2: final rows; an assignment ranked at or past the capacity is dropped.
  for (int64_t a = 0; a < T * k; ++a) {
    const int32_t e = idx[a], rank = sl[a];
    if (rank < ct[e]) {
      sl[a] = of[e] + rank;
      tok[of[e] + rank] = int32_t(a / k);
    } else {
      sl[a] = -1;
    }
  }
}

namespace {

// Number of choices per token implied by slot [T*k] for T token rows.
int64_t choices_per_token(const Tensor& slot, int64_t tokens, const char* op) {
  require_i32(slot, op, "slot");
  const int64_t k = tokens > 0 ? slot.numel() / tokens : 0;
  require(tokens == 0 || (k >= 1 && slot.numel() == tokens * k), op,
          "slot " + slot.describe() + " does not hold k entries for each of " +
              std::to_string(tokens) + " tokens");
  return k;
}

void check_slots(const Tensor& slot, int64_t rows, const char* op) {
  const int32_t* s = ptr<int32_t>(slot);
  for (int64_t i = 0; i < slot.numel(); ++i)
    require(s[i] >= -1 && s[i] < rows, op,
            "slot[" + std::to_string(i) + "] = " + std::to_string(s[i]) + " is past the " +
                std::to_string(rows) + " permuted rows; pass the slots written by moe_plan");
}

}  // namespace

void CpuBackend::raise_expert_amax(const Tensor& out, const AmaxSink& amax, const char* op) {
  require(amax.per_expert(), op, "amax must be an AmaxSink per expert (with offsets): the rows are in expert order");
  require_i32(amax.offsets, op, "amax.offsets");
  require(amax.amax.dtype == DType::f32 && amax.amax.numel() + 1 == amax.offsets.numel(), op,
          "amax.amax must be f32 [E] beside offsets [E+1], got " + amax.amax.describe() + " and " +
              amax.offsets.describe());
  const int64_t E = amax.amax.numel(), D = out.cols();
  const int32_t* o = ptr<int32_t>(amax.offsets);
  require(E == 0 || (o[0] >= 0 && int64_t(o[E]) * D <= out.numel()), op,
          "amax.offsets run past the rows of " + out.describe());
  float* m = ptr<float>(amax.amax);
  with_float(out.dtype, [&](auto te) {
    using T = decltype(te);
    const T* v = ptr<T>(out);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = int64_t(o[e]) * D; i < int64_t(o[e + 1]) * D; ++i)
        m[e] = std::max(m[e], float(std::fabs(double(v[i]))));
  });
}

void CpuBackend::raise_tensor_amax(const Tensor& out, const AmaxSink& sink, const char* op) {
  const Tensor& amax = sink.amax;
  require(!sink.per_expert() && amax.dtype == DType::f32 && amax.numel() == 1, op,
          "amax must be a whole-tensor AmaxSink (f32 [1], no offsets), got " + amax.describe());
  float* m = ptr<float>(amax);
  with_float(out.dtype, [&](auto te) {
    using T = decltype(te);
    const T* v = ptr<T>(out);
    for (int64_t i = 0; i < out.numel(); ++i) m[0] = std::max(m[0], float(std::fabs(double(v[i]))));
  });
}

void CpuBackend::moe_permute(const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                             const AmaxSink* amax) {
  const char* op = "moe_permute";
  require_float(x, op, "x");
  require_like(x, xp, op, "xp");
  require_i32(row_token, op, "row_token");
  require_i32(offsets, op, "offsets");
  require(offsets.numel() >= 2, op, "offsets " + offsets.describe() + " must be [E+1]");
  const int64_t D = x.cols(), total = ptr<int32_t>(offsets)[offsets.numel() - 1];
  require(xp.cols() == D && total >= 0 && total <= xp.rows() && total <= row_token.numel(), op,
          "xp " + xp.describe() + " or row_token " + row_token.describe() + " cannot hold the " +
              std::to_string(total) + " permuted rows of width " + std::to_string(D));
  const int32_t* tok = ptr<int32_t>(row_token);
  for (int64_t r = 0; r < total; ++r)
    require(tok[r] >= 0 && tok[r] < x.rows(), op,
            "row_token[" + std::to_string(r) + "] = " + std::to_string(tok[r]) +
                " is not a token row of x " + x.describe());
  with_float(x.dtype, [&](auto te) {
    using T = decltype(te);
    const T* xs = ptr<T>(x);
    T* xd = ptr<T>(xp);
    pool_.parallel_for(total, grain_for(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        std::copy(xs + int64_t(tok[r]) * D, xs + int64_t(tok[r]) * D + D, xd + r * D);
    });
  });
  if (amax) raise_expert_amax(xp, *amax, op);
}

void CpuBackend::moe_permute_bwd(const Tensor& dxp, const Tensor& slot, Tensor& dx) {
  const char* op = "moe_permute_bwd";
  require_float(dx, op, "dx");
  require_like(dx, dxp, op, "dxp");
  const int64_t T = dx.rows(), D = dx.cols();
  const int64_t k = choices_per_token(slot, T, op);
  require(dxp.cols() == D, op, "dxp " + dxp.describe() + " and dx " + dx.describe() + " differ in width");
  check_slots(slot, dxp.rows(), op);
  with_float(dx.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* src = ptr<T_>(dxp);
    T_* dst = ptr<T_>(dx);
    const int32_t* sl = ptr<int32_t>(slot);
    pool_.parallel_for(T, grain_for(D * k), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int32_t s = sl[t * k + j];
          if (s < 0) continue;
          for (int64_t i = 0; i < D; ++i) dst[t * D + i] += src[int64_t(s) * D + i];
        }
    });
  });
}

void CpuBackend::moe_combine(const Tensor& yp, const Tensor& slot, const Tensor& gates, Tensor& y,
                             bool accumulate) {
  const char* op = "moe_combine";
  require_float(y, op, "y");
  require_like(y, yp, op, "yp");
  require_like(y, gates, op, "gates");
  const int64_t T = y.rows(), D = y.cols();
  const int64_t k = choices_per_token(slot, T, op);
  require_numel(gates, T * k, op, "gates");
  require(yp.cols() == D, op, "yp " + yp.describe() + " and y " + y.describe() + " differ in width");
  check_slots(slot, yp.rows(), op);
  with_float(y.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* src = ptr<T_>(yp);
    const T_* g = ptr<T_>(gates);
    T_* dst = ptr<T_>(y);
    const int32_t* sl = ptr<int32_t>(slot);
    pool_.parallel_for(T, grain_for(D * k), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        T_* yr = dst + t * D;
        if (!accumulate) std::fill(yr, yr + D, T_(0));
        for (int64_t j = 0; j < k; ++j) {
          const int32_t s = sl[t * k + j];
          if (s < 0) continue;
          const T_ w = g[t * k + j];
          for (int64_t i = 0; i < D; ++i) yr[i] += w * src[int64_t(s) * D + i];
        }
      }
    });
  });
}

void CpuBackend::moe_combine_bwd(const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates,
                                 Tensor& dyp, Tensor& dgates, const AmaxSink* amax) {
  const char* op = "moe_combine_bwd";
  require_float(dy, op, "dy");
  require_like(dy, yp, op, "yp");
  require_like(dy, gates, op, "gates");
  require_like(dy, dyp, op, "dyp");
  require_like(dy, dgates, op, "dgates");
  const int64_t T = dy.rows(), D = dy.cols();
  const int64_t k = choices_per_token(slot, T, op);
  require_numel(gates, T * k, op, "gates");
  require_numel(dgates, T * k, op, "dgates");
  require(yp.cols() == D && dyp.cols() == D && dyp.rows() >= yp.rows(), op,
          "yp " + yp.describe() + ", dyp " + dyp.describe() + " and dy " + dy.describe() +
              " do not match");
  check_slots(slot, yp.rows(), op);
  with_float(dy.dtype, [&](auto te) {
    using T_ = decltype(te);
    const T_* dyr = ptr<T_>(dy);
    const T_* ypr = ptr<T_>(yp);
    const T_* g = ptr<T_>(gates);
    T_* dypr = ptr<T_>(dyp);
    T_* dg = ptr<T_>(dgates);
    const int32_t* sl = ptr<int32_t>(slot);
    // Each kept slot belongs to exactly one (t, j), so splitting over tokens writes each dyp row once.
    pool_.parallel_for(T, grain_for(D * k), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int32_t s = sl[t * k + j];
          if (s < 0) {
            dg[t * k + j] = T_(0);
            continue;
          }
          const T_ w = g[t * k + j];
          T_ acc = 0;
          for (int64_t i = 0; i < D; ++i) {
            dypr[int64_t(s) * D + i] = w * dyr[t * D + i];
            acc += dyr[t * D + i] * ypr[int64_t(s) * D + i];
          }
          dg[t * k + j] = acc;
        }
    });
  });
  if (amax) raise_expert_amax(dyp, *amax, op);
}

}  // namespace moelab
