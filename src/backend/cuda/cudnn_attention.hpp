// Causal attention through cuDNN's fused flash-attention engine (cuDNN 9 backend API), forward and
// backward, as an alternative to the own kernels of flash_attention.cu: the caller measures both
// per shape and routes to the faster one, and falls back when supported() says no.
//
// Layout (moelab's): q, out, dout, dq [B, T, Hq, D]; k, v, dk, dv [B, T, Hkv, D]; all bf16 and
// contiguous. lse [B, Hq, T] f32: natural-log log-sum-exp of the scaled scores of each query row,
// written by forward() and read by backward(). Every pointer 16-byte aligned (the plans assume
// it). Query i sees keys j <= i (causal), and with window > 0 only keys i - window < j <= i (the
// last `window` keys, itself included); scale 1/sqrt(D); Hq % Hkv == 0 (grouped-query).
//
// Execution plans are built once per shape and device and cached. All work is enqueued on the
// given stream with no host synchronization, so calls can be captured in a CUDA graph; the first
// call of a shape (or prepare()) builds its plans and, when the caller passes no workspace,
// allocates the cached one: make that call before capturing.
//
// Built without cuDNN (MOELAB_HAVE_CUDNN unset), supported() returns false and says so.
//
// From CudaBackend::attention_fwd / attention_bwd (bf16 tensors, bf16 gradients):
//   cudnn_attention::Shape s{B, T, Hq, Hkv, head_dim, window};
//   if (cudnn_attention::supported(s)) {
//     void* ws = scratch(ScratchSlot::attention, cudnn_attention::workspace_bytes(s));
//     cudnn_attention::forward(s, q, k, v, out, lse, ws, stream_);   // or backward(...)
//   }
// backward() computes rowsum(dO * O) itself, so the attention_dot pass is not needed on this path.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>

namespace moelab::cudnn_attention {

struct Shape {
  int B = 0, T = 0, Hq = 0, Hkv = 0, D = 0;
  int window = 0;  // 0: full causal
};

// cudnnGetVersion() of the library loaded at run time (e.g. 91900 for 9.19.0), and the version of
// the headers moelab was compiled against; 0 without cuDNN.
int version();
int compiled_version();

// Whether forward and backward plans finalize for this shape on the current device; builds and
// caches them on success. On failure, *reason (if given) says why.
bool supported(const Shape& s, std::string* reason = nullptr);

// Bytes of device workspace forward()/backward() need for this shape (the larger of the two,
// including the backward's f32 scratch). Builds the plans; throws moelab::Error if unsupported.
size_t workspace_bytes(const Shape& s);

// Builds the plans and the cached workspace for this shape (call before a graph capture when
// forward/backward will be given no workspace).
void prepare(const Shape& s);

// `workspace`: at least workspace_bytes(s) of device memory, 256-byte aligned, used only by the
// work enqueued on `stream`; nullptr uses a workspace cached per shape.
void forward(const Shape& s, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
             __nv_bfloat16* out, float* lse, void* workspace, cudaStream_t stream);

// Gradients of forward(): dq, dk, dv are overwritten (not accumulated into).
void backward(const Shape& s, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
              const __nv_bfloat16* out, const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq,
              __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace, cudaStream_t stream);

// The cuDNN engine (global index) each finalized plan uses, for logs: "fwd engine 8, bwd engine 8".
std::string describe(const Shape& s);

}  // namespace moelab::cudnn_attention
