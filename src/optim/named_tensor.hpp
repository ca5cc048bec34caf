// A tensor with a stable name: how optimizers expose their state to checkpoints without either
// module knowing the other's types. Names are part of the checkpoint format, so they never change
// between runs of the same model (e.g. "optim/transformer.h.0.attn.c_q.weight/momentum").
#pragma once
#include <string>

#include "core/tensor.hpp"

namespace moelab {

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

}  // namespace moelab
