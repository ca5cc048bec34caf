// Logit softcap + cross-entropy, fused with its backward as the model uses it (the loss of the
// last layer is always differentiated). Math is in the logits' type (f32 or f64) with the
// row's exp-sum in double; each row is capped into a per-thread buffer before any gradient is
// written, so dlogits may overwrite logits in place.
#include <cmath>
#include <limits>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"

namespace moelab {

using namespace cpu;

void CpuBackend::softcap_xent(const Tensor& logits, const Tensor& targets, float cap,
                              float grad_scale, Tensor& losses, Tensor& dlogits, const AmaxSink* amax) {
  const char* op = "softcap_xent";
  require_float(logits, op, "logits");
  require_i32(targets, op, "targets");
  require_float(losses, op, "losses");
  require_like(logits, dlogits, op, "dlogits");
  const int64_t N = logits.rows(), V = logits.cols();
  require_numel(targets, N, op, "targets");
  require_numel(losses, N, op, "losses");
  require_numel(dlogits, N * V, op, "dlogits");
  const int32_t* tp = ptr<int32_t>(targets);
  for (int64_t n = 0; n < N; ++n)
    require(tp[n] < V, op,
            "target " + std::to_string(tp[n]) + " of row " + std::to_string(n) +
                " is outside the vocabulary of " + std::to_string(V) +
                "; check model.vocab against the data");
  const bool capped = cap > 0.0f;
  const double c = capped ? double(cap) : 1.0;
  with_float(logits.dtype, [&](auto te) {
    using T = decltype(te);
    const T* lg = ptr<T>(logits);
    T* dl = ptr<T>(dlogits);
    pool_.parallel_for(N, grain_for(V * 8), [&](int64_t n0, int64_t n1) {
      std::vector<T> z(static_cast<size_t>(V)), e(static_cast<size_t>(V));
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t tgt = tp[n];
        double loss = 0;
        T* dr = dl + n * V;
        if (tgt < 0) {
          for (int64_t i = 0; i < V; ++i) dr[i] = T(0);
        } else {
          const T* lr = lg + n * V;
          const T cc = T(c);
          T m = -std::numeric_limits<T>::infinity();
          for (int64_t i = 0; i < V; ++i) {
            z[size_t(i)] = capped ? cc * std::tanh(lr[i] / cc) : lr[i];
            m = z[size_t(i)] > m ? z[size_t(i)] : m;
          }
          double s = 0;
          for (int64_t i = 0; i < V; ++i) {
            e[size_t(i)] = std::exp(z[size_t(i)] - m);
            s += double(e[size_t(i)]);
          }
          loss = double(m) + std::log(s) - double(z[size_t(tgt)]);
          // dlogits = scale * (softmax - onehot) * d(c tanh(x/c))/dx, with the derivative
          // 1 - tanh^2 = 1 - (z/c)^2. Written only now, so dlogits may alias logits.
          const T inv_s = T(1.0 / s), gs = T(grad_scale);
          for (int64_t i = 0; i < V; ++i) {
            const T zi = z[size_t(i)];
            T g = e[size_t(i)] * inv_s - (i == tgt ? T(1) : T(0));
            if (capped) g *= T(1) - (zi / cc) * (zi / cc);
            dr[i] = gs * g;
          }
        }
        if (losses.dtype == DType::f64)
          ptr<double>(losses)[n] = loss;
        else
          ptr<float>(losses)[n] = float(loss);
      }
    });
  });
  if (amax) raise_tensor_amax(dlogits, *amax, op);
}

}  // namespace moelab
