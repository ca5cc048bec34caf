// MoE routing on the device: softmax + top-k + renormalized gates, the dispatch plan (per-expert
// counts, offsets, each assignment's slot, each permuted row's token), the Switch balance loss
// and the router backward. The plan ranks assignments within their expert in (choice rank, token)
// order by warp match + prefix sums over chunks, so the capacity rule drops exactly the
// assignments the CPU reference drops, and nothing is read back.
#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 16;

// One thread per token: E is small (8..256), so a serial scan per token is cheap.
__global__ void router_topk_kernel(const float* logits, int T, int E, int k, float* probs, int32_t* topk_idx,
                                   float* gates) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* l = logits + int64_t(t) * E;
  float* p = probs + int64_t(t) * E;
  float m = -INFINITY;
  for (int e = 0; e < E; ++e) m = fmaxf(m, l[e]);
  float s = 0.f;
  for (int e = 0; e < E; ++e) s += expf(l[e] - m);
  for (int e = 0; e < E; ++e) p[e] = expf(l[e] - m) / s;
  int chosen[kMaxTopK];
  float gsum = 0.f;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float bp = -1.f;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= chosen[q] == e;
      if (!taken && p[e] > bp) {  // strict: ties keep the lower index
        bp = p[e];
        best = e;
      }
    }
    chosen[j] = best;
    gsum += bp;
  }
  for (int j = 0; j < k; ++j) {
    topk_idx[int64_t(t) * k + j] = chosen[j];
    gates[int64_t(t) * k + j] = p[chosen[j]] / gsum;
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
// partials in order (a single block striding over columns was 290 us at T 16384, E 32).
constexpr int kBalanceRows = 128;

__global__ void __launch_bounds__(256) probs_column_partials_kernel(const float* probs, int T, int E, float* partials) {
  __shared__ float warp_part[8][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * 32 + lane;
  const int r0 = blockIdx.y * kBalanceRows, r1 = min(T, r0 + kBalanceRows);
  float s = 0.f;
  if (e < E)
    for (int t = r0 + warp; t < r1; t += 8) s += probs[int64_t(t) * E + e];
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

// One thread per token: gate renormalization backward, balance-loss term, softmax backward.
__global__ void router_bwd_kernel(const float* probs, const int32_t* topk_idx, const float* gates,
                                  const float* dgates, const int32_t* routed, int T, int E, int k, float bal_coef,
                                  float bal_grad_scale, float* dlogits) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* p = probs + int64_t(t) * E;
  float* dl = dlogits + int64_t(t) * E;
  float S = 0.f, gdot = 0.f;
  for (int j = 0; j < k; ++j) {
    S += p[topk_idx[int64_t(t) * k + j]];
    gdot += dgates[int64_t(t) * k + j] * gates[int64_t(t) * k + j];
  }
  // f_e = routed[e] / sum(routed): the sum is T k for one rank's routing, and the group's total
  // when routed sums a data-parallel group's (GptMoE::set_group), as the CPU reference reads it.
  int total = 0;
  for (int e = 0; e < E; ++e) total += routed[e];
  float bal_scale = bal_grad_scale * bal_coef * float(E) / (float(T) * float(max(total, 1)));
  // dp[e] = balance term + gate term (if chosen); dlogit = p * (dp - <p, dp>)
  float pdp = 0.f;
  for (int e = 0; e < E; ++e) {
    float dp = bal_scale * float(routed[e]);
    for (int j = 0; j < k; ++j)
      if (topk_idx[int64_t(t) * k + j] == e) dp += (dgates[int64_t(t) * k + j] - gdot) / S;
    dl[e] = dp;
    pdp += p[e] * dp;
  }
  for (int e = 0; e < E; ++e) dl[e] = p[e] * (dl[e] - pdp);
}

}  // namespace

void CudaBackend::router_topk(const Tensor& logits, int k, Tensor& probs, Tensor& topk_idx, Tensor& gates) {
  require_dtype(logits, DType::f32, "router_topk", "logits");
  require_dtype(probs, DType::f32, "router_topk", "probs");
  require_dtype(topk_idx, DType::i32, "router_topk", "topk_idx");
  require_dtype(gates, DType::f32, "router_topk", "gates");
  int T = int(logits.rows()), E = int(logits.cols());
  require(k >= 1 && k <= E && k <= kMaxTopK, "router_topk", "top_k must be in [1, min(experts, 16)]");
  require(probs.numel() == int64_t(T) * E && topk_idx.numel() == int64_t(T) * k && gates.numel() == int64_t(T) * k,
          "router_topk", "probs must be [T, E], topk_idx and gates [T, k]");
  if (T == 0) return;
  router_topk_kernel<<<grid_for(T, 128), 128, 0, stream_>>>(logits.as<float>(), T, E, k, probs.as<float>(),
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

void CudaBackend::balance_loss(const Tensor& probs, const Tensor& routed, float coef, Tensor& bal) {
  require_dtype(probs, DType::f32, "balance_loss", "probs");
  require_dtype(routed, DType::i32, "balance_loss", "routed");
  require_dtype(bal, DType::f32, "balance_loss", "bal");
  int T = int(probs.rows()), E = int(probs.cols());
  require(routed.numel() == E, "balance_loss", "routed must be [E]");
  if (T == 0) {
    fill(bal, 0.f);
    return;
  }
  const int row_blocks = (T + kBalanceRows - 1) / kBalanceRows;
  auto* partials = static_cast<float*>(scratch(ScratchSlot::reduce, size_t(row_blocks) * E * sizeof(float)));
  probs_column_partials_kernel<<<dim3(unsigned((E + 31) / 32), unsigned(row_blocks)), 256, 0, stream_>>>(
      probs.as<float>(), T, E, partials);
  balance_loss_kernel<<<1, 256, 0, stream_>>>(partials, row_blocks, routed.as<int32_t>(), T, E, coef, bal.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("balance_loss");
}

void CudaBackend::router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& gates, const Tensor& dgates,
                             const Tensor& routed, float bal_coef, float bal_grad_scale, Tensor& dlogits) {
  require_dtype(probs, DType::f32, "router_bwd", "probs");
  require_dtype(topk_idx, DType::i32, "router_bwd", "topk_idx");
  require_dtype(gates, DType::f32, "router_bwd", "gates");
  require_dtype(dgates, DType::f32, "router_bwd", "dgates");
  require_dtype(routed, DType::i32, "router_bwd", "routed");
  require_dtype(dlogits, DType::f32, "router_bwd", "dlogits");
  int T = int(probs.rows()), E = int(probs.cols()), k = int(topk_idx.cols());
  require(topk_idx.numel() == int64_t(T) * k && gates.numel() == int64_t(T) * k && dgates.numel() == int64_t(T) * k &&
          routed.numel() == E && dlogits.numel() == int64_t(T) * E, "router_bwd", "shapes disagree");
  if (T == 0) return;
  router_bwd_kernel<<<grid_for(T, 128), 128, 0, stream_>>>(probs.as<float>(), topk_idx.as<int32_t>(),
                                                          gates.as<float>(), dgates.as<float>(), routed.as<int32_t>(),
                                                          T, E, k, bal_coef, bal_grad_scale, dlogits.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("router_bwd");
}

}  // namespace moelab
