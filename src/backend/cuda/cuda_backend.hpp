// The CUDA backend: every op of backend.hpp as CUDA kernels (and cuBLASLt GEMMs) on one stream
// that the backend owns. Activations and matmul operands are bf16 with f32 accumulation; master
// weights, optimizer state and statistics are f32.
//
// Shaped for CUDA-graph capture of a whole training step: no op synchronizes with the host, no op
// allocates device memory once its scratch buffers have reached their size. Scratch buffers grow
// lazily on first use, so run one step eagerly (the warm-up) before capturing; growing during a
// capture throws an Error that says so. Index data that a step needs (expert counts, offsets)
// stays on the device: grouped GEMMs read offsets there.
#pragma once
#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.hpp"

namespace moelab {

class CudaMemory;
struct GemmCache;
namespace grouped_gemm {
enum class Fp8ScaleMode : int;
struct StraightCopy;
struct Relu2Epilogue;
}  // namespace grouped_gemm

class CudaBackend : public Backend {
 public:
  // True when a CUDA device can be opened (driver present, at least one GPU).
  static bool cuda_device_available();
  // Head dims the tensor-core attention kernels serve (others run on slow generic kernels).
  static bool fast_attention_head_dim(int head_dim);
  // Opens device `device_index`; throws moelab::Error naming the cause when there is no GPU
  // (never falls back to the CPU silently).
  explicit CudaBackend(int device_index = 0);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  cudaStream_t stream() const { return stream_; }
  // While capturing, scratch buffers may not grow (it would allocate inside the graph).
  void begin_capture() { capturing_ = true; }
  void end_capture() { capturing_ = false; }
  bool capturing() const { return capturing_; }
  // Bytes currently held through alloc() and scratch buffers.
  size_t current_memory_bytes() const;
  int sm_count() const { return sm_count_; }
  // Which kernels attention runs on (bf16, head dim 64 or 128): `automatic` takes cuDNN's fused
  // flash-attention engine wherever it plans the shape (faster at every shape measured, see
  // bench/RESULTS.md) and the own tensor-core kernels elsewhere (f32 gradients, no cuDNN);
  // `cudnn` and `flash` force one path, for benchmarks and tests.
  enum class AttentionKernels { automatic, cudnn, flash };
  void set_attention_kernels(AttentionKernels k) { attention_kernels_ = k; }

  Device device() const override { return Device::cuda; }
  std::string name() const override { return name_; }
  // Graph capture, bf16 compute, attention at the fast kernels' head dims, every FP8 scaling; no
  // expert parallel ranks yet (the exchange runs over MPI on host memory).
  bool supports(const Capability& c) const override;
  std::unique_ptr<CapturedGraph> make_graph() override;
  DType act_dtype() const override { return DType::bf16; }
  DType master_dtype() const override { return DType::f32; }
  Tensor alloc(const Shape& shape, DType dtype) override;
  size_t peak_memory_bytes() const override;
  void reset_peak_memory() override;
  std::optional<size_t> free_device_memory() const override;
  void synchronize() override;
  void profiler_range(bool start) override;

  void write(Tensor& dst, const std::vector<float>& values) override;
  void write_i32(Tensor& dst, const std::vector<int32_t>& values) override;
  std::vector<float> read(const Tensor& src) override;
  std::vector<int32_t> read_i32(const Tensor& src) override;

  void fill(Tensor& t, float value) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void axpby(float a, const Tensor& x, float b, Tensor& y) override;
  void sum(const Tensor& x, Tensor& out, bool accumulate) override;

  void matmul(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C,
              float alpha = 1.0f, float beta = 0.0f) override;

  void quantize_fp8(const Tensor& x, bool transpose, QuantizedOperand& out) override;
  void quantize_fp8_pair(const Tensor& x, QuantizedOperand& straight, QuantizedOperand& transposed,
                         const Tensor* amax = nullptr) override;
  void quantize_fp8_pairs(const std::vector<Fp8PairJob>& jobs) override;
  void matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float alpha = 1.0f,
                  float beta = 0.0f, bool fast_accum = false) override;
  void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const Tensor& W, bool trans_w,
                          Fp8Granularity w_gran, Tensor& C, const Tensor& offsets) override;
  void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const QuantizedExperts& W, Tensor& C,
                          const Tensor& offsets) override;
  void quantize_experts_fp8(const Tensor& W, bool transpose, QuantizedExperts& out) override;
  void quantize_experts_fp8_pair(const Tensor& W, QuantizedExperts& straight, QuantizedExperts& transposed,
                                 const Tensor* amax = nullptr) override;
  void grouped_matmul_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, Fp8Granularity gran, Tensor& dW,
                                const Tensor& offsets) override;
  SavedExpertOperand alloc_saved_expert_operand(int64_t rows, int64_t cols, int experts, Fp8Granularity g) override;
  void grouped_matmul_fp8_saving(const Tensor& A, Fp8Granularity a_gran, const QuantizedExperts& W, Tensor& C,
                                 const Tensor& offsets, SavedExpertOperand& save, const Tensor* a_amax = nullptr,
                                 const ExpertRelu2Fold& fold = {}) override;
  void grouped_matmul_backward_fp8(const Tensor& dY, DType dy_format, Fp8Granularity a_gran, const QuantizedExperts& Wt,
                                   const SavedExpertOperand& X, Tensor& dX, Tensor& dW, const Tensor& offsets,
                                   const Tensor* dy_amax = nullptr, const ExpertRelu2Fold& fold = {}) override;

  void embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) override;
  void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) override;

  void rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& rstd, const AmaxSink* amax = nullptr) override;
  void rmsnorm_bwd(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                   bool accumulate, const AmaxSink* amax = nullptr) override;
  void rope_norm_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y,
                     Tensor& rstd) override;
  void rope_norm_bwd(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& rstd,
                     const Tensor& dy, Tensor& dx, const AmaxSink* amax = nullptr) override;

  void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                     Tensor& lse, int window = 0) override;
  void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                     const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                     Tensor& dv, int window = 0) override;
  // One block per query row over the cache (attention_cached.cu).
  void attention_cached_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, int window = 0) override;

  void relu2_fwd(const Tensor& h, Tensor& a, const AmaxSink* amax = nullptr) override;
  void relu2_bwd(const Tensor& h, const Tensor& da, Tensor& dh, const AmaxSink* amax = nullptr) override;

  void softcap_xent(const Tensor& logits, const Tensor& targets, float cap, float grad_scale,
                    Tensor& losses, Tensor& dlogits, const AmaxSink* amax = nullptr) override;

  using Backend::router_topk;
  using Backend::balance_loss;
  using Backend::router_bwd;
  void router_topk(const Tensor& logits, const RouterSpec& spec, const Tensor* bias, Tensor& probs, Tensor& topk_idx,
                   Tensor& gates) override;
  void moe_plan(const Tensor& topk_idx, int experts, int capacity, Tensor& routed, Tensor& counts,
                Tensor& offsets, Tensor& slot, Tensor& row_token, DropOrder order = DropOrder::rank) override;
  void balance_loss(const Tensor& probs, const Tensor& topk_idx, const Tensor& routed, const BalanceSpec& spec,
                    Tensor& bal) override;
  void router_bwd(const Tensor& logits, const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                  const Tensor& dgates, const Tensor& routed, const RouterSpec& spec, const BalanceSpec& bal,
                  Tensor& dlogits) override;
  void router_stats(const Tensor& logits, const Tensor& probs, RouterScore score, Tensor& acc) override;
  void router_bias_update(const Tensor& load, float rate, Tensor& bias) override;
  void moe_permute(const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                   const AmaxSink* amax = nullptr) override;
  void moe_permute_bwd(const Tensor& dxp, const Tensor& slot, Tensor& dx) override;
  void moe_combine(const Tensor& yp, const Tensor& slot, const Tensor& gates, Tensor& y,
                   bool accumulate) override;
  void moe_combine_bwd(const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates, Tensor& dyp,
                       Tensor& dgates, const AmaxSink* amax = nullptr) override;
  void grouped_matmul(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                      float alpha = 1.0f, float beta = 0.0f, const Tensor* addend = nullptr) override;
  void grouped_matmul_relu2(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                            const ExpertRelu2Fold& fold) override;
  void grouped_matmul_wgrad(const Tensor& dY, const Tensor& X, Tensor& dW, const Tensor& offsets, float beta,
                            const Tensor* addend = nullptr) override;

  void lambda_mix_fwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0,
                      Tensor& y) override;
  void lambda_mix_bwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0,
                      const Tensor& dy, Tensor& dx, Tensor& dx0, Tensor& da, Tensor& db) override;
  void value_gate_fwd(const Tensor& x, const Tensor& w, const Tensor& ve, Tensor& v, Tensor& gate) override;
  void value_gate_bwd(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& gate,
                      const Tensor& dv, Tensor& dve, Tensor& dw, Tensor& dx) override;

  void adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                    const AdamWStep& s, const AmaxSink* amax = nullptr) override;
  void normuon_update(const Tensor& x, Tensor& second_moment, Tensor& param, const NorMuonStep& s) override;
  void frobenius_normalize(const Tensor& x, Tensor& y, float eps) override;
  void frobenius_normalize_batched(const Tensor& x, Tensor& y, float eps) override;
  void muon_momentum(const Tensor& grad, Tensor& momentum, Tensor& update, float mu, bool nesterov) override;
  void sum_squares(const Tensor& x, Tensor& out, bool accumulate) override;

  // Device scratch of at least `bytes` for one purpose (slot), grown outside capture only.
  // Contents do not survive other ops using the same slot.
  enum class ScratchSlot : int { reduce, gemm_a, gemm_b, attention, embed_sort, embed_keys, embed_partial,
                                 value_gate, normuon, fp8_amax, fp8_out, fp8_grouped_a, fp8_grouped_b,
                                 fp8_grouped_scale_a, fp8_grouped_scale_b, fp8_grouped_offsets, fp8_grouped_at,
                                 fp8_grouped_scale_at, moe_plan, router, count };
  void* scratch(ScratchSlot slot, size_t bytes);

 private:
  void grouped_matmul_impl(const Tensor& A, const Tensor& W, bool trans_w, Tensor& C, const Tensor& offsets,
                           float alpha, float beta, const Tensor* addend, const grouped_gemm::Relu2Epilogue& relu2);
  // quantize_fp8 of `batch` [xr, xc] matrices stored one after another, each with its own
  // groups: codes [batch * rows, K] into out, scales of one member after another into scale
  // (fp8_scale_shape's layout each). With segments (E + 1 expert offsets), a single straight
  // matrix with tensor scaling takes one scale per expert segment instead (scale [E]); rows past
  // the last segment (capacity dispatch's unused tail) enter no scale.
  void quantize_fp8_batch(const void* x, DType x_dtype, int64_t batch, int64_t xr, int64_t xc, bool transpose,
                          Fp8Granularity g, uint8_t* out, DType format, float* scale, const int32_t* segments,
                          int segment_count);
  // Both copies of each of `batch` matrices x [xr, xc] (straight and transposed, one format and
  // granularity) from one read, with one amax pre-pass for the two; scales as quantize_fp8_batch's.
  // A batch > 1 takes tensor or row groups (an expert stack's weight forms).
  // known_amax (batch 1, tensor groups): x's amax from its producer, so no amax pass runs.
  void quantize_fp8_pair_batch(const void* x, DType x_dtype, int64_t batch, int64_t xr, int64_t xc, Fp8Granularity g,
                               uint8_t* out, float* scale, uint8_t* out_t, float* scale_t, DType format,
                               const unsigned* known_amax = nullptr);
  // quantize_fp8_pairs' launches over the same-shaped matrices of one group: a device table of
  // their addresses (x, codes, scales of both copies), kept from the first call that meets them,
  // or null where none is kept and a graph is recording (no upload can run then).
  const void* pair_member_table(const std::vector<uint64_t>& addresses);
  std::map<std::vector<uint64_t>, Tensor> pair_member_tables_;
  // Raises amax (f32 [1]) to out's amax by a pass over out: for the producers whose kernel for
  // this shape cannot raise it as it writes.
  void raise_amax_by_pass(const Tensor& out, const Tensor& amax);
  // The experts' FP8 operands (grouped_gemm_fp8.cu): weights quantized expert by expert as
  // forward_fp8's B, and token-side operands as wgrad_fp8's transposed padded segments
  // (optionally with the straight copy from the same read).
  struct ExpertWeightsFp8 {
    uint8_t* codes = nullptr;
    float* scales = nullptr;
    int kb_stride = 0;
  };
  static ExpertWeightsFp8 expert_weights_of(const QuantizedExperts& W);
  struct SegmentsFp8 {
    uint8_t* codes = nullptr;
    float* scales = nullptr;
  };
  const int32_t* padded_segments(const Tensor& offsets, int E);
  grouped_gemm::StraightCopy straight_rows_scratch(int64_t R, int K, grouped_gemm::Fp8ScaleMode mode);
  SegmentsFp8 segments_scratch(ScratchSlot codes_slot, ScratchSlot scale_slot, int64_t cols, int E, int64_t Rp,
                               grouped_gemm::Fp8ScaleMode mode);
  void quantize_segments(const Tensor& x, const SegmentsFp8& out, const Tensor& offsets, const int32_t* padded, int E,
                         int64_t Rp, grouped_gemm::Fp8ScaleMode mode, DType format, grouped_gemm::StraightCopy* straight,
                         const Tensor* known_amax = nullptr, bool relu2_of_x = false);
  // Sum of f(x) over all elements into out[0] (square when `squares`); deterministic two-pass.
  void reduce_sum(const Tensor& x, bool squares, Tensor& out, bool accumulate, float scale = 1.0f);

  int device_index_ = 0;
  int sm_count_ = 0;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  bool capturing_ = false;
  AttentionKernels attention_kernels_ = AttentionKernels::automatic;
  // Whether this attention call goes to cuDNN (throws when `cudnn` is forced and cannot serve it).
  bool attention_on_cudnn(int B, int T, int Hq, int Hkv, int hd, int window, bool bf16_grads);
  std::unique_ptr<CudaMemory> memory_;
  std::unique_ptr<GemmCache> gemm_;
  std::vector<std::shared_ptr<void>> scratch_;
  std::vector<size_t> scratch_bytes_;
};

// Captures the work that `body` enqueues on the backend's stream into a CUDA graph, then replays
// it. The body must only enqueue work (no host synchronization, no allocation); run it once
// eagerly before capture so that scratch buffers have their final sizes.
class CudaGraph : public CapturedGraph {
 public:
  explicit CudaGraph(CudaBackend& backend) : backend_(backend) {}
  ~CudaGraph() override;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  void capture(const std::function<void()>& body) override;
  // Records body again and updates the instantiated graph in place (same topology, new kernel
  // arguments such as a step's learning rate), without waiting for the stream: the host can
  // record while the device still runs earlier work. Captures on first use.
  void recapture(const std::function<void()>& body) override;
  void replay() override;
  bool captured() const override { return exec_ != nullptr; }

 private:
  CudaBackend& backend_;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace moelab
