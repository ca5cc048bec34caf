// The CPU reference backend: every op of backend.hpp in f32 (or f64, for finite-difference
// gradient checks of the whole model), on host memory, with a small static thread pool. It is the
// oracle the CUDA backend is tested against, so each op is written plainly, computes every output
// element on exactly one thread in a fixed order (bit-identical results for any thread count),
// and only matmul is tuned for speed. The ops are spread over cpu_*.cpp files by family.
#pragma once
#include <atomic>
#include <memory>

#include "backend/backend.hpp"
#include "backend/cpu/thread_pool.hpp"

namespace moelab {

class CpuBackend : public Backend {
 public:
  // master: f32 or f64 (activations, weights, gradients and stats all use it). threads 0: all
  // hardware threads.
  explicit CpuBackend(DType master = DType::f32, int threads = 0);
  ~CpuBackend() override;

  int threads() const { return pool_.size(); }
  // Bytes currently held by tensors this backend allocated (freed when their storage dies).
  size_t current_memory_bytes() const;

  Device device() const override { return Device::cpu; }
  std::string name() const override;
  // Everything but graph capture: any head dim, every FP8 scaling (emulated), expert parallel
  // ranks; compute in its master dtype (f32, or f64 for gradient checks).
  bool supports(const Capability& c) const override;
  DType act_dtype() const override { return master_; }
  DType master_dtype() const override { return master_; }
  Tensor alloc(const Shape& shape, DType dtype) override;
  size_t peak_memory_bytes() const override;
  void reset_peak_memory() override;
  void synchronize() override {}

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
  void matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float alpha = 1.0f,
                  float beta = 0.0f, bool fast_accum = false) override;
  void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const Tensor& W, bool trans_w,
                          Fp8Granularity w_gran, Tensor& C, const Tensor& offsets) override;
  void grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const QuantizedExperts& W, Tensor& C,
                          const Tensor& offsets) override;
  void grouped_matmul_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, Fp8Granularity gran, Tensor& dW,
                                const Tensor& offsets) override;

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
  void attention_cached_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, int window) override;
  void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                     const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                     Tensor& dv, int window = 0) override;

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
                Tensor& offsets, Tensor& slot, Tensor& row_token,
                DropOrder order = DropOrder::rank) override;
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

  // Byte counters shared with the deleters of live allocations, so a tensor may outlive its
  // backend without dangling.
  struct MemoryCounter {
    std::atomic<size_t> current{0};
    std::atomic<size_t> peak{0};
  };

 private:
  // An AmaxSink per expert on the CPU: each expert's max |value| of rows [offsets[e], offsets[e+1]) of out,
  // raised into amax.amax (read after the op wrote out).
  void raise_expert_amax(const Tensor& out, const AmaxSink& amax, const char* op);
  // A whole-tensor AmaxSink (amax f32 [1]) raised to out's largest |value|.
  void raise_tensor_amax(const Tensor& out, const AmaxSink& amax, const char* op);
  DType master_;
  cpu::ThreadPool pool_;
  std::shared_ptr<MemoryCounter> memory_;
};

}  // namespace moelab
