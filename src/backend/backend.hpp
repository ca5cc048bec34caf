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
#pragma once
#include <optional>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"

namespace moelab {

// One AdamW update (decoupled weight decay, bias-corrected moments).
struct AdamWStep {
  float lr = 0, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0;
  int64_t step = 1;  // 1-based, for bias correction
};

// Which assignments capacity dispatch keeps when an expert overflows (moe.drop_order).
//   rank:  every token's first choice before any second choice, then by token (GShard's rule);
//   token: flat token-major order (t, j), as the seed's dispatch keeps them.
enum class DropOrder { rank, token };

// How the router scores experts and forms the gates (moe.score, moe.top_k, moe.norm_topk,
// moe.route_scale, moe.groups, moe.topk_groups). The defaults are the softmax router with
// renormalized gates.
enum class RouterScore { softmax, sigmoid };
struct RouterSpec {
  RouterScore score = RouterScore::softmax;
  int k = 1;
  bool norm_topk = true;
  float route_scale = 1.0f;
  int groups = 1, topk_groups = 1;  // group-limited routing; groups = 1: off
};

// The router's loss terms (moe.balance_coef, moe.balance_scope, moe.z_loss_coef): how balance_loss
// and router_bwd read them.
struct BalanceSpec {
  RouterScore score = RouterScore::softmax;  // how probs are read (sigmoid: normalized per token)
  float coef = 0;         // balance-loss coefficient (0: no balance term)
  float grad_scale = 1;   // router_bwd: the terms' weight in the total loss
  int64_t seq_len = 0;    // > 0: sequence scope, f and P per sequence of seq_len tokens
  float z_coef = 0;       // router_bwd: z-loss coefficient
};

// One NorMuon step after orthogonalization (optim.muon_variant = normuon): variance reduction on
// the orthogonalized update, then the parameter update with (optionally cautious) weight decay.
struct NorMuonStep {
  float lr = 0;            // already times sqrt(max(1, rows / cols))
  float weight_decay = 0;  // this step's decay (already scheduled)
  float beta2 = 0.95f;     // EMA of the per-row (or per-column) mean square
  bool cautious = true;    // decay only where update and weight agree in sign
};

// --- FP8 operands ---------------------------------------------------------------------------------
// An FP8 GEMM operand is K-major: data [rows, K] in e4m3 or e5m2, each row one run along the
// reduction dimension (the only layout Hopper's FP8 tensor cores read), plus f32 dequantization
// scales: value[r, k] ~= decode(data[r, k]) * scale[group(r, k)]. The granularity says which
// elements share a scale; the scale tensor's layout (what cuBLASLt reads) is:
//   tensor         [1]
//   row            [rows]                                (one per row: outer-vector scaling)
//   block_1x128    [ceil(K / 128), rows], rows contiguous (1 x 128 tiles along K)
//   block_128x128  [ceil(rows / 128), kbp]                (128 x 128 blocks; row stride kbp =
//                  ceil(K / 128) rounded up to a multiple of 4, 16-byte aligned as cuBLASLt reads
//                  it: padding entries belong to no group and hold 1)
// Partial groups at the edges hold fewer elements.
enum class Fp8Granularity : uint8_t { tensor, row, block_1x128, block_128x128 };

inline const char* fp8_granularity_name(Fp8Granularity g) {
  switch (g) {
    case Fp8Granularity::tensor: return "tensor";
    case Fp8Granularity::row: return "row";
    case Fp8Granularity::block_1x128: return "1x128";
    case Fp8Granularity::block_128x128: return "128x128";
  }
  return "?";
}

inline Shape fp8_scale_shape(Fp8Granularity g, int64_t rows, int64_t k) {
  const int64_t kb = (k + 127) / 128, rb = (rows + 127) / 128;
  switch (g) {
    case Fp8Granularity::tensor: return {1};
    case Fp8Granularity::row: return {std::max<int64_t>(rows, 1)};
    case Fp8Granularity::block_1x128: return {std::max<int64_t>(kb, 1), std::max<int64_t>(rows, 1)};
    case Fp8Granularity::block_128x128: return {std::max<int64_t>(rb, 1), std::max<int64_t>((kb + 3) / 4 * 4, 4)};
  }
  return {1};
}

// Largest finite magnitude of an FP8 format (saturation bound and the scale's target).
inline float fp8_max(DType d) { return d == DType::e5m2 ? 57344.0f : 448.0f; }

// The scaling rule both backends implement bit for bit, per group with absolute maximum amax:
//   a = min(max(amax, kFp8MinAmax), FLT_MAX);  q = fp8_max / a;  scale = 1 / q   (f32 divisions)
//   data = saturate(round_to_nearest_even(x * q))                                (f32 product)
// The clamps keep every scale finite and non-zero: an all-zero group, one holding a huge value
// or Inf, and one of denormals all give finite scales (groups below kFp8MinAmax flush to zero).
inline constexpr float kFp8MinAmax = 1e-30f;

struct QuantizedOperand {
  Tensor data;   // [rows, K], e4m3 or e5m2
  Tensor scale;  // f32, fp8_scale_shape(granularity, rows, K)
  Fp8Granularity granularity = Fp8Granularity::tensor;
};

// One matrix's two FP8 copies to make (Backend::quantize_fp8_pairs).
struct Fp8PairJob {
  const Tensor* x = nullptr;
  QuantizedOperand* straight = nullptr;
  QuantizedOperand* transposed = nullptr;
  const Tensor* amax = nullptr;  // as quantize_fp8_pair's
};

// An expert GEMM's token-side operand kept from the forward for the weight gradient, in the form
// the backend's grouped_matmul_backward_fp8 reads it (alloc_saved_expert_operand makes one): on
// CUDA the FP8 codes of its transposed, padded expert segments with their scales, written by the
// forward from the same read of the operand; on the CPU a plain copy, quantized in the backward
// exactly as grouped_matmul_wgrad_fp8 quantizes it.
struct SavedExpertOperand {
  Tensor data, scale;
  Fp8Granularity granularity = Fp8Granularity::tensor;
};

// The expert MLP's ReLU² folded into its GEMMs, so that no relu2_fwd or relu2_bwd pass runs over
// the experts' hidden rows (h the up projection's output, a = relu²(h) the down projection's
// operand). Each field gives exactly the values the unfolded ops give:
//   forward of the up projection (C = h): relu2_amax (FP8) raises each expert's amax of
//     relu²(C), as relu2_fwd(C, a, amax) would (C's rows in expert order; zeroed by the caller);
//     relu2_output (BF16) also stores relu²(C) there, as relu2_fwd(C, a) writes it;
//   forward of the down projection (FP8): relu2_operand makes A the hidden pre-activation h and
//     the operand relu²(h), rounded as relu2_fwd writes it (what the saved operand keeps, too);
//   backward of the down projection: relu2_input (h) makes dX relu2_bwd(h, dX), dX rounded to
//     its dtype first, so dX holds dh; dx_amax (FP8) then raises each expert's amax of that dh.
struct ExpertRelu2Fold {
  const Tensor* relu2_amax = nullptr;
  Tensor* relu2_output = nullptr;
  bool relu2_operand = false;
  const Tensor* relu2_input = nullptr;
  const Tensor* dx_amax = nullptr;
};

// grouped_matmul_relu2's arguments: one BF16 fold field, no FP8 ones; relu2_output and relu2_input
// shaped like C.
inline void check_bf16_relu2_fold(const ExpertRelu2Fold& f, const Tensor& C) {
  const char* op = "grouped_matmul_relu2";
  if (f.relu2_amax || f.relu2_operand || f.dx_amax)
    throw Error(std::string(op) + ": relu2_amax, relu2_operand and dx_amax fold into the FP8 expert GEMMs only");
  if (!f.relu2_output == !f.relu2_input)
    throw Error(std::string(op) + ": give exactly one of relu2_output (forward) and relu2_input (data gradient)");
  const Tensor* t = f.relu2_output ? f.relu2_output : f.relu2_input;
  if (t->shape != C.shape || t->dtype != C.dtype)
    throw Error(std::string(op) + ": " + (f.relu2_output ? "relu2_output " : "relu2_input ") + t->describe() +
                " must match C " + C.describe());
}

// A stack of expert weights in FP8 as a grouped GEMM reads them: one K-major B operand per
// expert, e4m3, each with its own scales. data [E, N, K] holds expert e's [N, K] codes at
// data.index(e); scale [E, n] holds its fp8_scale_shape(granularity, N, K) scales, flattened.
// From W [E, N, K]: the forward's form (quantize_experts_fp8 without transpose) and the data
// gradient's (with transpose: each expert's W_e^T [K, N]).
struct QuantizedExperts {
  Tensor data;   // [E, N, K], e4m3
  Tensor scale;  // [E, n], f32
  Fp8Granularity granularity = Fp8Granularity::tensor;

  int64_t experts() const { return data.dim(0); }
  // Expert e's operand: views into data and scale.
  QuantizedOperand expert(int64_t e) const {
    QuantizedOperand q;
    q.granularity = granularity;
    q.data = data.index(e);
    q.scale = scale.index(e).view(fp8_scale_shape(granularity, data.dim(1), data.dim(2)));
    return q;
  }
};

// Each expert's absolute maximum of an expert-ordered operand, recorded by the op that writes
// it (the permute, ReLU² of the experts' hidden rows, the combine's backward and ReLU²'s): for
// every row r < offsets[E] it writes, amax[e] is raised to the largest |value| as stored (after
// rounding to the output's dtype), e the expert whose rows [offsets[e], offsets[e+1]) hold r.
// Raised, never lowered: the caller zeroes amax first. An FP8 expert GEMM with tensor scaling
// given it then needs no amax pass over its operand.
struct ExpertAmax {
  Tensor amax;     // f32 [E]
  Tensor offsets;  // i32 [E + 1]
};
// The same for a whole tensor (the dense linears' operands under tensor scaling): an op given
// `amax` (f32 [1], zeroed by the caller) raises it to the largest |value| it wrote, as stored.
// quantize_fp8_pair given it then needs no amax pass.

class Backend {
 public:
  virtual ~Backend() = default;

  // --- identity and memory -------------------------------------------------------------------
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3"
  virtual DType act_dtype() const = 0;
  virtual DType master_dtype() const = 0;
  // Uninitialized memory of the given shape and type on this backend's device.
  virtual Tensor alloc(const Shape& shape, DType dtype) = 0;
  // Most device bytes held at once since start (or since reset_peak_memory()).
  virtual size_t peak_memory_bytes() const = 0;
  virtual void reset_peak_memory() = 0;
  // Bytes the device can still allocate (a GPU's free memory), so a run too large for the card
  // is refused before it allocates; nullopt where the device's memory is the host's (the CPU).
  virtual std::optional<size_t> free_device_memory() const { return std::nullopt; }
  // Wait for all queued work (no-op on the CPU).
  virtual void synchronize() = 0;
  // Marks where an external profiler (ncu --profile-from-start off) records; no-op on the CPU.
  virtual void profiler_range(bool /*start*/) {}

  // --- host transfer (converting to/from the tensor's dtype) ---------------------------------
  virtual void write(Tensor& dst, const std::vector<float>& values) = 0;
  virtual void write_i32(Tensor& dst, const std::vector<int32_t>& values) = 0;
  virtual std::vector<float> read(const Tensor& src) = 0;
  virtual std::vector<int32_t> read_i32(const Tensor& src) = 0;

  // --- elementwise ------------------------------------------------------------------------------
  virtual void fill(Tensor& t, float value) = 0;
  // dst = src, converting dtype (same element count).
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  // y = a * x + b * y (same element count; any float dtypes).
  virtual void axpby(float a, const Tensor& x, float b, Tensor& y) = 0;
  // out[0] (+)= sum of all elements of x (out is f32/f64 [1]).
  virtual void sum(const Tensor& x, Tensor& out, bool accumulate) = 0;

  // --- dense linear algebra -------------------------------------------------------------------
  // C = alpha * op(A) @ op(B) + beta * C on matrix views. op(A) is [M, K] (A is [K, M] when
  // trans_a), op(B) is [K, N] (B is [N, K] when trans_b), C is [M, N]. With beta == 0, C's old
  // contents are ignored (NaN included).
  virtual void matmul(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C,
                      float alpha = 1.0f, float beta = 0.0f) = 0;

  // --- FP8 GEMMs (precision = fp8) ----------------------------------------------------------------
  // Quantizes the matrix view of x (any float dtype) into out: out.data's dtype (e4m3 | e5m2)
  // picks the format, out.granularity the scaling; amax and scales are computed on the device.
  // transpose = false: out.data [rows, cols] = x; true: out.data [cols, rows] = x^T (the copy a
  // weight or data gradient needs to be K-major). out.data and out.scale must have the shapes
  // above. An all-zero x gives zero data and finite scales.
  virtual void quantize_fp8(const Tensor& x, bool transpose, QuantizedOperand& out) = 0;
  // Both copies of x at once, exactly as quantize_fp8(x, false, straight) and
  // quantize_fp8(x, true, transposed) give them (the data and weight gradients of a linear read
  // the same dy both ways); both take the same format and granularity. A backend may read x once
  // for the two (CUDA does).
  // amax (tensor scaling only): x's amax from its producer, in place of the amax pass; a backend
  // may ignore it and compute its own (the CPU does: it gives the same scales).
  virtual void quantize_fp8_pair(const Tensor& x, QuantizedOperand& straight, QuantizedOperand& transposed,
                                 const Tensor* amax = nullptr) {
    (void)amax;
    quantize_fp8(x, false, straight);
    quantize_fp8(x, true, transposed);
  }
  // quantize_fp8_pair of each job (the dense weights' forms after an optimizer step), exactly. A
  // backend may batch same-shaped matrices into a few launches (CUDA does, for tensor scaling).
  virtual void quantize_fp8_pairs(const std::vector<Fp8PairJob>& jobs) {
    for (const Fp8PairJob& j : jobs) quantize_fp8_pair(*j.x, *j.straight, *j.transposed, j.amax);
  }
  // C[M, N] = alpha * deq(A) deq(B)^T + beta * C with A.data [M, K], B.data [N, K] (the TN
  // product), accumulated in f32; C bf16 or f32. Supported granularity pairs: (tensor, tensor),
  // (row, row), and the block pairs (1x128, 128x128), (128x128, 1x128), (1x128, 1x128); at most
  // one operand may be e5m2. fast_accum allows the tensor cores' faster, less precise
  // accumulation (the forward pass uses it, as FP8 recipes usually do); the CPU ignores it.
  virtual void matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float alpha = 1.0f,
                          float beta = 0.0f, bool fast_accum = false) = 0;
  // The experts' GEMMs in FP8 (fp8.layers = experts | all): grouped_matmul (alpha 1, beta 0) and
  // grouped_matmul_wgrad (accumulating, beta 1) with both operands quantized expert by expert,
  // since expert boundaries are known only on the device. a_gran scales the token-side operand
  // (A, dY; in the weight gradient both operands, whose 1x128 tiles then run along each expert's
  // own tokens), w_gran the expert weights; "tensor" means one scale per expert. a_format is the
  // token-side operand's format (e4m3 forward, the gradient format backward); weights are e4m3.
  virtual void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const Tensor& W,
                                  bool trans_w, Fp8Granularity w_gran, Tensor& C, const Tensor& offsets) = 0;
  virtual void grouped_matmul_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, Fp8Granularity gran,
                                        Tensor& dW, const Tensor& offsets) = 0;
  // Expert weights W [E, N, K] (bf16 or f32) quantized expert by expert into out (shaped for W,
  // or for W^T per expert when transpose): exactly what grouped_matmul_fp8 makes of W inside.
  // The model keeps both forms and refreshes them when the weights change, so a step quantizes
  // its weights once, not in every forward and backward.
  virtual void quantize_experts_fp8(const Tensor& W, bool transpose, QuantizedExperts& out) {
    for (int64_t e = 0; e < W.dim(0); ++e) {
      QuantizedOperand q = out.expert(e);
      quantize_fp8(W.index(e), transpose, q);
    }
  }
  // Both forms of a stack, exactly as quantize_experts_fp8 without and with transpose give them
  // (one granularity). A backend may read W once and share one amax pass (CUDA does, for tensor
  // and row scaling). amax (tensor scaling only): each expert's amax of W (f32 [E]) from W's
  // producer, in place of the amax pass; it must be exact. Backends may ignore it (the CPU does).
  virtual void quantize_experts_fp8_pair(const Tensor& W, QuantizedExperts& straight, QuantizedExperts& transposed,
                                         const Tensor* /*amax*/ = nullptr) {
    quantize_experts_fp8(W, false, straight);
    quantize_experts_fp8(W, true, transposed);
  }
  // grouped_matmul_fp8 with the weights already quantized: the rows of expert e of C are
  // deq(A_e) deq(W.expert(e))^T, A quantized as above.
  virtual void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const QuantizedExperts& W,
                                  Tensor& C, const Tensor& offsets) = 0;
  // Room for a saved expert operand of up to `rows` rows of `cols` (token-side granularity g).
  virtual SavedExpertOperand alloc_saved_expert_operand(int64_t rows, int64_t cols, int /*experts*/, Fp8Granularity g) {
    SavedExpertOperand s;
    s.data = alloc({rows, cols}, act_dtype());
    s.granularity = g;
    return s;
  }
  // The forward of an expert GEMM (grouped_matmul_fp8 with A e4m3 and W the forward's form of the
  // weights) that also keeps A for the weight gradient in `save`.
  // a_amax: A's per-expert amax from its producer (ExpertAmax), used with tensor scaling in place
  // of an amax pass; it must be exact. Backends may ignore it (the CPU does).
  // fold: ReLU² folded in (ExpertRelu2Fold); this default runs the unfolded ops.
  virtual void grouped_matmul_fp8_saving(const Tensor& A, Fp8Granularity a_gran, const QuantizedExperts& W, Tensor& C,
                                         const Tensor& offsets, SavedExpertOperand& save,
                                         const Tensor* /*a_amax*/ = nullptr, const ExpertRelu2Fold& fold = {}) {
    Tensor operand = A;
    if (fold.relu2_operand) {
      operand = alloc(A.shape, A.dtype);
      relu2_fwd(A, operand);
    }
    grouped_matmul_fp8(operand, DType::e4m3, a_gran, W, C, offsets);
    Tensor kept = save.data.prefix(A.shape);
    copy(operand, kept);
    if (fold.relu2_amax) {
      Tensor relu2_of_c = alloc(C.shape, C.dtype);
      const ExpertAmax amax{*fold.relu2_amax, offsets};
      relu2_fwd(C, relu2_of_c, &amax);
    }
  }
  // The backward of that GEMM in FP8, Wt the data gradient's form of the weights (W_e^T per
  // expert) and X the operand its forward saved: dX = grouped_matmul_fp8(dY, ..., Wt, ...) and
  // dW += grouped_matmul_wgrad_fp8(dY, ..., X, ...), exactly as those two calls give them. A
  // backend may quantize dY once for both products (CUDA does).
  // dy_amax: dY's per-expert amax from its producer, as a_amax above; fold as above.
  virtual void grouped_matmul_backward_fp8(const Tensor& dY, DType dy_format, Fp8Granularity a_gran,
                                           const QuantizedExperts& Wt, const SavedExpertOperand& X, Tensor& dX,
                                           Tensor& dW, const Tensor& offsets, const Tensor* /*dy_amax*/ = nullptr,
                                           const ExpertRelu2Fold& fold = {}) {
    grouped_matmul_fp8(dY, dy_format, a_gran, Wt, dX, offsets);
    grouped_matmul_wgrad_fp8(dY, dy_format, X.data.prefix({dY.rows(), X.data.cols()}), a_gran, dW, offsets);
    if (fold.relu2_input) {
      const ExpertAmax amax{fold.dx_amax ? *fold.dx_amax : Tensor{}, offsets};
      relu2_bwd(*fold.relu2_input, dX, dX, fold.dx_amax ? &amax : nullptr);
    }
  }

  // --- embedding --------------------------------------------------------------------------------
  // out[t] = wte[tokens[t]]; out is [N, D] in act dtype.
  virtual void embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) = 0;
  // dwte[tokens[t]] += dout[t] (dwte in master dtype).
  virtual void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) = 0;

  // --- parameter-free RMSNorm over the last dim: y = x * rstd, rstd = 1/sqrt(mean(x^2) + eps) -----
  static constexpr float kNormEps = 1e-6f;
  // amax here and below: the output's amax, raised as the op writes it (see ExpertAmax).
  virtual void rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& rstd, const Tensor* amax = nullptr) = 0;
  // dx (+)= d/dx given dy; accumulate adds into dx (residual stream) instead of overwriting.
  virtual void rmsnorm_bwd(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                           bool accumulate, const Tensor* amax = nullptr) = 0;

  // --- rotary embedding then per-head RMSNorm (QK-norm), on x [B, T, H, hd] ---------------------
  // cos, sin: [max_seq, hd/2] f32 tables; position of x[b, t] is t. Rotation pairs (i, i + hd/2):
  // y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos; then y = rmsnorm(y) per (b, t, h).
  virtual void rope_norm_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y,
                             Tensor& rstd) = 0;
  virtual void rope_norm_bwd(const Tensor& x, const Tensor& cos, const Tensor& sin,
                             const Tensor& rstd, const Tensor& dy, Tensor& dx, const Tensor* amax = nullptr) = 0;

  // --- causal self-attention, softmax scale 1/sqrt(hd) ------------------------------------------
  // q [B, T, Hq, hd]; k, v [B, T, Hkv, hd] with Hq % Hkv == 0 (grouped-query: query head h reads
  // kv head h / (Hq / Hkv)); out [B, T, Hq, hd]; lse [B, Hq, T] f32 (log-sum-exp of scores).
  // window > 0 is a sliding window as flash-attn's window_size = (window, 0): query t sees keys
  // j with t - window <= j <= t. window <= 0 (or >= T) is full causal attention.
  virtual void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                             Tensor& lse, int window = 0) = 0;
  virtual void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                             Tensor& dv, int window = 0) = 0;
  // Incremental decoding: the queries q [B, Tq, Hq, hd] are the last Tq of S positions whose keys
  // and values k, v [B, S, Hkv, hd] (a KV cache's first S rows) hold, S >= Tq; query i sits at
  // position S - Tq + i and sees keys as attention_fwd (causal, window). With S == Tq it is
  // attention_fwd's out. This default runs on the host (read, compute in f64, write), so any
  // backend decodes through the same code; a backend overrides it with its own kernel.
  virtual void attention_cached_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, int window = 0) {
    const int64_t B = q.dim(0), Tq = q.dim(1), Hq = q.dim(2), hd = q.dim(3), S = k.dim(1), Hkv = k.dim(2);
    if (k.ndim() != 4 || k.shape != v.shape || k.dim(0) != B || k.dim(3) != hd || S < Tq || Hkv <= 0 || Hq % Hkv ||
        out.shape != q.shape)
      throw Error("attention_cached_fwd: q " + q.describe() + ", k " + k.describe() + ", v " + v.describe() +
                  ", out " + out.describe() + " do not fit");
    const std::vector<float> qh = read(q), kh = read(k), vh = read(v);
    std::vector<float> oh(qh.size());
    std::vector<double> p(static_cast<size_t>(S)), acc(static_cast<size_t>(hd));
    const double scale = 1.0 / std::sqrt(double(hd));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t t = S - Tq + i, hk = h / (Hq / Hkv);
          const int64_t j0 = window > 0 && t > window ? t - window : 0;
          const float* qt = &qh[size_t(((b * Tq + i) * Hq + h) * hd)];
          double m = -INFINITY, l = 0;
          for (int64_t j = j0; j <= t; ++j) {
            const float* kj = &kh[size_t(((b * S + j) * Hkv + hk) * hd)];
            double s = 0;
            for (int64_t c = 0; c < hd; ++c) s += double(qt[c]) * double(kj[c]);
            p[size_t(j)] = s * scale;
            m = std::max(m, p[size_t(j)]);
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = j0; j <= t; ++j) {
            const double e = std::exp(p[size_t(j)] - m);
            l += e;
            const float* vj = &vh[size_t(((b * S + j) * Hkv + hk) * hd)];
            for (int64_t c = 0; c < hd; ++c) acc[size_t(c)] += e * double(vj[c]);
          }
          for (int64_t c = 0; c < hd; ++c) oh[size_t(((b * Tq + i) * Hq + h) * hd + c)] = float(acc[size_t(c)] / l);
        }
    write(out, oh);
  }

  // --- ReLU^2 ------------------------------------------------------------------------------------
  // With amax (rows of h in expert order), each expert's amax of a (of dh) is raised too.
  virtual void relu2_fwd(const Tensor& h, Tensor& a, const ExpertAmax* amax = nullptr) = 0;
  virtual void relu2_bwd(const Tensor& h, const Tensor& da, Tensor& dh, const ExpertAmax* amax = nullptr) = 0;

  // --- logit softcap + cross-entropy, in f32 -----------------------------------------------------
  // logits [N, V]; z = cap * tanh(logits / cap); losses[n] = logsumexp(z) - z[target] (0 where
  // target < 0, i.e. ignored); dlogits = grad_scale * d losses[n] / d logits (0 for ignored rows).
  // dlogits may alias logits. amax: dlogits' amax.
  virtual void softcap_xent(const Tensor& logits, const Tensor& targets, float cap,
                            float grad_scale, Tensor& losses, Tensor& dlogits, const Tensor* amax = nullptr) = 0;

  // --- MoE routing -------------------------------------------------------------------------------
  // router_topk: logits [T, E] f32 -> probs [T, E] f32: the scores (spec.score: softmax over the
  // experts, or sigmoid per expert); topk_idx [T, k] i32: the experts chosen on the choice scores
  // (scores + bias[e] when a bias [E] is given, else the scores), by descending choice score (ties:
  // lower expert index first); with spec.groups > 1 the choice is limited to the spec.topk_groups
  // groups (of E / groups consecutive experts) whose two best choice scores sum highest (ties:
  // lower group first). gates [T, k] f32 = route_scale * (chosen scores / their sum when
  // norm_topk, else the chosen scores); the bias never reaches the gates.
  virtual void router_topk(const Tensor& logits, const RouterSpec& spec, const Tensor* bias, Tensor& probs,
                           Tensor& topk_idx, Tensor& gates) = 0;
  // The default router (softmax, renormalized gates, no bias, no groups).
  void router_topk(const Tensor& logits, int k, Tensor& probs, Tensor& topk_idx, Tensor& gates) {
    RouterSpec spec;
    spec.k = k;
    router_topk(logits, spec, nullptr, probs, topk_idx, gates);
  }

  // Dispatch plan from the top-k choices, computed on the device.
  //   routed [E] i32: assignments per expert before any drop;
  //   counts [E] i32: assignments kept; offsets [E+1] i32: exclusive prefix sum of counts;
  //   slot [T*k] i32: row of assignment (t, j) in the permuted buffer, or -1 if dropped;
  //   row_token [R] i32 (R >= T*k rows allocated): token of each permuted row < offsets[E].
  // Order within an expert: by choice rank j first, then token t (all first choices before any
  // second choice). capacity <= 0 means dropless; otherwise an expert keeps the first `capacity`
  // assignments in that order and drops the rest (GShard's priority rule).
  // order = token ranks assignments in flat token-major order (t, j) instead, for both the drop
  // decision and the row order within an expert.
  virtual void moe_plan(const Tensor& topk_idx, int experts, int capacity, Tensor& routed,
                        Tensor& counts, Tensor& offsets, Tensor& slot, Tensor& row_token,
                        DropOrder order = DropOrder::rank) = 0;

  // Switch balance loss: bal[0] = coef * E * sum_e f_e * P_e with P_e = mean_t p[t, e] and the
  // routed fractions f_e = routed[e] / sum(routed) (sum(routed) is T*k for one rank's own routing;
  // routed may hold a data-parallel group's counts, or a whole step's so far, so f_e is theirs).
  // p is probs read as spec.score says: softmax probabilities as they are, sigmoid scores
  // normalized to sum 1 per token. With spec.seq_len > 0 (the sequence scope) f and P are taken
  // per sequence of seq_len consecutive tokens (f from topk_idx [T, k], routed unread) and the
  // loss is their mean over the sequences.
  virtual void balance_loss(const Tensor& probs, const Tensor& topk_idx, const Tensor& routed,
                            const BalanceSpec& spec, Tensor& bal) = 0;
  // The default: micro-batch scope, softmax probabilities.
  void balance_loss(const Tensor& probs, const Tensor& routed, float coef, Tensor& bal) {
    BalanceSpec spec;
    spec.coef = coef;
    balance_loss(probs, Tensor{}, routed, spec, bal);
  }

  // Router backward: from dgates [T, k] (loss gradient w.r.t. the gates) and the balance loss as
  // balance_loss defines it (weighted by bal.grad_scale, its weight in the total loss, times
  // bal.coef) and the z-loss (bal.z_coef * bal.grad_scale * mean_t logsumexp(logits[t])^2; logits
  // are read only when z_coef != 0), writes dlogits [T, E] f32. The top-k selection and the routed
  // fractions are treated as constants.
  virtual void router_bwd(const Tensor& logits, const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                          const Tensor& dgates, const Tensor& routed, const RouterSpec& spec,
                          const BalanceSpec& bal, Tensor& dlogits) = 0;
  // The default router and balance loss, micro-batch scope, no z-loss.
  void router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& gates, const Tensor& dgates,
                  const Tensor& routed, float bal_coef, float bal_grad_scale, Tensor& dlogits) {
    RouterSpec spec;
    spec.k = int(topk_idx.numel() / std::max<int64_t>(probs.rows(), 1));
    BalanceSpec bal;
    bal.coef = bal_coef;
    bal.grad_scale = bal_grad_scale;
    router_bwd(Tensor{}, probs, topk_idx, gates, dgates, routed, spec, bal, dlogits);
  }

  // Router statistics of one micro-batch, added into acc [2] (probs' dtype): acc[0] += sum over
  // tokens of the entropy -sum_e q ln q of the router's distribution q (softmax probabilities;
  // sigmoid scores normalized to sum 1), acc[1] += sum over tokens of logsumexp(logits[t])^2.
  virtual void router_stats(const Tensor& logits, const Tensor& probs, RouterScore score, Tensor& acc) = 0;

  // Auxiliary-loss-free balancing (DeepSeek-V3): with load [E] (probs' dtype: assignments per
  // expert over a step) and its mean m, bias[e] += rate * sign(m - load[e]) (sign(0) = 0).
  virtual void router_bias_update(const Tensor& load, float rate, Tensor& bias) = 0;

  // xp[r] = x[row_token[r]] for r < offsets[E]; rows past offsets[E] are left untouched.
  // With amax (its offsets these offsets), each expert's amax of xp is raised too.
  virtual void moe_permute(const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                           const ExpertAmax* amax = nullptr) = 0;
  // dx[t] += sum_j dxp[slot[t, j]] over kept assignments.
  virtual void moe_permute_bwd(const Tensor& dxp, const Tensor& slot, Tensor& dx) = 0;
  // y[t] (+)= sum_j gates[t, j] * yp[slot[t, j]] over kept assignments.
  virtual void moe_combine(const Tensor& yp, const Tensor& slot, const Tensor& gates, Tensor& y,
                           bool accumulate) = 0;
  // dyp[slot[t, j]] = gates[t, j] * dy[t]; dgates[t, j] = <dy[t], yp[slot[t, j]]> (0 if dropped).
  // With amax, each expert's amax of dyp is raised too.
  virtual void moe_combine_bwd(const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates,
                               Tensor& dyp, Tensor& dgates, const ExpertAmax* amax = nullptr) = 0;

  // Expert GEMMs over the permuted rows, reading offsets [E+1] on the device. For each expert e,
  // rows [offsets[e], offsets[e+1]) of A [R, K] times op(W[e]) go to the same rows of C [R, N]:
  // C = alpha A op(W) + beta addend, addend [R, N] (may be C itself; ignored when beta = 0).
  // W is [E, N, K] when trans_w (y = x W_e^T, the Linear convention) else [E, K, N].
  virtual void grouped_matmul(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C,
                              const Tensor& offsets, float alpha = 1.0f, float beta = 0.0f,
                              const Tensor* addend = nullptr) = 0;
  // grouped_matmul (alpha 1, beta 0) with the expert MLP's ReLU² in its store: fold.relu2_output
  // (the up projection's forward) or fold.relu2_input (the down projection's data gradient; C
  // then holds dh). The FP8 fields must be unset. This default runs the unfolded ops.
  virtual void grouped_matmul_relu2(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                                    const ExpertRelu2Fold& fold) {
    check_bf16_relu2_fold(fold, C);
    grouped_matmul(A, W, trans_w, C, offsets);
    if (fold.relu2_output) relu2_fwd(C, *fold.relu2_output);
    if (fold.relu2_input) relu2_bwd(*fold.relu2_input, C, C);
  }
  // dW[e] = dY_e^T X_e + beta * addend[e] with dY [R, N], X [R, K], dW and addend [E, N, K];
  // addend defaults to dW itself (accumulation).
  virtual void grouped_matmul_wgrad(const Tensor& dY, const Tensor& X, Tensor& dW,
                                    const Tensor& offsets, float beta, const Tensor* addend = nullptr) = 0;

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

  // --- optimizers --------------------------------------------------------------------------------
  // group_amax (f32 [G], G dividing param's size): raised to the largest |value| of each of G
  // equal consecutive parts of the updated param (a stack's experts, or a matrix as one part),
  // for the FP8 weight forms' tensor scaling, which then needs no amax pass.
  virtual void adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                            const AdamWStep& s, const Tensor* group_amax = nullptr) = 0;
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
