// GptMoE: parameter table, buffer plan, forward and hand-written backward as op sequences.
#include "model/gpt.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "core/rng.hpp"

namespace moelab {
namespace {

// A [B, T, H, hd] activation as the [B*T, H*hd] matrix that matmuls see.
Tensor tokens_by_features(const Tensor& t) { return t.view({t.dim(0) * t.dim(1), t.numel() / (t.dim(0) * t.dim(1))}); }

// An optional amax sink as producers take it, and the amax it recorded as a quantization reads
// it: null when the run records none (no FP8 tensor scaling there).
const AmaxSink* sink(const AmaxSink& s) { return s.amax.data ? &s : nullptr; }
const Tensor* recorded(const AmaxSink& s) { return s.amax.data ? &s.amax : nullptr; }

// Elements [begin, end) of a flat tensor.
Tensor elements(const Tensor& t, int64_t begin, int64_t end) {
  return t.view({t.numel(), 1}).rows_slice(begin, end).view({end - begin});
}

// A device scalar on the host. f64 tensors live only on the CPU (gradient-check mode), where
// they are read in full precision rather than through Backend::read's floats.
double read_scalar(Backend& be, const Tensor& t) {
  if (t.device == Device::cpu && t.dtype == DType::f64) return *t.as<double>();
  return be.read(t)[0];
}

// A device tensor on the host, f64 tensors (CPU gradient checks) in full precision.
std::vector<double> read_values(Backend& be, const Tensor& t) {
  if (t.device == Device::cpu && t.dtype == DType::f64) return {t.as<double>(), t.as<double>() + t.numel()};
  const std::vector<float> f = be.read(t);
  return {f.begin(), f.end()};
}

}  // namespace

GptMoE::GptMoE(Backend& backend, const Config& cfg, int64_t rows, int64_t seq_len, Communicator* expert_group)
    : be_(backend),
      cfg_(cfg),
      fp8_(fp8_recipe(cfg)),
      lin_(backend, fp8_),
      rows_(rows),
      seq_len_(seq_len),
      n_(rows * seq_len) {
  validate_config(cfg_);
  const ModelConfig& m = cfg_.model;
  d_model_ = m.d_model;
  head_dim_ = m.head_dim;
  heads_ = m.heads();
  kv_heads_ = m.kv_heads_resolved();
  experts_ = cfg_.moe.enabled() ? cfg_.moe.experts : 0;
  top_k_ = experts_ ? cfg_.moe.top_k : 0;
  if (expert_group && expert_group->world() > 1 && experts_ > 0) {
    if (!be_.supports(Capability::experts_across_ranks()))
      throw Error("expert parallel runs on CPU ranks for now: set device = \"cpu\" (GPU ranks need NCCL)");
    if (experts_ % expert_group->world() != 0)
      throw Error("parallel.expert: " + std::to_string(experts_) + " experts do not split over " +
                  std::to_string(expert_group->world()) + " ranks");
    expert_group_ = expert_group;
  }
  experts_local_ = expert_group_ ? experts_ / expert_group_->world() : experts_;
  expert_first_ = expert_group_ ? expert_group_->rank() * experts_local_ : 0;
  capacity_ = cfg_.expert_capacity(n_);
  rows_max_ = experts_ ? (capacity_ > 0 ? std::min(n_ * top_k_, experts_ * capacity_) : n_ * top_k_) : 0;
  act_ = be_.act_dtype();
  stat_ = be_.master_dtype();
  drop_order_ = cfg_.moe.drop_order == "token" ? DropOrder::token : DropOrder::rank;
  // The balance op computes coef * E * sum_e P_e * routed_e / (T k). The seed's f_e = routed_e / T
  // is k times that, and the seed logs the loss without its coefficient.
  if (cfg_.moe.balance_rule == "seed") {
    bal_log_coef_ = float(top_k_);
    bal_loss_coef_ = float(cfg_.moe.balance_coef * double(top_k_));
  } else {
    bal_log_coef_ = bal_loss_coef_ = float(cfg_.moe.balance_coef);
  }
  // Routing lab: the router's scores and gates, and which balance terms the loss carries.
  router_spec_.score = cfg_.moe.score == "sigmoid" ? RouterScore::sigmoid : RouterScore::softmax;
  router_spec_.k = int(top_k_);
  router_spec_.norm_topk = cfg_.moe.norm_topk;
  router_spec_.route_scale = float(cfg_.moe.route_scale);
  router_spec_.groups = int(cfg_.moe.groups);
  router_spec_.topk_groups = int(cfg_.moe.topk_groups);
  balance_spec_.score = router_spec_.score;
  balance_spec_.seq_len = cfg_.moe.balance_scope == "sequence" ? seq_len : 0;
  balance_spec_.z_coef = float(cfg_.moe.z_loss_coef);
  global_scope_ = cfg_.moe.balance_scope == "global_batch";
  aux_free_ = cfg_.moe.balance == "aux_free";
  // aux_free carries an aux loss only as DeepSeek-V3's complementary sequence-wise loss
  // (balance_scope = sequence, at balance_coef); none carries none.
  balance_loss_on_ = cfg_.moe.balance == "aux_loss" || (aux_free_ && cfg_.moe.balance_scope == "sequence");
  if (!balance_loss_on_) bal_log_coef_ = bal_loss_coef_ = 0;
  if (seq_len_ > m.max_seq)
    throw Error("sequence length " + std::to_string(seq_len_) + " exceeds model.max_seq = " + std::to_string(m.max_seq));

  const Widths w = widths();
  declare_params(w);
  place_params();
  // Resolve parameter pointers only now: the table no longer grows.
  wte_ = &params_.get("transformer.wte.weight");
  head_ = &params_.get("lm_head.weight");
  if (m.scalar_lambdas) {
    resid_lambdas_ = &params_.get("resid_lambdas");
    x0_lambdas_ = &params_.get("x0_lambdas");
  }
  layers_.resize(size_t(m.layers));
  allocate_layers(w);
  make_rotary_tables();
  allocate_step_buffers(w);
  allocate_backward_scratch(w);
  plan_fp8(w);
}

GptMoE::Widths GptMoE::widths() const {
  const ModelConfig& m = cfg_.model;
  Widths w;
  w.D = d_model_;
  w.V = m.vocab;
  w.qdim = heads_ * head_dim_;
  w.kvdim = kv_heads_ * head_dim_;
  w.H = m.mlp_hidden_resolved();
  w.He = cfg_.moe.expert_hidden;
  // N shared experts of shared_hidden each run as one MLP of N * shared_hidden: ReLU² is
  // elementwise, so the sum of the N experts' outputs is the wide MLP's output.
  w.shared = experts_ > 0 && cfg_.moe.shared_count() > 0;
  w.Hs = (cfg_.moe.shared_hidden > 0 ? cfg_.moe.shared_hidden : w.He) * (w.shared ? cfg_.moe.shared_count() : 1);
  w.moe_mask = cfg_.moe_layer_mask();
  return w;
}

Tensor GptMoE::zeros(const Shape& s, DType t) {
  Tensor x = be_.alloc(s, t);
  be_.fill(x, 0.0f);  // no stale NaN anywhere, even in rows an op never writes
  return x;
}

void GptMoE::declare_params(const Widths& w) {
  const ModelConfig& m = cfg_.model;
  const int64_t D = w.D, V = w.V, qdim = w.qdim, kvdim = w.kvdim, H = w.H, He = w.He, Hs = w.Hs;
  const int64_t gate_channels = m.ve_gate_channels;
  const auto& moe_mask = w.moe_mask;
  const bool shared = w.shared;
  add_param("transformer.wte.weight", ParamGroup::embedding, {V, D});
  for (int64_t i = 0; i < m.layers; ++i) {
    std::string p = "transformer.h." + std::to_string(i) + ".";
    add_param(p + "attn.c_q.weight", ParamGroup::matrix, {qdim, D});
    add_param(p + "attn.c_k.weight", ParamGroup::matrix, {kvdim, D});
    add_param(p + "attn.c_v.weight", ParamGroup::matrix, {kvdim, D});
    add_param(p + "attn.c_proj.weight", ParamGroup::matrix, {D, qdim});
    if (has_value_embedding(i)) add_param(p + "attn.ve_gate.weight", ParamGroup::matrix, {kv_heads_, gate_channels});
    if (moe_mask[size_t(i)]) {
      add_param(p + "mlp.router.weight", ParamGroup::matrix, {experts_, D});
      if (cfg_.moe.balance == "aux_free") add_param(p + "mlp.router.score_bias", ParamGroup::buffer, {experts_});
      add_param(p + "mlp.experts.w_fc", ParamGroup::matrix, {experts_local_, He, D});
      add_param(p + "mlp.experts.w_proj", ParamGroup::matrix, {experts_local_, D, He});
      if (shared) {
        add_param(p + "mlp.shared.c_fc.weight", ParamGroup::matrix, {Hs, D});
        add_param(p + "mlp.shared.c_proj.weight", ParamGroup::matrix, {D, Hs});
      }
    } else {
      add_param(p + "mlp.c_fc.weight", ParamGroup::matrix, {H, D});
      add_param(p + "mlp.c_proj.weight", ParamGroup::matrix, {D, H});
    }
  }
  for (int64_t i = 0; i < m.layers; ++i)
    if (has_value_embedding(i)) add_param("value_embeds." + std::to_string(i) + ".weight", ParamGroup::value_embedding, {V, kvdim});
  if (m.scalar_lambdas) {
    add_param("resid_lambdas", ParamGroup::scalar, {m.layers});
    add_param("x0_lambdas", ParamGroup::scalar, {m.layers});
  }
  add_param("lm_head.weight", ParamGroup::unembedding, {V, D});

}

void GptMoE::allocate_layers(const Widths& w) {
  const ModelConfig& m = cfg_.model;
  const auto windows = cfg_.layer_windows(cfg_.train.seq_len);
  for (int64_t i = 0; i < m.layers; ++i) {
    Layer& l = layers_[size_t(i)];
    l.moe = w.moe_mask[size_t(i)];
    l.window = int(windows[size_t(i)]);
    allocate_attention(l, i, w);
    if (l.moe) allocate_moe(l, i, w);
    else allocate_dense_mlp(l, i, w);
  }
}

void GptMoE::allocate_attention(Layer& l, int64_t i, const Widths& w) {
  const int64_t B = rows_, T = seq_len_, D = w.D, qdim = w.qdim, kvdim = w.kvdim;
  const std::string p = "transformer.h." + std::to_string(i) + ".";
  l.wq = &params_.get(p + "attn.c_q.weight");
  l.wk = &params_.get(p + "attn.c_k.weight");
  l.wv = &params_.get(p + "attn.c_v.weight");
  l.wo = &params_.get(p + "attn.c_proj.weight");
  l.x_in = zeros({n_, D}, act_);
  l.xn1 = zeros({n_, D}, act_);
  l.rstd1 = zeros({n_}, stat_);
  l.q = zeros({B, T, heads_, head_dim_}, act_);
  l.k = zeros({B, T, kv_heads_, head_dim_}, act_);
  l.v = zeros({B, T, kv_heads_, head_dim_}, act_);
  l.qr = zeros({B, T, heads_, head_dim_}, act_);
  l.kr = zeros({B, T, kv_heads_, head_dim_}, act_);
  l.rstd_q = zeros({n_ * heads_}, stat_);
  l.rstd_k = zeros({n_ * kv_heads_}, stat_);
  l.att = zeros({B, T, heads_, head_dim_}, act_);
  l.lse = zeros({B, heads_, T}, stat_);
  if (fp8_.dense) {  // the q, k, v and output projections' inputs, transposed for their weight gradients
    l.xn1_t = lin_.saved_input(n_, D);
    l.att_t = lin_.saved_input(n_, qdim);
  }
  l.x_mid = zeros({n_, D}, act_);
  l.xn2 = zeros({n_, D}, act_);
  l.rstd2 = zeros({n_}, stat_);
  if (cfg_.model.scalar_lambdas) l.x_pre = zeros({n_, D}, act_);
  if (has_value_embedding(i)) {
    l.ve = &params_.get("value_embeds." + std::to_string(i) + ".weight");
    l.ve_gate = &params_.get(p + "attn.ve_gate.weight");
    l.ve_x = zeros({n_, kvdim}, act_);
    l.gate = zeros({n_, kv_heads_}, stat_);
  }
}

void GptMoE::allocate_moe(Layer& l, int64_t i, const Widths& w) {
  const int64_t D = w.D, He = w.He, Hs = w.Hs;
  const std::string p = "transformer.h." + std::to_string(i) + ".";
  l.router = &params_.get(p + "mlp.router.weight");
  if (aux_free_) l.score_bias = &params_.get(p + "mlp.router.score_bias");
  if (global_scope_) {
    l.routed_acc = zeros({experts_}, stat_);
    l.routed_step = zeros({experts_}, DType::i32);
  }
  l.w_fc = &params_.get(p + "mlp.experts.w_fc");
  l.w_proj = &params_.get(p + "mlp.experts.w_proj");
  l.router_logits = zeros({n_, experts_}, stat_);
  l.probs = zeros({n_, experts_}, stat_);
  l.topk = zeros({n_, top_k_}, DType::i32);
  l.gates = zeros({n_, top_k_}, stat_);
  l.routed = zeros({experts_}, DType::i32);
  l.routed_group = zeros({experts_}, DType::i32);
  l.counts = zeros({experts_}, DType::i32);
  l.offsets = zeros({experts_ + 1}, DType::i32);
  l.slot = zeros({n_ * top_k_}, DType::i32);
  l.row_token = zeros({std::max<int64_t>(rows_max_, n_ * top_k_)}, DType::i32);
  if (fp8_.experts) {
    // The backward reads the saved FP8 copies, so the bf16 input lives only through the forward.
    // ReLU² folded into the GEMMs leaves no a = relu²(h) to hold at all.
    if (!expert_x_shared_.data) expert_x_shared_ = zeros({rows_max_, D}, act_);
    l.xp = expert_x_shared_;
    l.xp_saved = lin_.saved_expert_operand(rows_max_, D, int(experts_));
    l.ap_saved = lin_.saved_expert_operand(rows_max_, He, int(experts_));
  } else {
    l.xp = zeros({rows_max_, D}, act_);
    l.ap = zeros({rows_max_, He}, act_);
  }
  l.hp = zeros({rows_max_, He}, act_);
  l.yp = zeros({rows_max_, D}, act_);
  l.bal = zeros({1}, stat_);
  if (expert_group_) {
    // Every rank's rows may come to this rank's experts.
    const int64_t local_rows = rows_max_ * expert_group_->world();
    l.exchange = std::make_unique<ExpertExchange>(*expert_group_, int(experts_));
    l.offsets_local = zeros({experts_local_ + 1}, DType::i32);
    l.xp_local = zeros({local_rows, D}, act_);
    l.hp_local = zeros({local_rows, He}, act_);
    l.ap_local = zeros({local_rows, He}, act_);
    l.yp_local = zeros({local_rows, D}, act_);
  }
  if (w.shared) {
    l.sh_fc = &params_.get(p + "mlp.shared.c_fc.weight");
    l.sh_proj = &params_.get(p + "mlp.shared.c_proj.weight");
    l.h = zeros({n_, Hs}, act_);
    l.a = zeros({n_, Hs}, act_);
  }
}

void GptMoE::allocate_dense_mlp(Layer& l, int64_t i, const Widths& w) {
  const std::string p = "transformer.h." + std::to_string(i) + ".";
  l.fc = &params_.get(p + "mlp.c_fc.weight");
  l.proj = &params_.get(p + "mlp.c_proj.weight");
  l.h = zeros({n_, w.H}, act_);
  l.a = zeros({n_, w.H}, act_);
}

void GptMoE::make_rotary_tables() {
  const ModelConfig& m = cfg_.model;
  const int64_t half = head_dim_ / 2;
  std::vector<float> c(size_t(m.max_seq * half)), s(c.size());
  for (int64_t t = 0; t < m.max_seq; ++t)
    for (int64_t j = 0; j < half; ++j) {
      double inv = std::pow(m.rope_base, -double(2 * j) / double(head_dim_));
      c[size_t(t * half + j)] = float(std::cos(double(t) * inv));
      s[size_t(t * half + j)] = float(std::sin(double(t) * inv));
    }
  cos_ = be_.alloc({m.max_seq, half}, stat_);
  sin_ = be_.alloc({m.max_seq, half}, stat_);
  be_.write(cos_, c);
  be_.write(sin_, s);
}

// The step's own buffers: embeddings, the final norm, the head's chunked logits, the losses, and
// the statistics and FP8 amax slots it fills on the device.
void GptMoE::allocate_step_buffers(const Widths& w) {
  const int64_t D = w.D, V = w.V;
  const auto& moe_mask = w.moe_mask;
  emb_ = zeros({n_, D}, act_);
  rstd0_ = zeros({n_}, stat_);
  x_out_ = zeros({n_, D}, act_);
  xf_ = zeros({n_, D}, act_);
  rstd_f_ = zeros({n_}, stat_);
  // Logits are computed in row chunks of at most ~32M elements, never for the whole batch.
  chunk_rows_ = std::clamp<int64_t>((int64_t(1) << 25) / V, 1, n_);
  // FP8 GEMMs on the GPU need row counts in multiples of 16 (n_ is one, so every chunk is).
  if (fp8_.head && chunk_rows_ >= 16) chunk_rows_ -= chunk_rows_ % 16;
  logits_ = zeros({chunk_rows_, V}, act_);
  losses_ = zeros({n_}, stat_);
  loss_sum_ = zeros({1}, stat_);
  bal_sum_ = zeros({1}, stat_);
  int64_t moe_layers = std::count(moe_mask.begin(), moe_mask.end(), true);
  load_acc_ = zeros({std::max<int64_t>(moe_layers * experts_, 1)}, stat_);
  // FP8 experts with tensor scaling: the experts' operands' amax, raised by their producers.
  if (fp8_.experts && fp8_.producer_amax() && !expert_group_ && moe_layers > 0) {
    expert_amax_ = zeros({moe_layers, 4, experts_}, DType::f32);
    int64_t mi = 0;
    for (Layer& l : layers_)
      if (l.moe) l.expert_amax = expert_amax_.index(mi++);
  }
  // FP8 dense layers and head with tensor scaling: their operands' amax, raised by the norms and
  // the loss that write them.
  const bool tensorwise = fp8_.producer_amax();
  const int64_t dense_slots = fp8_.dense && tensorwise ? int64_t(layers_.size()) * 4 : 0;
  const int64_t head_slots = fp8_.head && tensorwise ? (n_ + chunk_rows_ - 1) / chunk_rows_ : 0;
  if (dense_slots + head_slots > 0) {
    dense_amax_ = zeros({dense_slots + head_slots}, DType::f32);
    for (int64_t i = 0; i < dense_slots; ++i)
      layers_[size_t(i / 4)].dense_amax[size_t(i % 4)].amax = elements(dense_amax_, i, i + 1);
    for (int64_t c = 0; c < head_slots; ++c)
      head_dy_amax_.push_back(AmaxSink{elements(dense_amax_, dense_slots + c, dense_slots + c + 1), {}});
  }
  kept_acc_ = zeros({std::max<int64_t>(moe_layers, 1)}, stat_);
  router_acc_ = zeros({std::max<int64_t>(moe_layers, 1) * 2}, stat_);
  load_step_ = zeros({std::max<int64_t>(moe_layers * experts_, 1)}, stat_);
  tmp1_ = zeros({std::max<int64_t>(experts_, 1)}, stat_);
}

void GptMoE::allocate_backward_scratch(const Widths& w) {
  const int64_t B = rows_, T = seq_len_, D = w.D, H = w.H, He = w.He, Hs = w.Hs;
  const int64_t Hmax = std::max({H, He, Hs});
  dx_ = zeros({n_, D}, act_);
  dxn_ = zeros({n_, D}, act_);
  dxf_ = zeros({n_, D}, act_);
  dtmp_ = zeros({n_, D}, act_);
  datt_ = zeros({B, T, heads_, head_dim_}, act_);
  dq_ = zeros({B, T, heads_, head_dim_}, act_);
  dk_ = zeros({B, T, kv_heads_, head_dim_}, act_);
  dv_ = zeros({B, T, kv_heads_, head_dim_}, act_);
  dqraw_ = zeros({B, T, heads_, head_dim_}, act_);
  dkraw_ = zeros({B, T, kv_heads_, head_dim_}, act_);
  dh_ = zeros({n_ * Hmax}, act_);
  if (cfg_.model.scalar_lambdas) dx0_ = zeros({n_, D}, act_);
  da_ = zeros({n_ * Hmax}, act_);
  if (experts_) {
    dyp_ = zeros({rows_max_, D}, act_);
    dhp_ = zeros({rows_max_, He}, act_);
    dxp_ = zeros({rows_max_, D}, act_);
    if (expert_group_) {
      const int64_t local_rows = rows_max_ * expert_group_->world();
      ep_stage_ = zeros({local_rows * std::max(D, He)}, act_);
      dyp_local_ = zeros({local_rows, D}, act_);
      dap_local_ = zeros({local_rows, He}, act_);
      dhp_local_ = zeros({local_rows, He}, act_);
      dxp_local_ = zeros({local_rows, D}, act_);
    }
    dgates_ = zeros({n_, top_k_}, stat_);
    dlogits_r_ = zeros({n_, experts_}, stat_);
    if (act_ != stat_) dlogits_r_act_ = zeros({n_, experts_}, act_);
  }
}

// The FP8 forms: quantization buffers for every linear the recipe puts in FP8, and the weights
// those linears multiply with their amax slots.
void GptMoE::plan_fp8(const Widths& w) {
  const int64_t D = w.D, V = w.V, qdim = w.qdim, kvdim = w.kvdim, H = w.H, Hs = w.Hs;
  if (fp8_.dense) {
    for (int64_t out : {qdim, kvdim}) lin_.plan(n_, out, D);
    lin_.plan(n_, D, qdim);
    bool dense_mlp = false;
    for (bool moe : w.moe_mask) dense_mlp = dense_mlp || !moe;
    if (dense_mlp) {
      lin_.plan(n_, H, D);
      lin_.plan(n_, D, H);
    }
    if (w.shared) {
      lin_.plan(n_, Hs, D);
      lin_.plan(n_, D, Hs);
    }
  }
  if (fp8_.head) {
    lin_.plan(chunk_rows_, V, D);
    head_xt_ = lin_.saved_input(chunk_rows_, D);  // one chunk's x^T, from its forward to its backward
  }
  // The weights those linears multiply keep their FP8 forms (refreshed with the compute copies).
  // Under tensor scaling the optimizer raises their amax as it writes them (Param::value_amax),
  // one per expert of a stack and one per matrix, so the refresh needs no amax pass.
  int64_t amax_slots = 0;
  const bool forms_amax = fp8_.producer_amax();
  auto amax_groups = [](const Param& p) { return p.value.ndim() == 3 ? p.value.dim(0) : int64_t(1); };
  for (const Param& p : params_.params)
    if (read_in_fp8_only(p) && forms_amax) amax_slots += amax_groups(p);
  if (amax_slots > 0) weights_amax_ = zeros({amax_slots}, DType::f32);
  int64_t slot = 0;
  for (Param& p : params_.params) {
    if (!read_in_fp8_only(p)) continue;
    if (forms_amax) {
      p.value_amax = elements(weights_amax_, slot, slot + amax_groups(p));
      slot += amax_groups(p);
    }
    lin_.add_weight(p.compute, forms_amax ? &p : nullptr);
  }
  lin_.allocate();
}

bool GptMoE::read_in_fp8_only(const Param& p) const {
  const std::string& n = p.name;
  if (n == "lm_head.weight") return fp8_.head;
  if (n.ends_with("mlp.experts.w_fc") || n.ends_with("mlp.experts.w_proj")) return fp8_.experts;
  // Attention's q, k, v and output projections, the dense MLP's and the shared expert's.
  for (const char* dense : {".c_q.weight", ".c_k.weight", ".c_v.weight", ".c_proj.weight", ".c_fc.weight"})
    if (n.ends_with(dense)) return fp8_.dense;
  return false;
}

bool GptMoE::has_value_embedding(int64_t layer) const {
  const int64_t L = cfg_.model.layers;
  return cfg_.model.value_embeddings && layer % 2 == (L - 1) % 2;
}

void GptMoE::add_param(const std::string& name, ParamGroup group, const Shape& shape) {
  Param p;
  p.name = name;
  p.group = group;
  p.value.shape = shape;  // memory comes from place_params()
  params_.params.push_back(std::move(p));
}

void GptMoE::place_params() {
  std::vector<std::vector<Param*>> kinds;  // same (group, shape), in order of first appearance
  for (Param& p : params_.params) {
    auto it = std::find_if(kinds.begin(), kinds.end(), [&](const std::vector<Param*>& k) {
      return k.front()->group == p.group && k.front()->value.shape == p.value.shape;
    });
    if (it == kinds.end()) kinds.push_back({&p});
    else it->push_back(&p);
  }
  const DType master = be_.master_dtype();
  for (const auto& kind : kinds) {
    const int64_t per = kind.front()->value.numel();
    const int64_t total = per * int64_t(kind.size());
    ParamArena a;
    a.value = be_.alloc({total, 1}, master);
    a.grad = be_.alloc({total, 1}, master);
    // Weights that only FP8 products read need no bf16 copy: their FP8 forms come from the master.
    const bool fp8_only =
        std::all_of(kind.begin(), kind.end(), [&](const Param* p) { return read_in_fp8_only(*p); });
    a.compute = act_ == master || fp8_only ? a.value : be_.alloc({total, 1}, act_);
    be_.fill(a.value, 0.0f);
    be_.fill(a.grad, 0.0f);
    a.rank_own = expert_group_ && kind.front()->name.find("mlp.experts.") != std::string::npos;
    for (size_t i = 0; i < kind.size(); ++i) {
      Param& p = *kind[i];
      const Shape shape = p.value.shape;
      const int64_t begin = int64_t(i) * per;
      p.value = a.value.rows_slice(begin, begin + per).view(shape);
      p.grad = a.grad.rows_slice(begin, begin + per).view(shape);
      p.compute = a.compute.rows_slice(begin, begin + per).view(shape);
    }
    arenas_.push_back(a);
  }
}

void GptMoE::init_weights(uint64_t seed, bool all_random) {
  const double s = std::sqrt(3.0) / std::sqrt(double(d_model_)) * cfg_.model.init_scale;
  uint64_t stream = 0;
  for (auto& p : params_.params) {
    if (p.group == ParamGroup::buffer) {  // state, not a weight: zero, and no random stream taken
      be_.fill(p.value, 0.0f);
      continue;
    }
    Rng rng(seed, ++stream);
    // An expert-parallel rank draws the whole stack, as one rank would, and keeps its experts.
    const bool shard = expert_group_ && p.name.find("mlp.experts.") != std::string::npos;
    const int64_t per_expert = shard ? p.value.numel() / experts_local_ : 0;
    std::vector<float> v(size_t(shard ? per_expert * experts_ : p.value.numel()));
    const bool is_proj = p.name.ends_with("c_proj.weight") || p.name.ends_with("w_proj");
    if (p.name == "resid_lambdas" || p.name == "x0_lambdas") {
      // nanochat: 1.0 (plain residual) and 0.1 (a weak skip to x0); spread for gradient checks.
      const double base = p.name == "resid_lambdas" ? 1.0 : 0.1;
      for (auto& x : v) x = float(base + (all_random ? 0.3 * rng.normal() : 0.0));
    } else if (p.group == ParamGroup::value_embedding) {
      for (auto& x : v) x = float((2.0 * rng.uniform() - 1.0) * s);  // like c_v
    } else if (!all_random && (p.name.ends_with("attn.ve_gate.weight") ||
                               (p.name.ends_with("mlp.router.weight") && cfg_.moe.router_init == "zero"))) {
      std::fill(v.begin(), v.end(), 0.0f);  // a neutral gate (2 sigmoid(0) = 1); the seed's zero router
    } else if (p.group == ParamGroup::embedding) {
      for (auto& x : v) x = float(rng.normal() * cfg_.model.init_scale);
    } else if (p.group == ParamGroup::unembedding) {
      double std = all_random ? 0.5 : 0.001;
      for (auto& x : v) x = float(rng.normal() * std * cfg_.model.init_scale);
    } else if (is_proj && !all_random) {
      std::fill(v.begin(), v.end(), 0.0f);  // nanochat zero-inits output projections
    } else {
      // Uniform with the std of N(0, 1/fan_in); fan_in is the last dim of every matrix here.
      double bound = is_proj ? std::sqrt(3.0 / double(p.value.dim(-1))) : s;
      for (auto& x : v) x = float((2.0 * rng.uniform() - 1.0) * bound);
    }
    if (shard)
      v = std::vector<float>(v.begin() + expert_first_ * per_expert, v.begin() + (expert_first_ + experts_local_) * per_expert);
    be_.write(p.value, v);
  }
  refresh_compute_weights();
}

void GptMoE::refresh_compute_weights() {
  for (auto& a : arenas_)
    if (a.compute.data != a.value.data) be_.copy(a.value, a.compute);
  lin_.refresh_weights();
  if (weights_amax_.data) be_.fill(weights_amax_, 0.0f);  // for the next update to raise
}

void GptMoE::begin_step() {
  for (auto& a : arenas_) be_.fill(a.grad, 0.0f);
  be_.fill(loss_sum_, 0.0f);
  be_.fill(bal_sum_, 0.0f);
  be_.fill(load_acc_, 0.0f);
  be_.fill(kept_acc_, 0.0f);
  be_.fill(router_acc_, 0.0f);
  for (Layer& l : layers_)
    if (l.routed_acc.data) be_.fill(l.routed_acc, 0.0f);
}

void GptMoE::end_step() {
  if (experts_ == 0) return;
  be_.copy(load_acc_, load_step_);
  if (group_ && group_->world() > 1) group_->all_reduce_sum(load_step_);
  if (!aux_free_) return;
  int64_t mi = 0;
  for (Layer& l : layers_) {
    if (!l.moe) continue;
    be_.router_bias_update(elements(load_step_, mi * experts_, (mi + 1) * experts_), float(cfg_.moe.bias_update_rate),
                           l.score_bias->value);
    ++mi;
  }
}

void GptMoE::dense_forward(Param& fc, Param& proj, const Tensor& xn, Tensor& h, Tensor& a, Tensor& out,
                           bool accumulate) {
  lin_.forward(fp8_.dense, xn, fc.compute, h);
  be_.relu2_fwd(h, a);
  lin_.forward(fp8_.dense, a, proj.compute, out, accumulate ? 1.0f : 0.0f);
}

void GptMoE::mlp_forward(Layer& l, const Tensor& xn, Tensor& out) {
  if (!l.moe) {
    dense_forward(*l.fc, *l.proj, xn, l.h, l.a, out, true);
    return;
  }
  be_.matmul(xn, false, l.router->compute, true, l.router_logits);
  be_.router_topk(l.router_logits, router_spec_, l.score_bias ? &l.score_bias->value : nullptr, l.probs, l.topk,
                  l.gates);
  be_.moe_plan(l.topk, int(experts_), int(capacity_), l.routed, l.counts, l.offsets, l.slot, l.row_token,
               drop_order_);
  if (group_routing_) {  // the group's routing: f_e over every rank's assignments
    be_.copy(l.routed, l.routed_group);
    group_->all_reduce_sum(l.routed_group);
  }
  if (global_scope_) {
    // The step's counts so far, this micro-batch included: a micro-batch's backward runs before
    // the later ones exist (Megatron-Core's global aux loss reads its running counts the same way).
    be_.copy(group_routing_ ? l.routed_group : l.routed, tmp1_);
    be_.axpby(1.0f, tmp1_, 1.0f, l.routed_acc);
    be_.copy(l.routed_acc, l.routed_step);
  }
  if (balance_loss_on_) {
    BalanceSpec bs = balance_spec_;
    bs.coef = bal_log_coef_;
    be_.balance_loss(l.probs, l.topk, routed_for_balance(l), bs, l.bal);
  }
  // With FP8 experts under tensor scaling, each producer of an expert GEMM's operand (the
  // permute, ReLU², the combine's backward, ReLU²'s backward) raises its experts' amax.
  const bool amax = l.expert_amax.data != nullptr;
  auto amax_of = [&](int which) { return AmaxSink{l.expert_amax.index(which), l.offsets}; };
  const AmaxSink xp_amax = amax ? amax_of(0) : AmaxSink{}, ap_amax = amax ? amax_of(1) : AmaxSink{};
  be_.moe_permute(xn, l.row_token, l.offsets, l.xp, amax ? &xp_amax : nullptr);
  if (l.exchange) {  // this rank's experts over every rank's rows for them, then back
    ExpertExchange& ex = *l.exchange;
    ex.plan(be_.read_i32(l.offsets));
    be_.write_i32(l.offsets_local, ex.local_offsets());
    ex.dispatch(l.xp, l.xp_local, ep_stage_);
    const int64_t R = ex.received_rows();
    lin_.expert_forward(false, l.xp_local, l.w_fc->compute, l.hp_local, l.offsets_local, l.xp_saved);
    Tensor h = l.hp_local.rows_slice(0, R), a = l.ap_local.rows_slice(0, R);
    be_.relu2_fwd(h, a);
    lin_.expert_forward(false, l.ap_local, l.w_proj->compute, l.yp_local, l.offsets_local, l.ap_saved);
    ex.gather(l.yp_local, l.yp, ep_stage_);
  } else if (!fp8_.experts) {
    // ReLU² inside the BF16 GEMMs: the up projection stores h and a = relu²(h) from one tile.
    ExpertRelu2Fold up;
    up.relu2_output = &l.ap;
    lin_.expert_forward(false, l.xp, l.w_fc->compute, l.hp, l.offsets, l.xp_saved, nullptr, up);
    lin_.expert_forward(false, l.ap, l.w_proj->compute, l.yp, l.offsets, l.ap_saved);
  } else {
    // ReLU² inside the FP8 GEMMs: the up projection raises relu²(h)'s amax as it writes h, and
    // the down projection quantizes relu²(h) as it reads h.
    ExpertRelu2Fold up, down;
    up.relu2_amax = amax ? &ap_amax.amax : nullptr;
    down.relu2_operand = true;
    lin_.expert_forward(true, l.xp, l.w_fc->compute, l.hp, l.offsets, l.xp_saved, amax ? &xp_amax.amax : nullptr, up);
    lin_.expert_forward(true, l.hp, l.w_proj->compute, l.yp, l.offsets, l.ap_saved, amax ? &ap_amax.amax : nullptr,
                        down);
  }
  be_.moe_combine(l.yp, l.slot, l.gates, out, true);
  if (l.sh_fc) dense_forward(*l.sh_fc, *l.sh_proj, xn, l.h, l.a, out, true);
}

void GptMoE::forward(const Tensor& tokens) {
  const bool lambdas = resid_lambdas_ != nullptr;
  if (expert_amax_.data) be_.fill(expert_amax_, 0.0f);  // raised again by this micro-batch's producers
  if (dense_amax_.data) be_.fill(dense_amax_, 0.0f);
  be_.embedding_fwd(tokens, wte_->compute, emb_);
  // With the lambdas, each block's input is a mix of the stream (x_pre) and x0 (layer 0's x_pre).
  be_.rmsnorm_fwd(emb_, lambdas ? layers_[0].x_pre : layers_[0].x_in, rstd0_);
  int64_t moe_index = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = layers_[i];
    Tensor& next = i + 1 < layers_.size() ? (lambdas ? layers_[i + 1].x_pre : layers_[i + 1].x_in) : x_out_;
    if (lambdas)
      be_.lambda_mix_fwd(elements(resid_lambdas_->value, int64_t(i), int64_t(i) + 1), l.x_pre,
                         elements(x0_lambdas_->value, int64_t(i), int64_t(i) + 1), layers_[0].x_pre, l.x_in);
    const AmaxSink& xn1_amax = l.dense_amax[Layer::xn1_amax];
    be_.rmsnorm_fwd(l.x_in, l.xn1, l.rstd1, sink(xn1_amax));
    Tensor q = tokens_by_features(l.q), k = tokens_by_features(l.k), v = tokens_by_features(l.v);
    lin_.forward(fp8_.dense, l.xn1, l.wq->compute, q, 0.0f, LinearGemms::none, fp8_.dense ? &l.xn1_t : nullptr,
                 recorded(xn1_amax));
    lin_.forward(fp8_.dense, l.xn1, l.wk->compute, k, 0.0f, LinearGemms::same_x);
    lin_.forward(fp8_.dense, l.xn1, l.wv->compute, v, 0.0f, LinearGemms::same_x);
    if (l.ve) {
      be_.embedding_fwd(tokens, l.ve->compute, l.ve_x);
      be_.value_gate_fwd(l.xn1, l.ve_gate->compute, l.ve_x, v, l.gate);
    }
    be_.rope_norm_fwd(l.q, cos_, sin_, l.qr, l.rstd_q);
    be_.rope_norm_fwd(l.k, cos_, sin_, l.kr, l.rstd_k);
    be_.attention_fwd(l.qr, l.kr, l.v, l.att, l.lse, l.window);
    be_.copy(l.x_in, l.x_mid);
    lin_.forward(fp8_.dense, tokens_by_features(l.att), l.wo->compute, l.x_mid, 1.0f, LinearGemms::none,
                 fp8_.dense ? &l.att_t : nullptr);
    be_.rmsnorm_fwd(l.x_mid, l.xn2, l.rstd2);
    be_.copy(l.x_mid, next);
    mlp_forward(l, l.xn2, next);
    if (l.moe) {
      // Step statistics stay on the device: balance loss, routed load and kept assignments.
      be_.sum(l.bal, bal_sum_, true);
      Tensor load = elements(load_acc_, moe_index * experts_, (moe_index + 1) * experts_);
      be_.copy(l.routed, tmp1_);
      be_.axpby(1.0f, tmp1_, 1.0f, load);
      Tensor kept = elements(tmp1_, 0, 1);
      be_.copy(elements(l.offsets, experts_, experts_ + 1), kept);
      Tensor kept_acc = elements(kept_acc_, moe_index, moe_index + 1);
      be_.axpby(1.0f, kept, 1.0f, kept_acc);
      Tensor router_acc = elements(router_acc_, moe_index * 2, moe_index * 2 + 2);
      be_.router_stats(l.router_logits, l.probs, router_spec_.score, router_acc);
      ++moe_index;
    }
  }
  be_.rmsnorm_fwd(x_out_, xf_, rstd_f_);
}

void GptMoE::head_loss(const Tensor& targets, float loss_scale, bool backward) {
  const Tensor tgt = targets.view({n_, 1});
  const Tensor losses = losses_.view({n_, 1});
  for (int64_t r0 = 0; r0 < n_; r0 += chunk_rows_) {
    int64_t r1 = std::min(n_, r0 + chunk_rows_);
    const AmaxSink* dy_amax = head_dy_amax_.empty() ? nullptr : &head_dy_amax_[size_t(r0 / chunk_rows_)];
    Tensor x = xf_.rows_slice(r0, r1);
    Tensor logits = logits_.rows_slice(0, r1 - r0);
    Tensor loss_rows = losses.rows_slice(r0, r1).view({r1 - r0});
    lin_.forward(fp8_.head, x, head_->compute, logits, 0.0f, LinearGemms::none, fp8_.head ? &head_xt_ : nullptr);
    be_.softcap_xent(logits, tgt.rows_slice(r0, r1).view({r1 - r0}), float(cfg_.model.softcap), loss_scale,
                     loss_rows, logits, dy_amax);
    if (backward) {
      Tensor dx = dxf_.rows_slice(r0, r1);
      lin_.backward(fp8_.head, logits, head_->compute, x, dx, head_->grad, 0.0f, LinearGemms::none,
                    fp8_.head ? &head_xt_ : nullptr, dy_amax ? &dy_amax->amax : nullptr);
    }
  }
}

void GptMoE::dense_backward(Param& fc, Param& proj, const Tensor& xn, const Tensor& h, const Tensor& a,
                            const Tensor& dy, Tensor& dxn, bool accumulate) {
  Tensor da = da_.prefix(h.shape), dh = dh_.prefix(h.shape);
  lin_.backward(fp8_.dense, dy, proj.compute, a, da, proj.grad);
  be_.relu2_bwd(h, da, dh);
  lin_.backward(fp8_.dense, dh, fc.compute, xn, dxn, fc.grad, accumulate ? 1.0f : 0.0f);
}

void GptMoE::mlp_backward(Layer& l, const Tensor& dy, Tensor& dxn) {
  if (!l.moe) {
    dense_backward(*l.fc, *l.proj, l.xn2, l.h, l.a, dy, dxn, false);
    return;
  }
  const bool amax = l.expert_amax.data != nullptr;  // as in mlp_forward
  auto amax_of = [&](int which) { return AmaxSink{l.expert_amax.index(which), l.offsets}; };
  const AmaxSink dyp_amax = amax ? amax_of(2) : AmaxSink{}, dhp_amax = amax ? amax_of(3) : AmaxSink{};
  be_.moe_combine_bwd(dy, l.yp, l.slot, l.gates, dyp_, dgates_, amax ? &dyp_amax : nullptr);
  if (l.exchange) {  // the rows' gradients to the experts' ranks, the inputs' gradients back
    ExpertExchange& ex = *l.exchange;
    const int64_t R = ex.received_rows();
    ex.dispatch(dyp_, dyp_local_, ep_stage_);
    lin_.expert_backward(false, dyp_local_, l.w_proj->compute, l.ap_local, l.ap_saved, dap_local_, l.w_proj->grad,
                         l.offsets_local);
    Tensor h = l.hp_local.rows_slice(0, R), da = dap_local_.rows_slice(0, R), dh = dhp_local_.rows_slice(0, R);
    be_.relu2_bwd(h, da, dh);
    lin_.expert_backward(false, dhp_local_, l.w_fc->compute, l.xp_local, l.xp_saved, dxp_local_, l.w_fc->grad,
                         l.offsets_local);
    ex.gather(dxp_local_, dxp_, ep_stage_);
  } else {  // the down projection's data gradient is written as dh (ReLU²'s backward folded in)
    ExpertRelu2Fold fold;
    fold.relu2_input = &l.hp;
    fold.dx_amax = amax ? &dhp_amax.amax : nullptr;
    lin_.expert_backward(fp8_.experts, dyp_, l.w_proj->compute, l.ap, l.ap_saved, dhp_, l.w_proj->grad, l.offsets,
                         amax ? &dyp_amax.amax : nullptr, fold);
    lin_.expert_backward(fp8_.experts, dhp_, l.w_fc->compute, l.xp, l.xp_saved, dxp_, l.w_fc->grad, l.offsets,
                         amax ? &dhp_amax.amax : nullptr);
  }
  be_.fill(dxn, 0.0f);
  be_.moe_permute_bwd(dxp_, l.slot, dxn);
  // With the group's routing f_e is the group's; bal_scale_ already carries 1 / world (P_e is a
  // mean over the group's tokens), as it does for the mean of the ranks' own balance losses.
  BalanceSpec bs = balance_spec_;
  bs.coef = bal_loss_coef_;
  bs.grad_scale = bal_scale_;
  be_.router_bwd(l.router_logits, l.probs, l.topk, l.gates, dgates_, routed_for_balance(l), router_spec_, bs,
                 dlogits_r_);
  Tensor dl = dlogits_r_;
  if (act_ != stat_) {
    be_.copy(dlogits_r_, dlogits_r_act_);
    dl = dlogits_r_act_;
  }
  be_.matmul(dl, false, l.router->compute, false, dxn, 1.0f, 1.0f);
  be_.matmul(dl, true, l.xn2, false, l.router->grad, 1.0f, 1.0f);
  if (l.sh_fc) dense_backward(*l.sh_fc, *l.sh_proj, l.xn2, l.h, l.a, dy, dxn, true);
}

void GptMoE::attention_backward(Layer& l, const Tensor& dy, Tensor& dxn) {
  Tensor datt = tokens_by_features(datt_);
  const LinearGemms::SavedInput* att_t = fp8_.dense ? &l.att_t : nullptr;
  const LinearGemms::SavedInput* xn1_t = fp8_.dense ? &l.xn1_t : nullptr;
  // dy's amax: raised by the RMSNorm backward that wrote it (forward_backward).
  lin_.backward(fp8_.dense, dy, l.wo->compute, tokens_by_features(l.att), datt, l.wo->grad, 0.0f, LinearGemms::none,
                att_t, recorded(l.dense_amax[Layer::proj_dy_amax]));
  be_.attention_bwd(l.qr, l.kr, l.v, l.att, l.lse, datt_, dq_, dk_, dv_, l.window);
  const AmaxSink& dq_amax = l.dense_amax[Layer::dq_amax];
  const AmaxSink& dk_amax = l.dense_amax[Layer::dk_amax];
  be_.rope_norm_bwd(l.q, cos_, sin_, l.rstd_q, dq_, dqraw_, sink(dq_amax));
  be_.rope_norm_bwd(l.k, cos_, sin_, l.rstd_k, dk_, dkraw_, sink(dk_amax));
  lin_.backward(fp8_.dense, tokens_by_features(dqraw_), l.wq->compute, l.xn1, dxn, l.wq->grad, 0.0f, LinearGemms::none,
                xn1_t, recorded(dq_amax));
  lin_.backward(fp8_.dense, tokens_by_features(dkraw_), l.wk->compute, l.xn1, dxn, l.wk->grad, 1.0f, LinearGemms::none,
                xn1_t, recorded(dk_amax));
  lin_.backward(fp8_.dense, tokens_by_features(dv_), l.wv->compute, l.xn1, dxn, l.wv->grad, 1.0f, LinearGemms::none,
                xn1_t);
}

void GptMoE::set_group(Communicator* group) { group_ = group; }

void GptMoE::forward_backward(const Tensor& tokens, const Tensor& targets, float loss_scale, float bal_scale) {
  bal_scale_ = bal_scale;
  // Evaluation forwards keep their routing local: the ranks need not evaluate in step.
  group_routing_ = group_ != nullptr && group_->world() > 1 && experts_ > 0;
  forward(tokens);
  head_loss(targets, loss_scale, true);
  be_.sum(losses_, loss_sum_, true);
  const bool lambdas = resid_lambdas_ != nullptr;
  be_.rmsnorm_bwd(x_out_, rstd_f_, dxf_, dx_, false);
  if (lambdas) be_.fill(dx0_, 0.0f);
  for (size_t i = layers_.size(); i-- > 0;) {
    Layer& l = layers_[i];
    mlp_backward(l, dx_, dxn_);
    be_.rmsnorm_bwd(l.x_mid, l.rstd2, dxn_, dx_, true, sink(l.dense_amax[Layer::proj_dy_amax]));
    attention_backward(l, dx_, dxn_);
    if (l.ve) {
      // dv_ is the gradient w.r.t. v after the gated add; dkraw_ is free again as scratch for dve.
      Tensor dve = tokens_by_features(dkraw_);
      be_.value_gate_bwd(l.xn1, l.ve_gate->compute, l.ve_x, l.gate, tokens_by_features(dv_), dve, l.ve_gate->grad,
                         dxn_);
      be_.embedding_bwd(tokens, dve, l.ve->grad);
    }
    be_.rmsnorm_bwd(l.x_in, l.rstd1, dxn_, dx_, true);
    if (lambdas) {
      Tensor dres = elements(resid_lambdas_->grad, int64_t(i), int64_t(i) + 1);
      Tensor dx0l = elements(x0_lambdas_->grad, int64_t(i), int64_t(i) + 1);
      be_.lambda_mix_bwd(elements(resid_lambdas_->value, int64_t(i), int64_t(i) + 1), l.x_pre,
                         elements(x0_lambdas_->value, int64_t(i), int64_t(i) + 1), layers_[0].x_pre, dx_, dx_, dx0_,
                         dres, dx0l);
    }
  }
  if (lambdas) be_.axpby(1.0f, dx0_, 1.0f, dx_);  // x0 is layer 0's x_pre: both paths meet here
  be_.rmsnorm_bwd(emb_, rstd0_, dx_, dtmp_, false);
  be_.embedding_bwd(tokens, dtmp_, wte_->grad);
  group_routing_ = false;
}

void GptMoE::forward_eval(const Tensor& tokens, const Tensor& targets) {
  forward(tokens);
  head_loss(targets, 0.0f, false);
}

StepStats GptMoE::read_stats(int64_t micro_batches) {
  StepStats s;
  s.loss_sum = read_scalar(be_, loss_sum_);
  s.bal = read_scalar(be_, bal_sum_) / double(std::max<int64_t>(micro_batches, 1));
  s.bal_term = bal_log_coef_ != 0 ? s.bal * double(bal_loss_coef_) / double(bal_log_coef_) : 0.0;
  if (experts_ == 0) return s;
  auto load = be_.read(load_acc_);
  auto kept = be_.read(kept_acc_);
  double routed_total = 0, kept_total = 0;
  size_t moe_layers = kept.size();
  for (size_t li = 0; li < moe_layers; ++li) {
    std::vector<double> frac(static_cast<size_t>(experts_), 0.0);
    double sum = 0;
    for (int64_t e = 0; e < experts_; ++e) sum += load[li * size_t(experts_) + size_t(e)];
    for (int64_t e = 0; e < experts_; ++e) frac[size_t(e)] = sum > 0 ? load[li * size_t(experts_) + size_t(e)] / sum : 0;
    s.expert_load.push_back(std::move(frac));
    routed_total += sum;
    kept_total += kept[li];
  }
  s.drop_rate = routed_total > 0 ? 1.0 - kept_total / routed_total : 0.0;
  // Routing statistics: MaxVio from the group's loads (end_step), the entropy and z means over
  // this rank's tokens of the step, the bias spread after the step's update.
  const auto load_step = read_values(be_, load_step_);
  const auto router = read_values(be_, router_acc_);
  const double tokens = double(std::max<int64_t>(micro_batches, 1) * n_);
  double z_sum = 0;
  for (size_t li = 0; li < moe_layers; ++li) {
    double sum = 0, top = 0;
    for (int64_t e = 0; e < experts_; ++e) {
      const double v = load_step[li * size_t(experts_) + size_t(e)];
      sum += v;
      top = std::max(top, v);
    }
    s.max_vio.push_back(sum > 0 ? top / (sum / double(experts_)) - 1.0 : 0.0);
    s.router_entropy.push_back(router[2 * li] / tokens);
    z_sum += router[2 * li + 1] / tokens;
  }
  s.z_loss = moe_layers > 0 ? z_sum / double(moe_layers) : 0.0;
  if (aux_free_)
    for (Layer& l : layers_) {
      if (!l.moe) continue;
      const auto b = read_values(be_, l.score_bias->value);
      const auto [lo, hi] = std::minmax_element(b.begin(), b.end());
      s.bias_range.push_back(b.empty() ? 0.0 : double(*hi) - double(*lo));
    }
  return s;
}

int64_t GptMoE::active_matmul_params() const {
  int64_t n = 0;
  for (auto& p : params_.params) {
    if (p.group == ParamGroup::embedding || p.group == ParamGroup::value_embedding || p.group == ParamGroup::scalar ||
        p.group == ParamGroup::buffer)
      continue;  // lookups and scalars, not matmuls
    int64_t count = p.value.numel();
    if (p.value.ndim() == 3) count = count / p.value.dim(0) * top_k_;  // only k experts per token
    n += count;
  }
  return n;
}

double GptMoE::flops_per_token() const {
  double span = 0;
  for (const Layer& l : layers_) span += double(l.window > 0 ? std::min<int64_t>(l.window, seq_len_) : seq_len_);
  return 6.0 * double(active_matmul_params()) + 12.0 * double(heads_ * head_dim_) * span;
}

GptMoE::KvCache GptMoE::make_kv_cache(int64_t capacity) {
  if (rows_ != 1) throw Error("decoding needs a model planned for one row (rows = 1), not " + std::to_string(rows_));
  if (lin_.fp8_enabled())
    throw Error("decoding runs without FP8: build the model with precision = \"auto\" (bf16 on a GPU, f32 on the CPU)");
  if (expert_group_) throw Error("decoding does not run expert parallel: build the model on one rank");
  if (capacity < 1 || capacity > cfg_.model.max_seq)
    throw Error("a KV cache of " + std::to_string(capacity) + " positions: give 1 .. model.max_seq = " +
                std::to_string(cfg_.model.max_seq) + " (the rotary table ends there)");
  KvCache c;
  c.capacity = capacity;
  for (size_t i = 0; i < layers_.size(); ++i) {
    c.k.push_back(be_.alloc({1, capacity, kv_heads_, head_dim_}, act_));
    c.v.push_back(be_.alloc({1, capacity, kv_heads_, head_dim_}, act_));
  }
  // Decoding routes every token (dropless): the expert buffers must hold all of them.
  if (experts_ > 0 && rows_max_ < n_ * top_k_)
    throw Error("decoding routes every token to its top-k experts: build the model with moe.dispatch = \"dropless\"");
  if (!decode_tokens_.data) decode_tokens_ = be_.alloc({n_}, DType::i32);
  return c;
}

void GptMoE::mlp_decode(Layer& l, const Tensor& xn, Tensor& out, int64_t T) {
  if (!l.moe) {
    Tensor h = l.h.rows_slice(0, T), a = l.a.rows_slice(0, T);
    dense_forward(*l.fc, *l.proj, xn, h, a, out, true);
    return;
  }
  const int64_t E = experts_, k = top_k_;
  Tensor logits = l.router_logits.rows_slice(0, T), probs = l.probs.rows_slice(0, T);
  Tensor topk = l.topk.rows_slice(0, T), gates = l.gates.rows_slice(0, T);
  Tensor slot = l.slot.prefix({T * k}), row_token = l.row_token.prefix({T * k});
  Tensor xp = l.xp.rows_slice(0, T * k), hp = l.hp.rows_slice(0, T * k), yp = l.yp.rows_slice(0, T * k);
  Tensor ap = l.ap.rows_slice(0, T * k);
  be_.matmul(xn, false, l.router->compute, true, logits);
  be_.router_topk(logits, router_spec_, l.score_bias ? &l.score_bias->value : nullptr, probs, topk, gates);
  be_.moe_plan(topk, int(E), /*capacity=*/0, l.routed, l.counts, l.offsets, slot, row_token, drop_order_);
  be_.moe_permute(xn, row_token, l.offsets, xp);
  be_.grouped_matmul(xp, l.w_fc->compute, true, hp, l.offsets);
  be_.relu2_fwd(hp, ap);
  be_.grouped_matmul(ap, l.w_proj->compute, true, yp, l.offsets);
  be_.moe_combine(yp, slot, gates, out, true);
  if (l.sh_fc) {
    Tensor h = l.h.rows_slice(0, T), a = l.a.rows_slice(0, T);
    dense_forward(*l.sh_fc, *l.sh_proj, xn, h, a, out, true);
  }
}

std::vector<double> GptMoE::forward_decode(const std::vector<int32_t>& tokens, KvCache& cache) {
  const int64_t T = int64_t(tokens.size()), pos = cache.length, S = pos + T;
  if (!decode_tokens_.data || cache.k.size() != layers_.size())
    throw Error("forward_decode: make the cache with this model's make_kv_cache");
  if (T < 1 || T > n_)
    throw Error("forward_decode: " + std::to_string(T) + " tokens at once; give 1 .. " + std::to_string(n_) +
                " (the seq_len the model was planned for)");
  if (S > cache.capacity)
    throw Error("forward_decode: position " + std::to_string(S - 1) + " is past the cache's " +
                std::to_string(cache.capacity) + " positions (model.max_seq = " + std::to_string(cfg_.model.max_seq) + ")");
  const bool lambdas = resid_lambdas_ != nullptr;
  auto rows = [&](const Tensor& t) { return t.rows_slice(0, T); };   // the first T tokens' rows of a [n_, ...] buffer
  auto heads4 = [&](const Tensor& t, int64_t h) { return t.prefix({1, T, h, head_dim_}); };
  // This call's positions [pos, S) of a layer's cache, and its first S positions.
  auto cache_new = [&](const Tensor& c) {
    return c.view({cache.capacity, kv_heads_ * head_dim_}).rows_slice(pos, S).view({1, T, kv_heads_, head_dim_});
  };
  auto cache_upto = [&](const Tensor& c) {
    return c.view({cache.capacity, kv_heads_ * head_dim_}).rows_slice(0, S).view({1, S, kv_heads_, head_dim_});
  };
  // Rotary tables from position pos on: the op's row t is then position pos + t.
  const Tensor cos = cos_.rows_slice(pos, cfg_.model.max_seq), sin = sin_.rows_slice(pos, cfg_.model.max_seq);

  Tensor tok = decode_tokens_.prefix({T});
  be_.write_i32(tok, tokens);
  Tensor emb = rows(emb_);
  be_.embedding_fwd(tok, wte_->compute, emb);
  Tensor x0 = rows(lambdas ? layers_[0].x_pre : layers_[0].x_in);
  Tensor rstd0 = rstd0_.prefix({T});
  be_.rmsnorm_fwd(emb, x0, rstd0);
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = layers_[i];
    Tensor next = rows(i + 1 < layers_.size() ? (lambdas ? layers_[i + 1].x_pre : layers_[i + 1].x_in) : x_out_);
    Tensor x_in = rows(l.x_in), xn1 = rows(l.xn1);
    if (lambdas)
      be_.lambda_mix_fwd(elements(resid_lambdas_->value, int64_t(i), int64_t(i) + 1), rows(l.x_pre),
                         elements(x0_lambdas_->value, int64_t(i), int64_t(i) + 1), x0, x_in);
    Tensor rstd1 = l.rstd1.prefix({T}), rstd2 = l.rstd2.prefix({T});
    Tensor rstd_q = l.rstd_q.prefix({T * heads_}), rstd_k = l.rstd_k.prefix({T * kv_heads_});
    be_.rmsnorm_fwd(x_in, xn1, rstd1);
    Tensor q = heads4(l.q, heads_), k = heads4(l.k, kv_heads_), v = heads4(l.v, kv_heads_);
    Tensor q2 = tokens_by_features(q), k2 = tokens_by_features(k), v2 = tokens_by_features(v);
    be_.matmul(xn1, false, l.wq->compute, true, q2);
    be_.matmul(xn1, false, l.wk->compute, true, k2);
    be_.matmul(xn1, false, l.wv->compute, true, v2);
    if (l.ve) {
      Tensor ve_x = rows(l.ve_x);
      be_.embedding_fwd(tok, l.ve->compute, ve_x);
      Tensor gate = l.gate.prefix({T, kv_heads_});
      be_.value_gate_fwd(xn1, l.ve_gate->compute, ve_x, v2, gate);
    }
    Tensor qr = heads4(l.qr, heads_), k_new = cache_new(cache.k[i]), v_new = cache_new(cache.v[i]);
    be_.rope_norm_fwd(q, cos, sin, qr, rstd_q);
    be_.rope_norm_fwd(k, cos, sin, k_new, rstd_k);
    be_.copy(v, v_new);
    Tensor att = heads4(l.att, heads_);
    be_.attention_cached_fwd(qr, cache_upto(cache.k[i]), cache_upto(cache.v[i]), att, l.window);
    Tensor x_mid = rows(l.x_mid), xn2 = rows(l.xn2);
    be_.copy(x_in, x_mid);
    be_.matmul(tokens_by_features(att), false, l.wo->compute, true, x_mid, 1.0f, 1.0f);
    be_.rmsnorm_fwd(x_mid, xn2, rstd2);
    be_.copy(x_mid, next);
    mlp_decode(l, xn2, next, T);
  }
  Tensor xf_last = xf_.rows_slice(T - 1, T);
  Tensor rstd_f = rstd_f_.prefix({1});
  be_.rmsnorm_fwd(x_out_.rows_slice(T - 1, T), xf_last, rstd_f);
  Tensor logits = logits_.rows_slice(0, 1);
  be_.matmul(xf_last, false, head_->compute, true, logits);
  std::vector<double> z;
  if (logits.device == Device::cpu && logits.dtype == DType::f64) {  // f64 read in full precision
    z.assign(logits.as<double>(), logits.as<double>() + logits.numel());
  } else {
    const std::vector<float> f = be_.read(logits);
    z.assign(f.begin(), f.end());
  }
  const double cap = cfg_.model.softcap;  // as softcap_xent: cap * tanh(logits / cap)
  for (double& x : z) x = cap * std::tanh(x / cap);
  cache.length = S;
  return z;
}

}  // namespace moelab
