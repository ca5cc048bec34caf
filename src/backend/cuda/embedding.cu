// Token embedding forward (a row gather) and backward (a scatter-add into the table). The
// backward must be deterministic, so instead of float atomics it sorts (token, position) pairs
// with a stable radix sort and lets one warp add each token's rows in position order.
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

// One warp per run head of the sorted keys: sums that token's rows in position order.
template <class TD, class TW>
__global__ void embedding_bwd_kernel(const int32_t* keys, const int32_t* pos, const TD* dout, TW* dwte, int n,
                                     int d, int vocab) {
  int i = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (i >= n) return;
  int tok = keys[i];
  if ((i > 0 && keys[i - 1] == tok) || tok < 0 || tok >= vocab) return;
  int end = i + 1;
  while (end < n && keys[end] == tok) ++end;
  for (int c = threadIdx.x & 31; c < d; c += 32) {
    float acc = to_f32(dwte[int64_t(tok) * d + c]);
    for (int j = i; j < end; ++j) acc += to_f32(dout[int64_t(pos[j]) * d + c]);
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
  unsigned nb = unsigned((n + 7) / 8);
  MOELAB_FLOAT_DISPATCH(dout.dtype, TD, MOELAB_FLOAT_DISPATCH(dwte.dtype, TW,
      embedding_bwd_kernel<TD, TW><<<nb, 256, 0, stream_>>>(keys_out, pos_out, dout.as<TD>(), dwte.as<TW>(), n, d,
                                                           vocab)));
  MOELAB_CUDA_LAUNCH_CHECK("embedding_bwd");
}

}  // namespace moelab
