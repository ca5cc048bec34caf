// Token embedding lookup and its scatter-add backward. The backward splits the embedding columns
// over threads (each thread walks all tokens in order over its own columns), so repeated tokens
// accumulate in a fixed order without atomics.
#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

namespace {

void check_tokens(const Tensor& tokens, int64_t vocab, const char* op) {
  const int32_t* tp = ptr<int32_t>(tokens);
  for (int64_t t = 0; t < tokens.numel(); ++t)
    require(tp[t] >= 0 && tp[t] < vocab, op,
            "token " + std::to_string(tp[t]) + " at position " + std::to_string(t) +
                " is outside the vocabulary [0, " + std::to_string(vocab) +
                "); check model.vocab against the tokenizer");
}

}  // namespace

void CpuBackend::embedding_fwd(const Tensor& tokens, const Tensor& wte, Tensor& out) {
  const char* op = "embedding_fwd";
  require_i32(tokens, op, "tokens");
  require_float(wte, op, "wte");
  require_like(wte, out, op, "out");
  require(wte.ndim() == 2, op, "wte is " + wte.describe() + " but must be [vocab, D]");
  const int64_t N = tokens.numel(), D = wte.dim(1);
  require(out.rows() == N && out.cols() == D, op,
          "out is " + out.describe() + " but must be [" + std::to_string(N) + ", " +
              std::to_string(D) + "]");
  check_tokens(tokens, wte.dim(0), op);
  with_float(wte.dtype, [&](auto te) {
    using T = decltype(te);
    const int32_t* tp = ptr<int32_t>(tokens);
    const T* w = ptr<T>(wte);
    T* o = ptr<T>(out);
    pool_.parallel_for(N, grain_for(D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < D; ++i) o[t * D + i] = w[int64_t(tp[t]) * D + i];
    });
  });
}

void CpuBackend::embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  const char* op = "embedding_bwd";
  require_i32(tokens, op, "tokens");
  require_float(dwte, op, "dwte");
  require_like(dwte, dout, op, "dout");
  require(dwte.ndim() == 2, op, "dwte is " + dwte.describe() + " but must be [vocab, D]");
  const int64_t N = tokens.numel(), D = dwte.dim(1);
  require(dout.rows() == N && dout.cols() == D, op,
          "dout is " + dout.describe() + " but must be [" + std::to_string(N) + ", " +
              std::to_string(D) + "]");
  check_tokens(tokens, dwte.dim(0), op);
  with_float(dwte.dtype, [&](auto te) {
    using T = decltype(te);
    const int32_t* tp = ptr<int32_t>(tokens);
    const T* g = ptr<T>(dout);
    T* w = ptr<T>(dwte);
    pool_.parallel_for(D, grain_for(N), [&](int64_t c0, int64_t c1) {
      for (int64_t t = 0; t < N; ++t) {
        T* wr = w + int64_t(tp[t]) * D;
        const T* gr = g + t * D;
        for (int64_t i = c0; i < c1; ++i) wr[i] += gr[i];
      }
    });
  });
}

}  // namespace moelab
