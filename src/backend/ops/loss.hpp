// The loss: logit softcap and cross-entropy.
#pragma once
#include "backend/ops/core.hpp"
#include "backend/ops/fp8_types.hpp"

namespace moelab {


class LossOps : public virtual BackendCore {
 public:
  // --- logit softcap + cross-entropy, in f32 -----------------------------------------------------
  // logits [N, V]; z = cap * tanh(logits / cap); losses[n] = logsumexp(z) - z[target] (0 where
  // target < 0, i.e. ignored); dlogits = grad_scale * d losses[n] / d logits (0 for ignored rows).
  // dlogits may alias logits. amax: dlogits' amax (AmaxSink, whole tensor).
  virtual void softcap_xent(const Tensor& logits, const Tensor& targets, float cap,
                            float grad_scale, Tensor& losses, Tensor& dlogits, const AmaxSink* amax = nullptr) = 0;
};

}  // namespace moelab
