// MoE routing on the device: scores (softmax or sigmoid) + top-k (biased choice, group-limited)
// + normalized or raw gates, the dispatch plan (per-expert
// counts, offsets, each assignment's slot, each permuted row's token), the Switch balance loss
// and the router backward. The plan ranks assignments within their expert in (choice rank, token)
// order by warp match + prefix sums over chunks, so the capacity rule drops exactly the
// assignments the CPU reference drops, and nothing is read back. Also the balance loss per
// sequence, the router statistics (entropy, z) and the aux-loss-free bias update.
#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 16;

// What the kernels need of a RouterSpec.
struct RouterArgs {
  bool sigmoid = false, norm_topk = true;
  float route_scale = 1.f;
  int k = 1, groups = 1, topk_groups = 1;
};

RouterArgs router_args(const RouterSpec& spec) {
  RouterArgs a;
  a.sigmoid = spec.score == RouterScore::sigmoid;
  a.norm_topk = spec.norm_topk;
  a.route_scale = spec.route_scale;
  a.k = spec.k;
  a.groups = spec.groups;
  a.topk_groups = spec.topk_groups;
  return a;
}

// One thread per token: E is small (8..256), so a serial scan per token is cheap. The choice
// reads the scores plus the bias (if any); the gates read the scores alone.
__global__ void router_topk_kernel(const float* logits, const float* bias, int T, int E, RouterArgs ra, float* probs,
                                   int32_t* topk_idx, float* gates) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int k = ra.k;
  const float* l = logits + int64_t(t) * E;
  float* p = probs + int64_t(t) * E;
  if (!ra.sigmoid) {
    float m = -INFINITY;
    for (int e = 0; e < E; ++e) m = fmaxf(m, l[e]);
    float s = 0.f;
    for (int e = 0; e < E; ++e) s += expf(l[e] - m);
    for (int e = 0; e < E; ++e) p[e] = expf(l[e] - m) / s;
  } else {
    for (int e = 0; e < E; ++e) p[e] = 1.f / (1.f + expf(-l[e]));
  }
  auto choice = [&](int e) { return bias ? p[e] + bias[e] : p[e]; };
  // Group-limited routing: bit g of kept marks a kept group (groups <= experts <= 256).
  unsigned kept[kMaxExperts / 32];
  const int per_group = E / ra.groups;
  if (ra.groups > 1) {
    for (int w = 0; w < kMaxExperts / 32; ++w) kept[w] = 0u;
    for (int q = 0; q < ra.topk_groups; ++q) {
      int best = -1;
      float bs = -INFINITY;
      for (int g = 0; g < ra.groups; ++g) {
        if (kept[g >> 5] >> (g & 31) & 1u) continue;
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
          const float c = choice(e);
          if (c > b1) {
            b2 = b1;
            b1 = c;
          } else if (c > b2) {
            b2 = c;
          }
        }
        const float score = per_group >= 2 ? b1 + b2 : b1;
        if (best < 0 || score > bs) {  // strict: ties keep the lower group
          bs = score;
          best = g;
        }
      }
      kept[best >> 5] |= 1u << (best & 31);
    }
  }
  int chosen[kMaxTopK];
  float gsum = 0.f;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float bp = -INFINITY;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= chosen[q] == e;
      if (ra.groups > 1) taken |= !(kept[(e / per_group) >> 5] >> ((e / per_group) & 31) & 1u);
      const float c = choice(e);
      if (!taken && (best < 0 || c > bp)) {  // strict: ties keep the lower index
        bp = c;
        best = e;
      }
    }
    chosen[j] = best;
    gsum += p[best];
  }
  for (int j = 0; j < k; ++j) {
    topk_idx[int64_t(t) * k + j] = chosen[j];
    const float s = p[chosen[j]];
    gates[int64_t(t) * k + j] = (ra.norm_topk ? s / gsum : s) * ra.route_scale;
  }
}

// The plan ranks each assignment within its expert in assignment order ((choice rank, token), or
// (token, choice rank) when token-major), so the capacity rule drops exactly what the CPU
// reference drops. Assignments are cut into chunks of kPlanChunk, one block each, in three
// kernels: per-chunk expert counts; one block scanning them over the chunks (each chunk's base
// rank per expert) and laying out counts and offsets; per-chunk slots from the base plus the
// rank inside the chunk. (One block walking every chunk was 130 us at 65,536 assignments.)
constexpr int kPlanChunk = 1024;  // assignments per block, one per thread

struct Assignment {
  int index = -1;   // into topk_idx and slot: t * k + j
  int token = 0;
  int expert = -1;  // -1: past the last assignment
  int rank = 0;     // among this chunk's assignments to the same expert, in order
};

// This thread's assignment of chunk blockIdx.x and its rank inside the chunk; chunk_total[e]
// (shared) receives the chunk's count per expert. warp_counts is [32][E] shared scratch.
__device__ Assignment rank_in_chunk(const int32_t* topk_idx, int T, int k, int E, bool token_major,
                                    int32_t* warp_counts, int32_t* chunk_total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Assignment as;
  const int a = blockIdx.x * kPlanChunk + threadIdx.x, n = T * k;
  if (a < n) {
    int j = a / T, t = a - j * T;
    if (token_major) {
      t = a / k;
      j = a - t * k;
    }
    as.token = t;
    as.index = t * k + j;
    as.expert = topk_idx[as.index];
  }
  for (int q = threadIdx.x; q < 32 * E; q += blockDim.x) warp_counts[q] = 0;
  __syncthreads();
  const unsigned same = __match_any_sync(0xffffffffu, as.expert);
  const int lane_rank = __popc(same & ((1u << lane) - 1));
  if (as.expert >= 0 && lane_rank == 0) warp_counts[warp * E + as.expert] = __popc(same);
  __syncthreads();
  for (int ex = threadIdx.x; ex < E; ex += blockDim.x) {  // exclusive prefix over the warps
    int run = 0;
    for (int w = 0; w < 32; ++w) {
      const int c = warp_counts[w * E + ex];
      warp_counts[w * E + ex] = run;
      run += c;
    }
    chunk_total[ex] = run;
  }
  __syncthreads();
  if (as.expert >= 0) as.rank = warp_counts[warp * E + as.expert] + lane_rank;
  return as;
}

__global__ void __launch_bounds__(kPlanChunk) plan_chunk_counts_kernel(const int32_t* topk_idx, int T, int k, int E,
                                                                       bool token_major, int32_t* chunk_counts) {
  extern __shared__ int32_t smem[];
  int32_t* total = smem + 32 * E;
  rank_in_chunk(topk_idx, T, k, E, token_major, smem, total);
  for (int ex = threadIdx.x; ex < E; ex += blockDim.x) chunk_counts[int64_t(blockIdx.x) * E + ex] = total[ex];
}

// chunk_counts [chunks][E] becomes each chunk's base rank per expert; routed, counts, offsets.
__global__ void plan_layout_kernel(int32_t* chunk_counts, int chunks, int E, int capacity, int32_t* routed,
                                   int32_t* counts, int32_t* offsets) {
  for (int ex = threadIdx.x; ex < E; ex += blockDim.x) {
    int run = 0;
    for (int c = 0; c < chunks; ++c) {
      const int n = chunk_counts[int64_t(c) * E + ex];
      chunk_counts[int64_t(c) * E + ex] = run;
      run += n;
    }
    routed[ex] = run;
    counts[ex] = capacity > 0 ? min(run, capacity) : run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int ex = 0; ex < E; ++ex) {
      offsets[ex] = run;
      run += counts[ex];
    }
    offsets[E] = run;
  }
}

__global__ void __launch_bounds__(kPlanChunk) plan_slots_kernel(const int32_t* topk_idx, int T, int k, int E,
                                                                bool token_major, int capacity,
                                                                const int32_t* chunk_base, const int32_t* offsets,
                                                                int32_t* slot, int32_t* row_token) {
  extern __shared__ int32_t smem[];
  const Assignment as = rank_in_chunk(topk_idx, T, k, E, token_major, smem, smem + 32 * E);
  if (as.expert < 0) return;
  const int rank = chunk_base[int64_t(blockIdx.x) * E + as.expert] + as.rank;
  if (capacity > 0 && rank >= capacity) {
    slot[as.index] = -1;
    return;
  }
  const int s = offsets[as.expert] + rank;
  slot[as.index] = s;
  row_token[s] = as.token;
}

// The balance loss needs each expert's mean router probability over the tokens. Column sums of
// probs [T, E] in two deterministic stages: blocks of kBalanceRows rows (lane = expert column, so
// a warp reads whole rows), each writing one partial per expert, then one block adding the
// partials in order (a single block striding over columns was 290 us at T 16384, E 32). With
// sigmoid scores each row is read times its inverse sum (inv_row, else null).
constexpr int kBalanceRows = 128;

// inv_row[t] = 1 / sum_e probs[t, e]: sigmoid scores normalized to sum 1 per token.
__global__ void row_inverse_sum_kernel(const float* probs, int T, int E, float* inv_row) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float s = 0.f;
  for (int e = 0; e < E; ++e) s += probs[int64_t(t) * E + e];
  inv_row[t] = 1.f / s;
}

__global__ void __launch_bounds__(256) probs_column_partials_kernel(const float* probs, const float* inv_row, int T,
                                                                    int E, float* partials) {
  __shared__ float warp_part[8][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * 32 + lane;
  const int r0 = blockIdx.y * kBalanceRows, r1 = min(T, r0 + kBalanceRows);
  float s = 0.f;
  if (e < E)
    for (int t = r0 + warp; t < r1; t += 8) s += inv_row ? probs[int64_t(t) * E + e] * inv_row[t] : probs[int64_t(t) * E + e];
  warp_part[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && e < E) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) total += warp_part[w][lane];
    partials[int64_t(blockIdx.y) * E + e] = total;
  }
}

__global__ void balance_loss_kernel(const float* partials, int row_blocks, const int32_t* routed, int T, int E,
                                    float coef, float* bal) {
  __shared__ float shm[32];
  float assignments = 0.f;  // T * k: every assignment is routed somewhere before drops
  for (int e = 0; e < E; ++e) assignments += float(routed[e]);
  assignments = fmaxf(assignments, 1.f);
  float term = 0.f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float s = 0.f;
    for (int b = 0; b < row_blocks; ++b) s += partials[int64_t(b) * E + e];
    term += float(routed[e]) / assignments * (s / float(T));
  }
  const float total = block_sum(term, shm);
  if (threadIdx.x == 0) bal[0] = coef * float(E) * total;
}

// Sequence scope, one block (256 threads) per sequence of L tokens: the sequence's assignments
// per expert (integer counts, so the atomics are exact) into fractions f[s, e] = count / (L k);
// with probs, also the sequence's term sum_e f[s, e] * mean_t q[t, e] into terms[s] (each thread
// sums its experts' columns over the tokens in order).
__global__ void __launch_bounds__(256) sequence_balance_kernel(const int32_t* topk_idx, const float* probs,
                                                               const float* inv_row, int L, int k, int E,
                                                               float* fractions, float* terms) {
  __shared__ int32_t count[kMaxExperts];
  __shared__ float shm[32];
  const int s = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  const int64_t a0 = int64_t(s) * L * k;
  for (int i = threadIdx.x; i < L * k; i += blockDim.x) atomicAdd(&count[topk_idx[a0 + i]], 1);
  __syncthreads();
  float term = 0.f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const float f = float(count[e]) / float(L * k);
    if (fractions) fractions[int64_t(s) * E + e] = f;
    if (probs) {
      float col = 0.f;
      for (int t = s * L; t < (s + 1) * L; ++t)
        col += inv_row ? probs[int64_t(t) * E + e] * inv_row[t] : probs[int64_t(t) * E + e];
      term += f * (col / float(L));
    }
  }
  if (probs) {
    const float total = block_sum(term, shm);
    if (threadIdx.x == 0) terms[s] = total;
  }
}

// bal = coef * E * mean over the sequences of their terms, added in order.
__global__ void sequence_balance_total_kernel(const float* terms, int sequences, int E, float coef, float* bal) {
  if (threadIdx.x != 0) return;
  float s = 0.f;
  for (int q = 0; q < sequences; ++q) s += terms[q];
  bal[0] = coef * float(E) * s / float(max(sequences, 1));
}

struct BalanceArgs {
  float coef = 0, grad_scale = 1, z_coef = 0;
  int seq_len = 0;
  const float* seq_fractions = nullptr;  // [T / seq_len, E] with the sequence scope
};

// One thread per token: the balance term's gradient (on q, then through the sigmoid scores'
// normalization), the gates' backward, the scores' backward (softmax or sigmoid), then the
// z-loss's gradient on the logits.
__global__ void router_bwd_kernel(const float* logits, const float* probs, const int32_t* topk_idx, const float* gates,
                                  const float* dgates, const int32_t* routed, int T, int E, int k, RouterArgs ra,
                                  BalanceArgs ba, float* dlogits) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* p = probs + int64_t(t) * E;
  float* dl = dlogits + int64_t(t) * E;
  float S = 0.f, gdot = 0.f;
  for (int j = 0; j < k; ++j) {
    S += p[topk_idx[int64_t(t) * k + j]];
    gdot += dgates[int64_t(t) * k + j] * gates[int64_t(t) * k + j];
  }
  // d bal / d q[t, e] = bal_scale * weight[e]: weight = routed (f_e = routed[e] / sum(routed): the
  // sum is T k for one rank's routing, and the group's or the step's total when routed sums
  // those, as the CPU reference reads it), or the sequence's fractions.
  const float* seq_f = ba.seq_fractions ? ba.seq_fractions + int64_t(t / ba.seq_len) * E : nullptr;
  float bal_scale;
  if (seq_f) {
    const int sequences = T / ba.seq_len;
    bal_scale = ba.grad_scale * ba.coef * float(E) / (float(ba.seq_len) * float(sequences));
  } else {
    int total = 0;
    for (int e = 0; e < E; ++e) total += routed[e];
    bal_scale = ba.grad_scale * ba.coef * float(E) / (float(T) * float(max(total, 1)));
  }
  auto weight = [&](int e) { return seq_f ? seq_f[e] : float(routed[e]); };
  // Sigmoid: q = s / sum(s), so dL/ds_e = (w_e - sum_m w_m q_m) / sum(s).
  float row = 1.f, wq = 0.f;
  if (ra.sigmoid) {
    row = 0.f;
    for (int e = 0; e < E; ++e) row += p[e];
    for (int e = 0; e < E; ++e) wq += bal_scale * weight(e) * p[e] / row;
  }
  // dp[e] = balance term + gate term (if chosen); softmax: dlogit = p * (dp - <p, dp>);
  // sigmoid: dlogit = dp * s (1 - s).
  float pdp = 0.f;
  for (int e = 0; e < E; ++e) {
    float dp = ra.sigmoid ? (bal_scale * weight(e) - wq) / row : bal_scale * weight(e);
    for (int j = 0; j < k; ++j)
      if (topk_idx[int64_t(t) * k + j] == e)
        dp += ra.norm_topk ? (ra.route_scale * dgates[int64_t(t) * k + j] - gdot) / S
                           : ra.route_scale * dgates[int64_t(t) * k + j];
    dl[e] = dp;
    pdp += p[e] * dp;
  }
  if (ra.sigmoid) {
    for (int e = 0; e < E; ++e) dl[e] = dl[e] * p[e] * (1.f - p[e]);
  } else {
    for (int e = 0; e < E; ++e) dl[e] = p[e] * (dl[e] - pdp);
  }
  if (ba.z_coef != 0.f) {  // z = lse^2: dz/dlogit_e = 2 lse softmax_e
    const float* l = logits + int64_t(t) * E;
    float m = -INFINITY, s = 0.f;
    for (int e = 0; e < E; ++e) m = fmaxf(m, l[e]);
    for (int e = 0; e < E; ++e) s += expf(l[e] - m);
    const float lse = m + logf(s);
    const float zs = ba.grad_scale * ba.z_coef / float(T) * 2.f * lse / s;
    for (int e = 0; e < E; ++e) dl[e] += zs * expf(l[e] - m);
  }
}

// Router statistics: per token the entropy of q and logsumexp(logits)^2, summed per block into
// partials [blocks][2], then added in order by one thread (deterministic).
__global__ void __launch_bounds__(256) router_stats_kernel(const float* logits, const float* probs, int T, int E,
                                                           bool sigmoid, float* partials) {
  __shared__ float shm[32];
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  float h = 0.f, z = 0.f;
  if (t < T) {
    const float* p = probs + int64_t(t) * E;
    const float* l = logits + int64_t(t) * E;
    float row = 1.f;
    if (sigmoid) {
      row = 0.f;
      for (int e = 0; e < E; ++e) row += p[e];
    }
    for (int e = 0; e < E; ++e) {
      const float q = p[e] / row;
      if (q > 0.f) h -= q * logf(q);
    }
    float m = -INFINITY, s = 0.f;
    for (int e = 0; e < E; ++e) m = fmaxf(m, l[e]);
    for (int e = 0; e < E; ++e) s += expf(l[e] - m);
    const float lse = m + logf(s);
    z = lse * lse;
  }
  h = block_sum(h, shm);
  z = block_sum(z, shm);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = h;
    partials[2 * blockIdx.x + 1] = z;
  }
}

__global__ void router_stats_total_kernel(const float* partials, int blocks, float* acc) {
  if (threadIdx.x != 0) return;
  float h = 0.f, z = 0.f;
  for (int b = 0; b < blocks; ++b) {
    h += partials[2 * b];
    z += partials[2 * b + 1];
  }
  acc[0] += h;
  acc[1] += z;
}

// bias[e] += rate * sign(mean load - load[e]); one block, load summed in a fixed order.
__global__ void router_bias_update_kernel(const float* load, int E, float rate, float* bias) {
  __shared__ float mean;
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int e = 0; e < E; ++e) s += load[e];
    mean = s / float(E);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const float d = mean - load[e];
    bias[e] += rate * float((d > 0.f) - (d < 0.f));
  }
}

}  // namespace

// The host-side checks of a RouterSpec, with the keys that set it.
void check_router_spec(const RouterSpec& spec, int E, const char* op) {
  require(spec.k >= 1 && spec.k <= E && spec.k <= kMaxTopK, op,
          "top_k = " + std::to_string(spec.k) + " must be in [1, min(experts = " + std::to_string(E) +
              ", 16)]; fix moe.top_k");
  require(E >= 1 && E <= kMaxExperts, op, "experts = " + std::to_string(E) + " must be in [1, 256]; fix moe.experts");
  require(spec.groups >= 1 && E % spec.groups == 0, op,
          "groups = " + std::to_string(spec.groups) + " must divide experts = " + std::to_string(E) + "; fix moe.groups");
  require(spec.topk_groups >= 1 && spec.topk_groups <= spec.groups, op,
          "topk_groups = " + std::to_string(spec.topk_groups) + " must be in [1, groups = " +
              std::to_string(spec.groups) + "]; fix moe.topk_groups");
  require(spec.groups == 1 || spec.k <= spec.topk_groups * (E / spec.groups), op,
          "top_k = " + std::to_string(spec.k) + " exceeds the experts of topk_groups groups; raise moe.topk_groups");
}

void CudaBackend::router_topk(const Tensor& logits, const RouterSpec& spec, const Tensor* bias, Tensor& probs,
                              Tensor& topk_idx, Tensor& gates) {
  require_dtype(logits, DType::f32, "router_topk", "logits");
  require_dtype(probs, DType::f32, "router_topk", "probs");
  require_dtype(topk_idx, DType::i32, "router_topk", "topk_idx");
  require_dtype(gates, DType::f32, "router_topk", "gates");
  int T = int(logits.rows()), E = int(logits.cols());
  const int k = spec.k;
  check_router_spec(spec, E, "router_topk");
  require(probs.numel() == int64_t(T) * E && topk_idx.numel() == int64_t(T) * k && gates.numel() == int64_t(T) * k,
          "router_topk", "probs must be [T, E], topk_idx and gates [T, k]");
  if (bias) {
    require_dtype(*bias, DType::f32, "router_topk", "bias");
    require(bias->numel() == E, "router_topk", "bias must be [E]");
  }
  if (T == 0) return;
  router_topk_kernel<<<grid_for(T, 128), 128, 0, stream_>>>(logits.as<float>(), bias ? bias->as<float>() : nullptr, T,
                                                           E, router_args(spec), probs.as<float>(),
                                                           topk_idx.as<int32_t>(), gates.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("router_topk");
}

void CudaBackend::moe_plan(const Tensor& topk_idx, int experts, int capacity, Tensor& routed, Tensor& counts,
                           Tensor& offsets, Tensor& slot, Tensor& row_token, DropOrder order) {
  const Tensor* index_tensors[] = {&topk_idx, &routed, &counts, &offsets, &slot, &row_token};
  for (const Tensor* t : index_tensors) require_dtype(*t, DType::i32, "moe_plan", "index tensors");
  require(experts >= 1 && experts <= kMaxExperts, "moe_plan", "experts must be in [1, 256]");
  int T = int(topk_idx.rows()), k = int(topk_idx.cols());
  require(routed.numel() == experts && counts.numel() == experts && offsets.numel() == experts + 1, "moe_plan",
          "routed and counts must be [E], offsets [E+1]");
  require(slot.numel() == int64_t(T) * k && row_token.numel() >= int64_t(T) * k, "moe_plan",
          "slot must be [T*k] and row_token at least T*k rows");
  if (int64_t(T) * k == 0) {
    fill(routed, 0.f);
    fill(counts, 0.f);
    fill(offsets, 0.f);
    return;
  }
  const int chunks = int((int64_t(T) * k + kPlanChunk - 1) / kPlanChunk);
  auto* chunk_counts = static_cast<int32_t*>(scratch(ScratchSlot::moe_plan, size_t(chunks) * experts * sizeof(int32_t)));
  const size_t shm = size_t(33 * experts) * sizeof(int32_t);
  const bool token_major = order == DropOrder::token;
  plan_chunk_counts_kernel<<<chunks, kPlanChunk, shm, stream_>>>(topk_idx.as<int32_t>(), T, k, experts, token_major,
                                                                 chunk_counts);
  plan_layout_kernel<<<1, 256, 0, stream_>>>(chunk_counts, chunks, experts, capacity, routed.as<int32_t>(),
                                             counts.as<int32_t>(), offsets.as<int32_t>());
  plan_slots_kernel<<<chunks, kPlanChunk, shm, stream_>>>(topk_idx.as<int32_t>(), T, k, experts, token_major, capacity,
                                                          chunk_counts, offsets.as<int32_t>(), slot.as<int32_t>(),
                                                          row_token.as<int32_t>());
  MOELAB_CUDA_LAUNCH_CHECK("moe_plan");
}

void CudaBackend::balance_loss(const Tensor& probs, const Tensor& topk_idx, const Tensor& routed,
                               const BalanceSpec& spec, Tensor& bal) {
  require_dtype(probs, DType::f32, "balance_loss", "probs");
  require_dtype(bal, DType::f32, "balance_loss", "bal");
  int T = int(probs.rows()), E = int(probs.cols());
  require(E <= kMaxExperts, "balance_loss", "experts must be at most 256");
  if (T == 0) {
    fill(bal, 0.f);
    return;
  }
  const float* inv_row = nullptr;
  if (spec.score == RouterScore::sigmoid) {
    auto* inv = static_cast<float*>(scratch(ScratchSlot::router, size_t(T) * sizeof(float)));
    row_inverse_sum_kernel<<<grid_for(T, 128), 128, 0, stream_>>>(probs.as<float>(), T, E, inv);
    inv_row = inv;
  }
  if (spec.seq_len > 0) {
    require_dtype(topk_idx, DType::i32, "balance_loss", "topk_idx");
    const int L = int(spec.seq_len), k = int(topk_idx.numel() / T);
    require(T % L == 0 && topk_idx.numel() == int64_t(T) * k && k >= 1, "balance_loss",
            "the sequence scope needs whole sequences of seq_len tokens and k choices per token");
    const int sequences = T / L;
    auto* terms = static_cast<float*>(scratch(ScratchSlot::reduce, size_t(sequences) * sizeof(float)));
    sequence_balance_kernel<<<sequences, 256, 0, stream_>>>(topk_idx.as<int32_t>(), probs.as<float>(), inv_row, L, k,
                                                            E, nullptr, terms);
    sequence_balance_total_kernel<<<1, 32, 0, stream_>>>(terms, sequences, E, spec.coef, bal.as<float>());
    MOELAB_CUDA_LAUNCH_CHECK("balance_loss");
    return;
  }
  require_dtype(routed, DType::i32, "balance_loss", "routed");
  require(routed.numel() == E, "balance_loss", "routed must be [E]");
  const int row_blocks = (T + kBalanceRows - 1) / kBalanceRows;
  auto* partials = static_cast<float*>(scratch(ScratchSlot::reduce, size_t(row_blocks) * E * sizeof(float)));
  probs_column_partials_kernel<<<dim3(unsigned((E + 31) / 32), unsigned(row_blocks)), 256, 0, stream_>>>(
      probs.as<float>(), inv_row, T, E, partials);
  balance_loss_kernel<<<1, 256, 0, stream_>>>(partials, row_blocks, routed.as<int32_t>(), T, E, spec.coef,
                                              bal.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("balance_loss");
}

void CudaBackend::router_bwd(const Tensor& logits, const Tensor& probs, const Tensor& topk_idx, const Tensor& gates,
                             const Tensor& dgates, const Tensor& routed, const RouterSpec& spec, const BalanceSpec& bal,
                             Tensor& dlogits) {
  require_dtype(probs, DType::f32, "router_bwd", "probs");
  require_dtype(topk_idx, DType::i32, "router_bwd", "topk_idx");
  require_dtype(gates, DType::f32, "router_bwd", "gates");
  require_dtype(dgates, DType::f32, "router_bwd", "dgates");
  require_dtype(dlogits, DType::f32, "router_bwd", "dlogits");
  int T = int(probs.rows()), E = int(probs.cols()), k = int(topk_idx.cols());
  require(topk_idx.numel() == int64_t(T) * k && gates.numel() == int64_t(T) * k && dgates.numel() == int64_t(T) * k &&
          dlogits.numel() == int64_t(T) * E, "router_bwd", "shapes disagree");
  require(E <= kMaxExperts, "router_bwd", "experts must be at most 256");
  if (bal.z_coef != 0.f) {
    require_dtype(logits, DType::f32, "router_bwd", "logits");
    require(logits.numel() == int64_t(T) * E, "router_bwd", "logits must be [T, E] with a z-loss");
  }
  if (T == 0) return;
  BalanceArgs ba;
  ba.coef = bal.coef;
  ba.grad_scale = bal.grad_scale;
  ba.z_coef = bal.z_coef;
  const int32_t* routed_ptr = nullptr;
  if (bal.seq_len > 0) {
    const int L = int(bal.seq_len);
    require(T % L == 0, "router_bwd", "the sequence scope needs whole sequences of seq_len tokens");
    const int sequences = T / L;
    auto* f = static_cast<float*>(scratch(ScratchSlot::router, size_t(sequences) * E * sizeof(float)));
    sequence_balance_kernel<<<sequences, 256, 0, stream_>>>(topk_idx.as<int32_t>(), nullptr, nullptr, L, k, E, f,
                                                            nullptr);
    ba.seq_len = L;
    ba.seq_fractions = f;
  } else {
    require_dtype(routed, DType::i32, "router_bwd", "routed");
    require(routed.numel() == E, "router_bwd", "routed must be [E]");
    routed_ptr = routed.as<int32_t>();
  }
  RouterSpec rs = spec;
  rs.k = k;
  router_bwd_kernel<<<grid_for(T, 128), 128, 0, stream_>>>(
      bal.z_coef != 0.f ? logits.as<float>() : nullptr, probs.as<float>(), topk_idx.as<int32_t>(), gates.as<float>(),
      dgates.as<float>(), routed_ptr, T, E, k, router_args(rs), ba, dlogits.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("router_bwd");
}

void CudaBackend::router_stats(const Tensor& logits, const Tensor& probs, RouterScore score, Tensor& acc) {
  require_dtype(logits, DType::f32, "router_stats", "logits");
  require_dtype(probs, DType::f32, "router_stats", "probs");
  require_dtype(acc, DType::f32, "router_stats", "acc");
  int T = int(probs.rows()), E = int(probs.cols());
  require(logits.numel() == int64_t(T) * E && acc.numel() == 2, "router_stats", "logits must be [T, E], acc [2]");
  if (T == 0) return;
  const unsigned blocks = grid_for(T, 256);
  auto* partials = static_cast<float*>(scratch(ScratchSlot::reduce, size_t(blocks) * 2 * sizeof(float)));
  router_stats_kernel<<<blocks, 256, 0, stream_>>>(logits.as<float>(), probs.as<float>(), T, E,
                                                   score == RouterScore::sigmoid, partials);
  router_stats_total_kernel<<<1, 32, 0, stream_>>>(partials, int(blocks), acc.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("router_stats");
}

void CudaBackend::router_bias_update(const Tensor& load, float rate, Tensor& bias) {
  require_dtype(load, DType::f32, "router_bias_update", "load");
  require_dtype(bias, DType::f32, "router_bias_update", "bias");
  const int E = int(bias.numel());
  require(load.numel() == E, "router_bias_update", "load and bias must both be [E]");
  if (E == 0) return;
  router_bias_update_kernel<<<1, 256, 0, stream_>>>(load.as<float>(), E, rate, bias.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("router_bias_update");
}

}  // namespace moelab
