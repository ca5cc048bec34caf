// The parameter table: every trainable tensor under its nanochat name, with its gradient, the
// copy that matmuls read (the master itself on the CPU, a bf16 shadow on CUDA) and the optimizer
// group that updates it. Checkpoints and optimizers walk this table; nothing else owns weights.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace moelab {

// Muon | AdamW (token embedding) | AdamW (lm_head) | AdamW (value embeddings) | AdamW (the
// per-layer resid and x0 scalars) | buffer: model state that no optimizer updates and no
// gradient reaches (the aux-loss-free router bias), kept in the table so checkpoints and
// model.safetensors carry it
enum class ParamGroup { matrix, embedding, unembedding, value_embedding, scalar, buffer };

struct Param {
  std::string name;  // e.g. "transformer.h.0.attn.c_q.weight", "transformer.h.0.mlp.experts.w_fc"
  ParamGroup group = ParamGroup::matrix;
  Tensor value;    // master weights (master dtype)
  Tensor grad;     // same shape and dtype as value
  Tensor compute;  // what ops read: aliases value when act dtype == master dtype, or when only FP8
                   // products read it (they read its FP8 forms, quantized from the master)
  // FP8 forms under tensor scaling: value's amax per expert (f32 [E]) or per matrix (f32 [1]),
  // raised by an optimizer that writes value (AdamW), which then sets value_amax_raised; the
  // forms' refresh takes it in place of an amax pass, clears the flag and the owner re-zeroes it.
  Tensor value_amax;
  bool value_amax_raised = false;
};

struct ParamTable {
  std::vector<Param> params;

  Param& get(const std::string& name);
  const Param* find(const std::string& name) const;
  int64_t numel() const;
};

}  // namespace moelab
