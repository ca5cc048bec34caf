// The FP8 training recipe as the code reads it. fp8_recipe(cfg) (src/config) makes it once from
// precision and the [fp8] section; the model, LinearGemms and the backends read this object, so
// no recipe name is compared as text anywhere else.
#pragma once
#include <cstdint>
#include <optional>

#include "core/dtype.hpp"
#include "core/fp8_format.hpp"

namespace moelab {

// How operands are scaled. Each scaling fixes the granularity of both sides of every product:
//   tensorwise: one scale per tensor (per expert in the experts' GEMMs) on both sides;
//   rowwise:    one per row of each K-major operand (outer vectors) on both sides;
//   blockwise:  1x128 tiles on activations and gradients, 128x128 blocks on weights.
enum class Fp8Scaling : uint8_t { tensorwise, rowwise, blockwise };

inline const char* fp8_scaling_name(Fp8Scaling s) {
  switch (s) {
    case Fp8Scaling::tensorwise: return "tensorwise";
    case Fp8Scaling::rowwise: return "rowwise";
    case Fp8Scaling::blockwise: return "blockwise";
  }
  return "?";
}

// The token-side operands' granularity (activations, gradients; both operands of a weight
// gradient) and the weights' under a scaling.
inline Fp8Granularity fp8_token_granularity(Fp8Scaling s) {
  switch (s) {
    case Fp8Scaling::tensorwise: return Fp8Granularity::tensor;
    case Fp8Scaling::rowwise: return Fp8Granularity::row;
    case Fp8Scaling::blockwise: return Fp8Granularity::block_1x128;
  }
  return Fp8Granularity::tensor;
}
inline Fp8Granularity fp8_weight_granularity(Fp8Scaling s) {
  return s == Fp8Scaling::blockwise ? Fp8Granularity::block_128x128 : fp8_token_granularity(s);
}

// The scaling a (token side, weight side) granularity pair belongs to; nullopt for a pair no
// recipe makes (the grouped FP8 GEMMs serve exactly the recipes' pairs).
inline std::optional<Fp8Scaling> fp8_scaling_of(Fp8Granularity tokens, Fp8Granularity weights) {
  for (Fp8Scaling s : {Fp8Scaling::tensorwise, Fp8Scaling::rowwise, Fp8Scaling::blockwise})
    if (fp8_token_granularity(s) == tokens && fp8_weight_granularity(s) == weights) return s;
  return std::nullopt;
}

struct Fp8Recipe {
  Fp8Scaling scaling = Fp8Scaling::tensorwise;
  // Which GEMMs run in FP8; all false when precision is not fp8.
  bool dense = false;    // attention's projections, dense MLPs, shared experts
  bool experts = false;  // the routed experts' grouped GEMMs
  bool head = false;     // lm_head
  DType forward_format = DType::e4m3;  // activations and weights
  DType grad_format = DType::e5m2;     // the backward's gradient operands

  bool enabled() const { return dense || experts || head; }
  Fp8Granularity tokens() const { return fp8_token_granularity(scaling); }
  Fp8Granularity weights() const { return fp8_weight_granularity(scaling); }
  // The amax policy: under tensor scaling each producer of an FP8 operand (a norm, the loss, the
  // permute, ReLU², the optimizer) records the operand's amax as it writes it, so quantization
  // needs no amax pass. Finer scalings need per-group maxima the producers do not keep.
  bool producer_amax() const { return enabled() && scaling == Fp8Scaling::tensorwise; }
};

}  // namespace moelab
