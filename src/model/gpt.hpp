// The nanochat-style GPT with MoE MLPs, written once against the Backend op interface:
// embedding -> RMSNorm (= x0) -> L x [(x = resid_lambda x + x0_lambda x0, with
// model.scalar_lambdas) attention (rotary, QK-norm, GQA; gated value embedding added to v on
// alternating layers with model.value_embeddings) ; MLP (dense ReLU^2 or MoE)] -> RMSNorm ->
// untied head -> softcap 15 -> cross-entropy. Forward and backward are explicit
// sequences of ops; every activation buffer is planned once in the constructor, so a step
// allocates nothing and can be captured in a CUDA graph. Statistics (loss sum, balance loss,
// expert loads, drops) accumulate in device tensors and are read once, after the step.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "comm/communicator.hpp"
#include "config/config.hpp"
#include "model/expert_exchange.hpp"
#include "model/linear_gemms.hpp"
#include "model/params.hpp"

namespace moelab {

// What one step (all micro-batches) produced, read back to the host after the step.
struct StepStats {
  double loss_sum = 0;      // sum of per-token cross-entropy over valid targets
  double bal = 0;           // balance loss summed over MoE layers, mean over micro-batches, as logged
                            // (moe.balance_rule = seed: without the coefficient, as the seed logs it)
  double bal_term = 0;      // what the balance loss adds to the loss that is differentiated
  double drop_rate = 0;     // dropped / routed assignments over all MoE layers
  std::vector<std::vector<double>> expert_load;  // per MoE layer: fraction routed to each expert
  // Routing statistics per MoE layer (layer order), over the step's tokens:
  std::vector<double> max_vio;         // max_e load_e / mean_e load_e - 1, loads before drops, all ranks
  std::vector<double> router_entropy;  // mean over tokens of the router distribution's entropy (this rank)
  double z_loss = 0;                   // mean over MoE layers of the mean logsumexp(logits)^2 (this rank)
  std::vector<double> bias_range;      // moe.balance = aux_free: max_e bias - min_e bias (else empty)
};

class GptMoE {
 public:
  // Plans every buffer for micro-batches of `rows` sequences of `seq_len` tokens. With an
  // expert-parallel group (parallel.expert = its ranks, CPU ranks), this rank holds only its
  // share of every MoE layer's experts and exchanges token rows with the others (ExpertExchange);
  // the group must outlive the model, and every rank calls every forward in step.
  GptMoE(Backend& backend, const Config& cfg, int64_t rows, int64_t seq_len, Communicator* expert_group = nullptr);

  ParamTable& params() { return params_; }
  const Config& config() const { return cfg_; }
  int64_t tokens_per_micro_batch() const { return rows_ * seq_len_; }

  // nanochat's init from a seed; all_random also randomizes the zero-initialized projections
  // (used by gradient checks, where zero weights would hide gradient paths).
  void init_weights(uint64_t seed, bool all_random = false);
  // Copy master weights into their compute copies (after init, load or an optimizer step).
  void refresh_compute_weights();
  // The gradient arenas (master dtype) of the parameters every rank holds alike, every such
  // gradient in a few flat buffers: what data parallelism sums over ranks before the update. An
  // expert-parallel rank's own experts are not among them (no other rank holds them).
  std::vector<Tensor> gradient_arenas() {
    std::vector<Tensor> out;
    for (auto& a : arenas_)
      if (!a.rank_own) out.push_back(a.grad);
    return out;
  }

  // Data parallel: the ranks of `group` train one model on their own rows. The balance loss then
  // counts every rank's routing (each expert's routed assignments summed over the group before
  // the loss and its router gradient), as one rank with the whole batch would; capacity drops
  // stay each rank's own. Every rank calls forward_backward in step; nullptr (the default) is one
  // rank. The group must outlive the model.
  void set_group(Communicator* group);

  // Step accumulators: zero the gradients and statistics before the first micro-batch.
  void begin_step();
  // After the optimizer step, on the device: the step's expert loads summed over the group (for
  // MaxVio), and with moe.balance = aux_free each MoE layer's router bias moved by
  // bias_update_rate * sign(mean load - load) (DeepSeek-V3's auxiliary-loss-free balancing).
  void end_step();
  // One micro-batch: forward, loss, backward; gradients accumulate into Param::grad.
  // tokens, targets: i32 [rows * seq_len] on the device. loss_scale weights this micro-batch's
  // mean loss in the total (1 / (valid targets * grad_accum)); bal_scale weights its balance loss.
  void forward_backward(const Tensor& tokens, const Tensor& targets, float loss_scale, float bal_scale);
  // Forward only: per-token losses into losses() (f32/f64 [rows * seq_len]).
  void forward_eval(const Tensor& tokens, const Tensor& targets);
  const Tensor& losses() const { return losses_; }
  // Read the accumulated statistics (synchronizes with the device).
  StepStats read_stats(int64_t micro_batches);

  // Incremental decoding (`moelab sample`): every layer's keys (after RoPE + QK-norm) and values
  // of the positions decoded so far, so a new token attends without re-running its prefix.
  struct KvCache {
    std::vector<Tensor> k, v;  // per layer [1, capacity, kv heads, head dim], act dtype
    int64_t length = 0;        // positions held
    int64_t capacity = 0;      // at most model.max_seq (the rotary table's length)
  };
  // A cache for up to `capacity` positions. Decoding needs a model planned for rows = 1, a
  // precision without FP8 and no expert parallelism.
  KvCache make_kv_cache(int64_t capacity);
  // Runs `tokens` as the positions after cache.length (at most the model's seq_len of them at
  // once; a prompt, then one token at a time): appends their keys and values to the cache and
  // returns the softcapped logits of the last one (vocab values, on the host). Windows are the
  // trained ones (layer_windows of train.seq_len), and MoE routing is per token: every token
  // goes to its top-k experts (dropless), whatever moe.dispatch says, since capacity is a rule
  // over a training batch. Statistics are not accumulated.
  std::vector<double> forward_decode(const std::vector<int32_t>& tokens, KvCache& cache);

  // Matmul parameters a token passes through (inactive experts excluded), for MFU.
  int64_t active_matmul_params() const;
  // nanochat's FLOPs per token: 6 * active params + 12 * d_model * (each layer's attended span:
  // its window, or seq_len for full context).
  double flops_per_token() const;

 private:
  struct Layer {
    bool moe = false;
    Param *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    Param *fc = nullptr, *proj = nullptr;                          // dense MLP
    Param *router = nullptr, *w_fc = nullptr, *w_proj = nullptr;  // experts [E, He, D], [E, D, He]
    Param *sh_fc = nullptr, *sh_proj = nullptr;                    // shared expert
    Param *ve = nullptr, *ve_gate = nullptr;                       // value embedding [V, kvdim], gate [Hkv, C]
    // Saved activations.
    int window = 0;  // sliding window of this layer's attention (0: full causal)
    Tensor x_in, xn1, rstd1, q, k, v, qr, kr, rstd_q, rstd_k, att, lse, x_mid, xn2, rstd2;
    LinearGemms::SavedInput xn1_t, att_t;  // FP8 dense: xn1^T and att^T from the forward
    Tensor expert_amax;  // [4, E]: amax of xp, relu²(hp), dyp, dhp (FP8 experts, tensor scaling)
    // FP8 dense layers, tensor scaling: f32 [1] each, the amax of xn1, of the output projection's
    // dy and of dq and dk (before RoPE), raised by the norms that write them (else empty).
    enum DenseAmax { xn1_amax, proj_dy_amax, dq_amax, dk_amax };
    std::array<AmaxSink, 4> dense_amax;
    Tensor h, a;                                                   // dense or shared expert
    Tensor router_logits, probs, topk, gates, routed, counts, offsets, slot, row_token;
    Tensor routed_group;  // routed summed over the data-parallel group (with set_group)
    Param* score_bias = nullptr;  // moe.balance = aux_free: the bias [E] on the choice scores
    // moe.balance_scope = global_batch: the (group's) routed counts of the step so far, as a
    // float accumulator and as the i32 counts the balance loss reads.
    Tensor routed_acc, routed_step;
    // Expert parallel: the exchange, and this rank's experts' rows (by local expert).
    std::unique_ptr<ExpertExchange> exchange;
    Tensor offsets_local, xp_local, hp_local, ap_local, yp_local;
    Tensor xp, hp, ap, yp, bal;
    // With FP8 experts, the experts' inputs (xp, ap) as their weight gradients read them, kept
    // from the forward; xp and ap are then one buffer shared by all layers.
    SavedExpertOperand xp_saved, ap_saved;
    Tensor x_pre;      // the stream before the lambda mix (scalar_lambdas; layer 0 reads x0)
    Tensor ve_x, gate;  // value embedding rows [N, kvdim] and gate [N, Hkv] (value_embeddings)
  };
  // The routed counts the balance terms read: the step's so far (global_batch scope), the group's
  // (data parallel), or this micro-batch's own.
  const Tensor& routed_for_balance(const Layer& l) const {
    return global_scope_ ? l.routed_step : (group_routing_ ? l.routed_group : l.routed);
  }
  // Whether layer i carries a value embedding: alternating, the last layer always included.
  bool has_value_embedding(int64_t layer) const;

  // Whether the FP8 products of the recipe's linears are all that read p (then p keeps no bf16
  // compute copy; LinearGemms holds its FP8 forms).
  bool read_in_fp8_only(const Param& p) const;
  // Records a parameter; place_params() then gives it memory.
  void add_param(const std::string& name, ParamGroup group, const Shape& shape);
  // Parameters of one (group, shape) go back to back into one allocation each for values,
  // gradients and compute copies, in table order: zeroing every gradient and refreshing every
  // bf16 copy take a few kernels, and Muon finds each same-shape stack contiguous. A kind that
  // only FP8 products read has no compute copy (compute aliases the master).
  void place_params();

  // The constructor's parts, in the order it runs them.
  struct Widths {  // the model's widths, as every part reads them
    int64_t D = 0, V = 0, qdim = 0, kvdim = 0, H = 0, He = 0, Hs = 0;
    bool shared = false;          // MoE layers carry shared experts (Hs: their one MLP's width)
    std::vector<bool> moe_mask;   // per layer: MoE or dense MLP
  };
  Widths widths() const;
  void declare_params(const Widths& w);  // the parameter table, under nanochat's names
  void allocate_layers(const Widths& w);
  void allocate_attention(Layer& l, int64_t i, const Widths& w);
  void allocate_moe(Layer& l, int64_t i, const Widths& w);
  void allocate_dense_mlp(Layer& l, int64_t i, const Widths& w);
  void make_rotary_tables();
  void allocate_step_buffers(const Widths& w);
  void allocate_backward_scratch(const Widths& w);
  void plan_fp8(const Widths& w);
  // A zeroed buffer: no stale NaN anywhere, even in rows an op never writes.
  Tensor zeros(const Shape& s, DType t);
  void forward(const Tensor& tokens);
  void mlp_forward(Layer& l, const Tensor& xn, Tensor& out);
  // forward_decode's MLP over the first T rows of the layer's buffers (dropless routing).
  void mlp_decode(Layer& l, const Tensor& xn, Tensor& out, int64_t T);
  void mlp_backward(Layer& l, const Tensor& dy, Tensor& dxn);
  void dense_forward(Param& fc, Param& proj, const Tensor& xn, Tensor& h, Tensor& a, Tensor& out, bool accumulate);
  void dense_backward(Param& fc, Param& proj, const Tensor& xn, const Tensor& h, const Tensor& a,
                      const Tensor& dy, Tensor& dxn, bool accumulate);
  void attention_backward(Layer& l, const Tensor& dy, Tensor& dxn);
  // Head + loss over row chunks; with backward, also writes dxf and accumulates dW of lm_head.
  void head_loss(const Tensor& targets, float loss_scale, bool backward);

  Backend& be_;
  Config cfg_;
  Fp8Recipe fp8_;                             // which linears run in FP8, and how
  LinearGemms lin_;                           // every linear except the router goes through it
  Tensor weights_amax_;      // the FP8 weights' Param::value_amax, all in one buffer
  int64_t rows_, seq_len_, n_;  // n_ = rows_ * seq_len_
  int64_t heads_, kv_heads_, head_dim_, d_model_, experts_, top_k_, capacity_, rows_max_;
  DType act_, stat_;
  ParamTable params_;
  struct ParamArena {
    Tensor value, grad, compute;  // [elements, 1]; compute aliases value when act == master dtype or
                                  // only FP8 products read the kind
    bool rank_own = false;        // this rank's expert-parallel share of the experts
  };
  std::vector<ParamArena> arenas_;
  Param *wte_ = nullptr, *head_ = nullptr;
  Param *resid_lambdas_ = nullptr, *x0_lambdas_ = nullptr;  // [layers] each, with scalar_lambdas
  DropOrder drop_order_ = DropOrder::rank;
  RouterSpec router_spec_;    // moe.score, top_k, norm_topk, route_scale, groups, topk_groups
  BalanceSpec balance_spec_;  // moe.balance_scope, z_loss_coef (coef and grad_scale set per call)
  bool balance_loss_on_ = true, aux_free_ = false, global_scope_ = false;
  float bal_log_coef_ = 0, bal_loss_coef_ = 0;  // balance loss as logged / as differentiated
  std::vector<Layer> layers_;

  Tensor cos_, sin_;
  Tensor emb_, rstd0_, x_out_, xf_, rstd_f_, logits_, losses_, loss_sum_, bal_sum_, load_acc_, kept_acc_, tmp1_;
  Tensor router_acc_;  // [moe layers, 2]: each layer's summed entropy and logsumexp^2 (router_stats)
  Tensor load_step_;   // [moe layers * E]: load_acc_ summed over the group, written by end_step
  int64_t chunk_rows_ = 0;
  LinearGemms::SavedInput head_xt_;  // FP8 head: the chunk's x^T from its forward
  float bal_scale_ = 0;  // balance-loss weight of the micro-batch being differentiated
  Communicator* group_ = nullptr;  // set_group; training forwards sum the routing over it
  Communicator* expert_group_ = nullptr;  // expert parallel over its ranks
  int64_t experts_local_ = 0, expert_first_ = 0;  // this rank's experts: [first, first + local)
  Tensor ep_stage_, dyp_local_, dap_local_, dhp_local_, dxp_local_;  // expert-parallel scratch
  bool group_routing_ = false;     // inside forward_backward with a group of several ranks
  // Backward scratch, shared by all layers.
  Tensor dx_, dxn_, dxf_, dtmp_, datt_, dq_, dk_, dv_, dqraw_, dkraw_, dh_, da_;
  Tensor dyp_, dhp_, dxp_, dgates_, dlogits_r_, dlogits_r_act_;
  Tensor expert_amax_;  // [moe layers, 4, E] f32, each layer's Layer::expert_amax
  // [layers * 4 + head chunks] f32: each layer's Layer::dense_amax, then each head chunk's dlogits
  // amax (head_dy_amax_, FP8 head with tensor scaling), raised by the loss.
  Tensor dense_amax_;
  std::vector<AmaxSink> head_dy_amax_;
  Tensor expert_x_shared_;  // xp of every layer when the experts run in FP8
  Tensor dx0_;  // gradient reaching x0 through the lambda mixes
  Tensor decode_tokens_;  // i32 [n_]: forward_decode's token ids on the device (make_kv_cache)
};

}  // namespace moelab
