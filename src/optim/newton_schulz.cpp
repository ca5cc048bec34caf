// Newton-Schulz iteration on Backend ops; see newton_schulz.hpp for the math.
#include "optim/newton_schulz.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace moelab {

Tensor scratch_view(const Tensor& scratch, const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return scratch.rows_slice(0, n).view(shape);
}

NewtonSchulz::NewtonSchulz(Backend& backend, int64_t max_numel, int64_t max_side) : backend_(backend) {
  const DType act = backend.act_dtype();
  for (auto& x : x_) x = backend.alloc({std::max<int64_t>(max_numel, 1), 1}, act);
  gram_ = backend.alloc({std::max<int64_t>(max_side * max_side, 1), 1}, act);
  poly_ = backend.alloc({std::max<int64_t>(max_side * max_side, 1), 1}, act);
}

Tensor NewtonSchulz::run(const Tensor& g, int64_t steps) {
  MOELAB_CHECK(g.ndim() == 2, "Newton-Schulz needs a matrix, got " + g.describe());
  const int64_t m = g.dim(0), n = g.dim(1), side = std::min(m, n);
  MOELAB_CHECK(g.numel() <= x_[0].numel() && side * side <= gram_.numel(),
               "Newton-Schulz scratch too small for " + g.describe());
  const bool tall = m > n;
  Tensor x = scratch_view(x_[0], {m, n});
  Tensor next = scratch_view(x_[1], {m, n});
  Tensor a = scratch_view(gram_, {side, side});
  Tensor p = scratch_view(poly_, {side, side});

  // Round to the act dtype first, then normalize there (nanochat: G.bfloat16() / norm).
  if (g.dtype == x.dtype) {
    backend_.frobenius_normalize(g, x, kNormEps);
  } else {
    backend_.copy(g, next);
    backend_.frobenius_normalize(next, x, kNormEps);
  }
  for (int64_t i = 0; i < steps; ++i) {
    if (tall)
      backend_.matmul(x, true, x, false, a);  // A = X^T X   [n, n]
    else
      backend_.matmul(x, false, x, true, a);  // A = X X^T   [m, m]
    backend_.matmul(a, false, a, false, p, kC);  // P = c A^2 + b A
    backend_.axpby(kB, a, 1.0f, p);
    if (tall)
      backend_.matmul(x, false, p, false, next);  // X' = X P + a X
    else
      backend_.matmul(p, false, x, false, next);  // X' = P X + a X
    backend_.axpby(kA, x, 1.0f, next);
    std::swap(x, next);
  }
  return x;
}

}  // namespace moelab
