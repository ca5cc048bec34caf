// The op interface: everything the model and the optimizers compute goes through these calls, so
// the GPT-MoE is written once and each backend (cpu/: the fp32/fp64 reference, cuda/: kernels)
// only implements ops. Every op is deterministic for a fixed backend and thread count.
//
// Conventions (all tensors contiguous, row-major):
// - "matrix view": leading dims flattened into rows, the last dim is columns.
// - Linear weights are [out, in] as in PyTorch/nanochat: y = x W^T.
// - Index tensors (tokens, targets, top-k choices, plans) are i32 on the backend's device.
// - Scalars produced on the device (loss sums, balance loss) are f32 tensors of shape [1], so a
//   step never has to read them back to the host until its end (no host sync inside a step).
// - "act" dtype (act_dtype()) is what activations and matmul operands use (f32/f64 on the CPU,
//   bf16 on CUDA); "master" dtype is what weights, gradients and optimizer state use (f32, or f64
//   in the CPU's gradient checks). Router logits/probs, losses, rstd and lse are always f32 (f64
//   when the master dtype is f64).
//
// The interface comes in families, one header each under backend/ops/: core (identity, memory,
// transfers, capabilities, graph capture), elementwise (norms, ReLU², embedding, residual
// mixing), linear_algebra (GEMMs, grouped GEMMs), attention, routing (router, dispatch plan,
// balance loss, permute, combine), loss, optimizer, and fp8 (quantization and FP8 GEMMs, with
// the operand types and the amax sink in fp8_types.hpp). A backend implements every family;
// what it cannot run it says through supports() before a run starts. A new op goes into its
// family's header and both backends; a new family is a new header and a base below.
#pragma once
#include "backend/ops/attention.hpp"
#include "backend/ops/core.hpp"
#include "backend/ops/elementwise.hpp"
#include "backend/ops/fp8.hpp"
#include "backend/ops/linear_algebra.hpp"
#include "backend/ops/loss.hpp"
#include "backend/ops/optimizer.hpp"
#include "backend/ops/routing.hpp"

namespace moelab {

class Backend : public Fp8Ops, public AttentionOps, public RoutingOps, public LossOps, public OptimizerOps {
 public:
  ~Backend() override = default;
};

}  // namespace moelab
