// MoE routing on the device: softmax + top-k + renormalized gates, the dispatch plan (per-expert
// counts, offsets, each assignment's slot, each permuted row's token), the Switch balance loss
// and the router backward. The plan is one single-block kernel: assignments are ranked within
// their expert in (choice rank, token) order by warp match + shared-memory prefix sums, so the
// capacity rule drops exactly the assignments the CPU reference drops, and nothing is read back.
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

// Single block of 1024 threads. Pass 1 ranks each assignment within its expert in order
// (j, t) and counts routed[e]; then counts/offsets; pass 2 turns ranks into slots.
__global__ void moe_plan_kernel(const int32_t* topk_idx, int T, int k, int E, int capacity, bool token_major,
                                int32_t* routed,
                                int32_t* counts, int32_t* offsets, int32_t* slot, int32_t* row_token) {
  extern __shared__ int32_t smem[];
  int32_t* warp_counts = smem;                 // [32][E]
  int32_t* base = smem + 32 * E;               // [E] running count per expert
  int32_t* offs = base + E;                    // [E + 1]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = threadIdx.x; e < E; e += blockDim.x) base[e] = 0;
  __syncthreads();
  const int n = T * k;
  for (int start = 0; start < n; start += blockDim.x) {
    int a = start + threadIdx.x;  // assignment in (j, t) order, or (t, j) when token-major
    int j = a / max(T, 1), t = a - j * T;
    if (token_major) {
      t = a / k;
      j = a - t * k;
    }
    bool active = a < n;
    int e = active ? topk_idx[int64_t(t) * k + j] : -1;
    for (int q = threadIdx.x; q < 32 * E; q += blockDim.x) warp_counts[q] = 0;
    __syncthreads();
    unsigned same = __match_any_sync(0xffffffffu, e);
    int lane_rank = __popc(same & ((1u << lane) - 1));
    if (active && lane_rank == 0) warp_counts[warp * E + e] = __popc(same);
    __syncthreads();
    // Exclusive prefix over warps per expert, then advance the running base.
    for (int ex = threadIdx.x; ex < E; ex += blockDim.x) {
      int run = base[ex];
      for (int w = 0; w < 32; ++w) {
        int c = warp_counts[w * E + ex];
        warp_counts[w * E + ex] = run;
        run += c;
      }
      base[ex] = run;
    }
    __syncthreads();
    if (active) slot[int64_t(t) * k + j] = warp_counts[warp * E + e] + lane_rank;  // rank for now
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int run = 0;
    for (int ex = 0; ex < E; ++ex) {
      int r = base[ex];
      int c = capacity > 0 ? min(r, capacity) : r;
      routed[ex] = r;
      counts[ex] = c;
      offs[ex] = run;
      offsets[ex] = run;
      run += c;
    }
    offs[E] = run;
    offsets[E] = run;
  }
  __syncthreads();
  for (int a = threadIdx.x; a < n; a += blockDim.x) {
    int t = a / k;
    int e = topk_idx[a];
    int rank = slot[a];
    if (capacity > 0 && rank >= capacity) {
      slot[a] = -1;
    } else {
      int s = offs[e] + rank;
      slot[a] = s;
      row_token[s] = t;
    }
  }
}

// bal = coef * E * sum_e (routed[e] / (T k)) * mean_t probs[t, e]; one block, fixed order.
// T k is read as the sum of routed (every assignment is routed before any drop).
__global__ void balance_loss_kernel(const float* probs, const int32_t* routed, int T, int E, float coef,
                                    float* bal) {
  __shared__ float shm[32];
  float total = 0.f;
  float assignments = 0.f;  // T * k: every assignment is routed somewhere before drops
  for (int e = 0; e < E; ++e) assignments += float(routed[e]);
  assignments = fmaxf(assignments, 1.f);
  for (int e = 0; e < E; ++e) {
    float s = 0.f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) s += probs[int64_t(t) * E + e];
    s = block_sum(s, shm);
    total += float(routed[e]) / assignments * (s / float(T));
  }
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
  float bal_scale = bal_grad_scale * bal_coef * float(E) / (float(T) * float(T * k));
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
  size_t shm = size_t(32 * experts + 2 * experts + 1) * sizeof(int32_t);
  moe_plan_kernel<<<1, 1024, shm, stream_>>>(topk_idx.as<int32_t>(), T, k, experts, capacity,
                                             order == DropOrder::token, routed.as<int32_t>(),
                                             counts.as<int32_t>(), offsets.as<int32_t>(), slot.as<int32_t>(),
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
  balance_loss_kernel<<<1, 1024, 0, stream_>>>(probs.as<float>(), routed.as<int32_t>(), T, E, coef,
                                              bal.as<float>());
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
