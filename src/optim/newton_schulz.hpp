// Newton-Schulz orthogonalization (Muon's core): X <- a X + (b A + c A^2) X with A = X X^T,
// (a, b, c) = (3.4445, -4.7750, 2.0315), from X0 = G / (||G||_F + 1e-7). Each step maps every
// singular value s to a s + b s^3 + c s^5, which pushes all of them towards [0.7, 1.2] in a few
// steps while keeping the singular vectors: the result approximates U V^T of G = U S V^T.
//
// It runs in the backend's act dtype (bf16 on CUDA, as nanochat does) with Backend ops only, on
// scratch allocated once, so a step can be captured in a CUDA graph. Tall matrices use the Gram
// matrix X^T X and right-multiplication instead, so no transpose is ever materialized.
//
// A stack of G matrices [G, m, n] (one expert tensor, or same-shape matrices of many layers) is
// orthogonalized matrix by matrix but in one pass: the iterate is laid out as G groups of rows,
// and each product is one grouped GEMM (the ops the experts' forward uses) instead of G small
// GEMMs, which on a GPU were launch-bound. The grouped ops read their weight operand K-major
// (trans_w) without a copy; an N-major one costs a transpose per call on CUDA. So the batched
// pass only ever hands them K-major operands: A and P = b A + c A^2 are symmetric, so A^T and P^T
// stand in for them, and the one product with X on the right of P (wide, m <= n) runs as the
// weight-gradient product P^T X. Every dim of a batched stack must be a multiple of 8 (the
// grouped GEMMs' 16-byte rows on CUDA); batchable() says whether a shape qualifies.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "backend/backend.hpp"

namespace moelab {

// Polar Express (optim.muon_variant = normuon): a different (a, b, c) at each of up to five
// steps, tuned so the composed polynomial reaches the polar factor faster, from
// X0 = G / (1.02 ||G||_F + 1e-6). The 1.02 is folded into the first step's coefficients
// (a s, b s^3, c s^5 with s = 1 / 1.02 act on G / (||G|| + 1e-6 / 1.02) as (a, b, c) on X0), so
// the normalization stays one op.
struct NsCoefficients {
  float a, b, c;
};
inline constexpr NsCoefficients kPolarExpress[5] = {
    {8.156554524902461f, -22.48329292557795f, 15.878769915207462f},
    {4.042929935166739f, -2.808917465908714f, 0.5000178451051316f},
    {3.8916678022926607f, -2.772484153217685f, 0.5060648178503393f},
    {3.285753657755655f, -2.3681294933425376f, 0.46449024233003106f},
    {2.3465413258596377f, -1.7097828382687081f, 0.42323551169305323f},
};

class NewtonSchulz {
 public:
  static constexpr float kA = 3.4445f, kB = -4.7750f, kC = 2.0315f;
  static constexpr float kNormEps = 1e-7f;
  static constexpr float kPolarSafety = 1.02f, kPolarEps = 1e-6f;
  // Switches run() and run_batched() to the Polar Express schedule (at most 5 steps).
  void use_polar_express(bool on) { polar_ = on; }

  // Scratch for stacks of up to max_batch matrices, each with at most max_numel elements and a
  // smaller side of at most max_side (max_numel * max_batch and max_side^2 * max_batch elements).
  NewtonSchulz(Backend& backend, int64_t max_numel, int64_t max_side, int64_t max_batch = 1);
  // Scratch for exactly these stacks [count, m, n] (and for single matrices of their shapes).
  struct StackShape {
    int64_t count, m, n;
  };
  NewtonSchulz(Backend& backend, const std::vector<StackShape>& stacks);

  // Orthogonalizes the 2-D matrix g (any float dtype) in `steps` iterations. The result is an
  // act-dtype view of this object's scratch with g's shape, valid until the next call.
  Tensor run(const Tensor& g, int64_t steps);
  // Makes the device-side group offsets for [E, m, n] stacks (a host transfer, so it belongs to
  // set-up, never to a step).
  void prepare_batched(int64_t groups, int64_t m, int64_t n);
  // Orthogonalizes each matrix g[e] of a 3-D [E, m, n] stack on its own; result as for run().
  // Its shape must have been prepared.
  Tensor run_batched(const Tensor& g, int64_t steps);
  // Whether [m, n] matrices can go through run_batched on every backend.
  static bool batchable(int64_t m, int64_t n) { return m % 8 == 0 && n % 8 == 0; }

 private:
  Backend& backend_;
  Tensor x_[2];     // [max_numel, 1] act dtype: the iterate, ping-ponged
  Tensor gram_;     // [max_side^2, 1] act dtype: A
  Tensor poly_;     // [max_side^2, 1] act dtype: b A + c A^2

  void allocate(int64_t iterate_elems, int64_t gram_elems);
  bool polar_ = false;
  // Coefficients of step i, and the eps of the normalization before step 0.
  NsCoefficients step_coefficients(int64_t i) const;
  float norm_eps() const { return polar_ ? kPolarEps / kPolarSafety : kNormEps; }

  // Group offsets {0, rows, 2 rows, ...} [E+1] for E groups of `rows` rows.
  Tensor offsets(int64_t groups, int64_t rows) const;
  std::vector<std::pair<std::pair<int64_t, int64_t>, Tensor>> offsets_;
};


}  // namespace moelab
