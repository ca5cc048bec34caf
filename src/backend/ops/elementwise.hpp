// Norms and elementwise ops: sums, the embedding, RMSNorm, ReLU², the residual stream's
// learned mixing and the gated value embeddings.
#pragma once
#include "backend/ops/core.hpp"
#include "backend/ops/fp8_types.hpp"

namespace moelab {


class ElementwiseOps : public virtual BackendCore {
 public:
  // y = a * x + b * y (same element count; any float dtypes).
  virtual void axpby(float a, const Tensor& x, float b, Tensor& y) = 0;
  // out[0] (+)= sum of all elements of x (out is f32/f64 [1]).
  virtual void sum(const Tensor& x, Tensor& out, bool accumulate) = 0;

  // --- embedding --------------------------------------------------------------------------------
  // out[t] = wte[tokens[t]]; out is [N, D] in act dtype.
  virtual void embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) = 0;
  // dwte[tokens[t]] += dout[t] (dwte in master dtype).
  virtual void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) = 0;

  // --- parameter-free RMSNorm over the last dim: y = x * rstd, rstd = 1/sqrt(mean(x^2) + eps) -----
  static constexpr float kNormEps = 1e-6f;
  // amax here and below: the output's amax for FP8 tensor scaling (AmaxSink, whole tensor).
  virtual void rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& rstd, const AmaxSink* amax = nullptr) = 0;
  // dx (+)= d/dx given dy; accumulate adds into dx (residual stream) instead of overwriting.
  virtual void rmsnorm_bwd(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                           bool accumulate, const AmaxSink* amax = nullptr) = 0;

  // --- ReLU^2 ------------------------------------------------------------------------------------
  // amax (AmaxSink per expert, rows of h in expert order): each expert's amax of a (of dh).
  virtual void relu2_fwd(const Tensor& h, Tensor& a, const AmaxSink* amax = nullptr) = 0;
  virtual void relu2_bwd(const Tensor& h, const Tensor& da, Tensor& dh, const AmaxSink* amax = nullptr) = 0;

  // --- residual-stream mixing and value embeddings (nanochat's per-layer scalars, ResFormer) ---
  // y = a[0] * x + b[0] * x0, with a, b one-element master-dtype tensors on the device (learned
  // scalars, so no host read). y may alias x.
  virtual void lambda_mix_fwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0,
                              Tensor& y) = 0;
  // From dy: dx = a[0] dy (dx may alias dy), dx0 += b[0] dy, da[0] += <x, dy>, db[0] += <x0, dy>
  // (da, db master dtype, accumulated like every gradient).
  virtual void lambda_mix_bwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0,
                              const Tensor& dy, Tensor& dx, Tensor& dx0, Tensor& da, Tensor& db) = 0;
  // Value embedding with its learned per-head gate: gate[n, h] = 2 sigmoid(<x[n, :C], w[h]>) and
  // v[n, h, :] += gate[n, h] * ve[n, h, :]. x [N, D] (only its first C columns are read), w [H, C]
  // (act dtype), ve and v [N, H * hd] act dtype, gate [N, H] f32 (f64 with an f64 master).
  virtual void value_gate_fwd(const Tensor& x, const Tensor& w, const Tensor& ve, Tensor& v,
                              Tensor& gate) = 0;
  // From dv (the gradient w.r.t. v after the add): dve = gate * dv (written); with
  // dz[n, h] = <dv[n, h], ve[n, h]> * gate (1 - gate / 2): dw += dz^T x[:, :C] (master dtype) and
  // dx[:, :C] += dz w.
  virtual void value_gate_bwd(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& gate,
                              const Tensor& dv, Tensor& dve, Tensor& dw, Tensor& dx) = 0;
};

}  // namespace moelab
