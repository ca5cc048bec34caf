// Newton-Schulz iteration on Backend ops; see newton_schulz.hpp for the math.
#include "optim/newton_schulz.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace moelab {

NewtonSchulz::NewtonSchulz(Backend& backend, int64_t max_numel, int64_t max_side, int64_t max_batch)
    : backend_(backend) {
  const int64_t batch = std::max<int64_t>(max_batch, 1);
  allocate(max_numel * batch, max_side * max_side * batch);
}

NewtonSchulz::NewtonSchulz(Backend& backend, const std::vector<StackShape>& stacks) : backend_(backend) {
  int64_t iterate = 0, gram = 0;
  for (const StackShape& s : stacks) {
    const int64_t side = std::min(s.m, s.n);
    iterate = std::max(iterate, s.count * s.m * s.n);
    gram = std::max(gram, s.count * side * side);
  }
  allocate(iterate, gram);
}

void NewtonSchulz::allocate(int64_t iterate_elems, int64_t gram_elems) {
  const DType act = backend_.act_dtype();
  for (auto& x : x_) x = backend_.alloc({std::max<int64_t>(iterate_elems, 1), 1}, act);
  gram_ = backend_.alloc({std::max<int64_t>(gram_elems, 1), 1}, act);
  poly_ = backend_.alloc({std::max<int64_t>(gram_elems, 1), 1}, act);
}

void NewtonSchulz::prepare_batched(int64_t groups, int64_t m, int64_t n) {
  for (int64_t rows : {m, std::min(m, n)}) {
    bool known = false;
    for (auto& [key, t] : offsets_) known = known || (key.first == groups && key.second == rows);
    if (known) continue;
    std::vector<int32_t> v(static_cast<size_t>(groups + 1));
    for (int64_t e = 0; e <= groups; ++e) v[size_t(e)] = int32_t(e * rows);
    Tensor t = backend_.alloc({groups + 1}, DType::i32);
    backend_.write_i32(t, v);
    offsets_.emplace_back(std::pair{groups, rows}, t);
  }
}

NsCoefficients NewtonSchulz::step_coefficients(int64_t i) const {
  if (!polar_) return {kA, kB, kC};
  MOELAB_CHECK(i >= 0 && i < 5, "Polar Express has coefficients for 5 steps, asked for step " + std::to_string(i));
  NsCoefficients k = kPolarExpress[i];
  if (i == 0) {  // fold the 1 / 1.02 of the normalization in: X0 = s Y, s = 1 / 1.02
    const double sc = 1.0 / double(kPolarSafety);
    k = {float(k.a * sc), float(k.b * sc * sc * sc), float(k.c * sc * sc * sc * sc * sc)};
  }
  return k;
}

Tensor NewtonSchulz::offsets(int64_t groups, int64_t rows) const {
  for (auto& [key, t] : offsets_)
    if (key.first == groups && key.second == rows) return t;
  throw Error("batched Newton-Schulz: no group offsets for " + std::to_string(groups) + " x " + std::to_string(rows) +
              " rows; call prepare_batched for this shape first");
}

Tensor NewtonSchulz::run(const Tensor& g, int64_t steps) {
  MOELAB_CHECK(g.ndim() == 2, "Newton-Schulz needs a matrix, got " + g.describe());
  const int64_t m = g.dim(0), n = g.dim(1), side = std::min(m, n);
  MOELAB_CHECK(g.numel() <= x_[0].numel() && side * side <= gram_.numel(),
               "Newton-Schulz scratch too small for " + g.describe());
  const bool tall = m > n;
  Tensor x = x_[0].prefix({m, n});
  Tensor next = x_[1].prefix({m, n});
  Tensor a = gram_.prefix({side, side});
  Tensor p = poly_.prefix({side, side});

  // Round to the act dtype first, then normalize there (nanochat: G.bfloat16() / norm).
  if (g.dtype == x.dtype) {
    backend_.frobenius_normalize(g, x, norm_eps());
  } else {
    backend_.copy(g, next);
    backend_.frobenius_normalize(next, x, norm_eps());
  }
  for (int64_t i = 0; i < steps; ++i) {
    const NsCoefficients k = step_coefficients(i);
    if (tall)
      backend_.matmul(x, true, x, false, a);  // A = X^T X   [n, n]
    else
      backend_.matmul(x, false, x, true, a);  // A = X X^T   [m, m]
    backend_.matmul(a, false, a, false, p, k.c);  // P = c A^2 + b A
    backend_.axpby(k.b, a, 1.0f, p);
    if (tall)
      backend_.matmul(x, false, p, false, next);  // X' = X P + a X
    else
      backend_.matmul(p, false, x, false, next);  // X' = P X + a X
    backend_.axpby(k.a, x, 1.0f, next);
    std::swap(x, next);
  }
  return x;
}

Tensor NewtonSchulz::run_batched(const Tensor& g, int64_t steps) {
  MOELAB_CHECK(g.ndim() == 3, "batched Newton-Schulz needs [E, m, n], got " + g.describe());
  const int64_t E = g.dim(0), m = g.dim(1), n = g.dim(2), side = std::min(m, n);
  MOELAB_CHECK(g.numel() <= x_[0].numel() && E * side * side <= gram_.numel(),
               "Newton-Schulz scratch too small for " + g.describe());
  const bool tall = m > n;
  // Each matrix as a group of rows: x2 [E*m, n] is the iterate, x3 the same memory as [E, m, n].
  Tensor x3 = x_[0].prefix({E, m, n}), next3 = x_[1].prefix({E, m, n});
  Tensor a3 = gram_.prefix({E, side, side}), p3 = poly_.prefix({E, side, side});
  const Tensor by_m = offsets(E, m);
  const Tensor by_side = offsets(E, side);

  // Round to the act dtype, then normalize each matrix by its own norm.
  if (g.dtype == x3.dtype) {
    backend_.frobenius_normalize_batched(g, x3, norm_eps());
  } else {
    backend_.copy(g, next3);
    backend_.frobenius_normalize_batched(next3, x3, norm_eps());
  }
  for (int64_t i = 0; i < steps; ++i) {
    const NsCoefficients k = step_coefficients(i);
    Tensor x2 = x3.view({E * m, n}), next2 = next3.view({E * m, n});
    Tensor a2 = a3.view({E * side, side}), p2 = p3.view({E * side, side});
    if (tall)
      backend_.grouped_matmul_wgrad(x2, x2, a3, by_m, 0.0f);  // A_e = X_e^T X_e   [n, n]
    else
      backend_.grouped_matmul(x2, x3, true, a2, by_m);  // A_e = X_e X_e^T   [m, m]
    // The polynomial's sums are fused into the products' stores (one rounding, no extra pass).
    backend_.grouped_matmul(a2, a3, true, p2, by_side, k.c, k.b, &a2);  // P_e = c A_e A_e^T + b A_e
    if (tall)
      backend_.grouped_matmul(x2, p3, true, next2, by_m, 1.0f, k.a, &x2);  // X'_e = X_e P_e^T + a X_e
    else
      backend_.grouped_matmul_wgrad(p2, x2, next3, by_m, k.a, &x3);  // X'_e = P_e^T X_e + a X_e
    std::swap(x3, next3);
  }
  return x3;
}

}  // namespace moelab
