// Token embedding forward (a row gather) and backward (a scatter-add into the table). The
// backward must be deterministic, so instead of float atomics it sorts (token, position) pairs
// with a stable radix sort and adds each token's rows in position order. Frequent tokens (a space
// in byte-level text is a sixth of all positions) would leave one warp summing thousands of rows
// while the rest idle, so the sorted list is cut into fixed chunks of kChunk entries, one warp
// each: a token whose run lies inside one chunk is added to the table there; a run that crosses
// chunk edges leaves one partial sum per chunk, and a second kernel adds those in chunk order.
#include <cub/device/device_radix_sort.cuh>

#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

template <class TW, class TO>
__global__ void embedding_fwd_kernel(const int32_t* tokens, const TW* wte, TO* out, int64_t n, int d, int vocab) {
  int64_t row = blockIdx.x * 8ll + (threadIdx.x >> 5);
  if (row >= n) return;
  int tok = tokens[row];
  bool valid = tok >= 0 && tok < vocab;
  for (int i = threadIdx.x & 31; i < d; i += 32)
    out[row * d + i] = from_f32<TO>(valid ? to_f32(wte[int64_t(tok) * d + i]) : 0.f);
}

__global__ void iota_kernel(int32_t* p, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = i;
}

constexpr int kChunk = 32;

// Partial sums of a chunk, [chunks, 2, d]: slot 0 for the segment that starts at the chunk's
// first entry, slot 1 for one that starts later and runs past the chunk's end.
template <class TD, class TW>
__global__ void embedding_bwd_chunk_kernel(const int32_t* keys, const int32_t* pos, const TD* dout, TW* dwte,
                                           float* partial, int n, int d, int vocab) {
  const int chunk = blockIdx.x * 8 + (threadIdx.x >> 5);
  const int begin = chunk * kChunk;
  if (begin >= n) return;
  const int end = min(n, begin + kChunk);
  for (int c = threadIdx.x & 31; c < d; c += 32) {
    float acc = 0.f;
    int seg = begin;
    for (int j = begin; j < end; ++j) {
      const int tok = keys[j];
      acc += to_f32(dout[int64_t(pos[j]) * d + c]);
      if (j + 1 < end && keys[j + 1] == tok) continue;
      if (tok >= 0 && tok < vocab) {
        const bool run_starts_here = seg == 0 || keys[seg - 1] != tok;
        const bool run_ends_here = j + 1 == n || keys[j + 1] != tok;
        if (run_starts_here && run_ends_here) {
          TW* w = dwte + int64_t(tok) * d + c;
          *w = from_f32<TW>(to_f32(*w) + acc);
        } else {
          partial[(int64_t(chunk) * 2 + (seg == begin ? 0 : 1)) * d + c] = acc;
        }
      }
      acc = 0.f;
      seg = j + 1;
    }
  }
}

// One warp per token whose run crosses a chunk edge: adds its partial sums in chunk order.
template <class TW>
__global__ void embedding_bwd_merge_kernel(const int32_t* keys, const float* partial, TW* dwte, int n, int d,
                                           int vocab) {
  const int i = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (i >= n) return;
  const int tok = keys[i];
  if ((i > 0 && keys[i - 1] == tok) || tok < 0 || tok >= vocab) return;
  int lo = i + 1, hi = n;  // first index past the run (keys are sorted)
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (keys[mid] == tok) lo = mid + 1;
    else hi = mid;
  }
  const int first = i / kChunk, last = (lo - 1) / kChunk;
  if (first == last) return;
  const int first_slot = i == first * kChunk ? 0 : 1;
  for (int c = threadIdx.x & 31; c < d; c += 32) {
    float acc = to_f32(dwte[int64_t(tok) * d + c]);
    acc += partial[(int64_t(first) * 2 + first_slot) * d + c];
    for (int k = first + 1; k <= last; ++k) acc += partial[int64_t(k) * 2 * d + c];
    dwte[int64_t(tok) * d + c] = from_f32<TW>(acc);
  }
}

}  // namespace

void CudaBackend::embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) {
  require_dtype(tokens, DType::i32, "embedding_fwd", "tokens");
  require_float(wte, "embedding_fwd", "wte");
  require_float(out, "embedding_fwd", "out");
  int64_t n = tokens.numel(), d = wte.cols();
  require(out.numel() == n * d, "embedding_fwd", "out must be [N, D], got " + out.describe());
  if (n == 0) return;
  unsigned nb = unsigned((n + 7) / 8);
  MOELAB_FLOAT_DISPATCH(wte.dtype, TW, MOELAB_FLOAT_DISPATCH(out.dtype, TO,
      embedding_fwd_kernel<TW, TO><<<nb, 256, 0, stream_>>>(tokens.as<int32_t>(), wte.as<TW>(), out.as<TO>(), n,
                                                           int(d), int(wte.rows()))));
  MOELAB_CUDA_LAUNCH_CHECK("embedding_fwd");
}

void CudaBackend::embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  require_dtype(tokens, DType::i32, "embedding_bwd", "tokens");
  require_float(dout, "embedding_bwd", "dout");
  require_float(dwte, "embedding_bwd", "dwte");
  int n = int(tokens.numel());
  int d = int(dwte.cols()), vocab = int(dwte.rows());
  require(dout.numel() == int64_t(n) * d, "embedding_bwd", "dout must be [N, D], got " + dout.describe());
  if (n == 0) return;
  int bits = 1;
  while ((1ll << bits) < vocab) ++bits;
  auto* keys = static_cast<int32_t*>(scratch(ScratchSlot::embed_keys, size_t(4) * n * sizeof(int32_t)));
  int32_t *pos_in = keys + n, *keys_out = keys + 2 * n, *pos_out = keys + 3 * n;
  size_t temp_bytes = 0;
  MOELAB_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, tokens.as<int32_t>(), keys_out, pos_in,
                                                    pos_out, n, 0, bits, stream_));
  void* temp = scratch(ScratchSlot::embed_sort, temp_bytes);
  iota_kernel<<<grid_for(n, 256), 256, 0, stream_>>>(pos_in, n);
  MOELAB_CUDA_LAUNCH_CHECK("iota");
  // Tokens are non-negative (ids), so sorting their bits as unsigned keeps id order.
  MOELAB_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens.as<int32_t>(), keys_out, pos_in,
                                                    pos_out, n, 0, bits, stream_));
  const int chunks = (n + kChunk - 1) / kChunk;
  auto* partial = static_cast<float*>(scratch(ScratchSlot::embed_partial, size_t(chunks) * 2 * d * sizeof(float)));
  MOELAB_FLOAT_DISPATCH(dout.dtype, TD, MOELAB_FLOAT_DISPATCH(dwte.dtype, TW,
      embedding_bwd_chunk_kernel<TD, TW><<<unsigned((chunks + 7) / 8), 256, 0, stream_>>>(
          keys_out, pos_out, dout.as<TD>(), dwte.as<TW>(), partial, n, d, vocab)));
  MOELAB_CUDA_LAUNCH_CHECK("embedding_bwd chunks");
  MOELAB_FLOAT_DISPATCH(dwte.dtype, TW,
      embedding_bwd_merge_kernel<TW><<<unsigned((n + 7) / 8), 256, 0, stream_>>>(keys_out, partial, dwte.as<TW>(),
                                                                               n, d, vocab));
  MOELAB_CUDA_LAUNCH_CHECK("embedding_bwd merge");
}

}  // namespace moelab
