// Optimizer updates: AdamW, Muon's momentum and normalization, NorMuon's tail, and the sum of
// squares for gradient norms.
#pragma once
#include "backend/ops/core.hpp"
#include "backend/ops/fp8_types.hpp"

namespace moelab {

// One AdamW update (decoupled weight decay, bias-corrected moments).
struct AdamWStep {
  float lr = 0, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0;
  int64_t step = 1;  // 1-based, for bias correction
};

// One NorMuon step after orthogonalization (optim.muon_variant = normuon): variance reduction on
// the orthogonalized update, then the parameter update with (optionally cautious) weight decay.
struct NorMuonStep {
  float lr = 0;            // already times sqrt(max(1, rows / cols))
  float weight_decay = 0;  // this step's decay (already scheduled)
  float beta2 = 0.95f;     // EMA of the per-row (or per-column) mean square
  bool cautious = true;    // decay only where update and weight agree in sign
};

class OptimizerOps : public virtual BackendCore {
 public:
  // --- optimizers --------------------------------------------------------------------------------
  // amax (AmaxSink, G equal parts, G dividing param's size): each part's amax of the updated
  // param (a stack's experts, or a matrix as one part), for the FP8 weight forms' tensor scaling.
  virtual void adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                            const AdamWStep& s, const AmaxSink* amax = nullptr) = 0;
  // Muon's momentum in one pass: momentum = mu momentum + (1 - mu) grad, then update =
  // (nesterov ? mu momentum + (1 - mu) grad : momentum), written in update's dtype (the act dtype,
  // which Newton-Schulz runs in). grad and momentum share the master dtype.
  virtual void muon_momentum(const Tensor& grad, Tensor& momentum, Tensor& update, float mu, bool nesterov) = 0;
  // y = x / (||x||_F + eps), the norm computed on the device.
  virtual void frobenius_normalize(const Tensor& x, Tensor& y, float eps) = 0;
  // The same for each slice x[g] of the first dimension on its own (y: x's shape), so a stack of
  // matrices is normalized in one op instead of one per matrix.
  virtual void frobenius_normalize_batched(const Tensor& x, Tensor& y, float eps) = 0;
  // NorMuon's tail for a stack x [G, m, n] of orthogonalized updates (act dtype) of params
  // [G, m, n] (master dtype). Per matrix g, with r the reduced dim (columns when m >= n, else
  // rows) and its length R: q = mean over r of x^2 (per row, or per column); v2 = lerp(v2, q,
  // 1 - beta2) with v2 [G, m] (or [G, n]) master dtype; s = rsqrt(max(v2, 1e-10));
  // x' = x * s * sqrt(sum(q) R) / max(sqrt(sum(q R s^2)), 1e-10) (the variance-normalized update
  // keeps the norm of x); then param -= lr x' + lr wd param [x' param >= 0 if cautious].
  virtual void normuon_update(const Tensor& x, Tensor& second_moment, Tensor& param,
                              const NorMuonStep& s) = 0;
  // Sum of squares of all elements into out[0] (f32 [1]); used for gradient-norm reporting.
  virtual void sum_squares(const Tensor& x, Tensor& out, bool accumulate) = 0;
};

}  // namespace moelab
