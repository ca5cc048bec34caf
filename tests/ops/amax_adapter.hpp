// Every call in the op table that hands an op an FP8 amax side output goes through here, so the
// form those arguments take (a tensor amax, an ExpertAmax, a group amax) is spelled in one file.
// amax null: the plain op. offsets: the expert boundaries of a per-expert amax.
#pragma once
#include "backend/backend.hpp"

namespace moelab::ops::amax {

inline void rmsnorm_fwd(Backend& be, const Tensor& x, Tensor& y, Tensor& rstd, const Tensor* amax) {
  be.rmsnorm_fwd(x, y, rstd, amax);
}
inline void rmsnorm_bwd(Backend& be, const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx, bool acc,
                        const Tensor* amax) {
  be.rmsnorm_bwd(x, rstd, dy, dx, acc, amax);
}
inline void rope_norm_bwd(Backend& be, const Tensor& x, const Tensor& c, const Tensor& s, const Tensor& rstd,
                          const Tensor& dy, Tensor& dx, const Tensor* amax) {
  be.rope_norm_bwd(x, c, s, rstd, dy, dx, amax);
}
inline void softcap_xent(Backend& be, const Tensor& logits, const Tensor& targets, float cap, float grad_scale,
                         Tensor& losses, Tensor& dlogits, const Tensor* amax) {
  be.softcap_xent(logits, targets, cap, grad_scale, losses, dlogits, amax);
}

// The per-expert producers: amax [E] beside offsets [E+1].
inline void relu2_fwd(Backend& be, const Tensor& h, Tensor& a, const Tensor* amax, const Tensor* offsets) {
  if (!amax) return be.relu2_fwd(h, a);
  const ExpertAmax e{*amax, *offsets};
  be.relu2_fwd(h, a, &e);
}
inline void relu2_bwd(Backend& be, const Tensor& h, const Tensor& da, Tensor& dh, const Tensor* amax,
                      const Tensor* offsets) {
  if (!amax) return be.relu2_bwd(h, da, dh);
  const ExpertAmax e{*amax, *offsets};
  be.relu2_bwd(h, da, dh, &e);
}
inline void moe_permute(Backend& be, const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                        const Tensor* amax) {
  if (!amax) return be.moe_permute(x, row_token, offsets, xp);
  const ExpertAmax e{*amax, offsets};
  be.moe_permute(x, row_token, offsets, xp, &e);
}
inline void moe_combine_bwd(Backend& be, const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates,
                            Tensor& dyp, Tensor& dgates, const Tensor* amax, const Tensor* offsets) {
  if (!amax) return be.moe_combine_bwd(dy, yp, slot, gates, dyp, dgates);
  const ExpertAmax e{*amax, *offsets};
  be.moe_combine_bwd(dy, yp, slot, gates, dyp, dgates, &e);
}

// The optimizer's group amax: G equal consecutive parts of the updated param.
inline void adamw_update(Backend& be, Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWStep& s,
                         const Tensor* group_amax) {
  be.adamw_update(p, g, m, v, s, group_amax);
}

}  // namespace moelab::ops::amax
