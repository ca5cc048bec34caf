// Every call in the op table that hands an op an FP8 amax side output goes through here, so the
// table's rows speak of plain tensors (an amax, and a per-expert amax's offsets) and the AmaxSink
// form the ops take is spelled in one file. amax null: the plain op.
#pragma once
#include "backend/backend.hpp"

namespace moelab::ops::amax {

// A whole-tensor sink (amax f32 [1]), or one of G equal parts (the optimizer's).
inline AmaxSink whole(const Tensor& amax) { return AmaxSink{amax, {}}; }
// A per-expert sink: amax [E] beside offsets [E+1].
inline AmaxSink per_expert(const Tensor& amax, const Tensor& offsets) { return AmaxSink{amax, offsets}; }

inline void rmsnorm_fwd(Backend& be, const Tensor& x, Tensor& y, Tensor& rstd, const Tensor* amax) {
  if (!amax) return be.rmsnorm_fwd(x, y, rstd);
  const AmaxSink s = whole(*amax);
  be.rmsnorm_fwd(x, y, rstd, &s);
}
inline void rmsnorm_bwd(Backend& be, const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx, bool acc,
                        const Tensor* amax) {
  if (!amax) return be.rmsnorm_bwd(x, rstd, dy, dx, acc);
  const AmaxSink s = whole(*amax);
  be.rmsnorm_bwd(x, rstd, dy, dx, acc, &s);
}
inline void rope_norm_bwd(Backend& be, const Tensor& x, const Tensor& c, const Tensor& sn, const Tensor& rstd,
                          const Tensor& dy, Tensor& dx, const Tensor* amax) {
  if (!amax) return be.rope_norm_bwd(x, c, sn, rstd, dy, dx);
  const AmaxSink s = whole(*amax);
  be.rope_norm_bwd(x, c, sn, rstd, dy, dx, &s);
}
inline void softcap_xent(Backend& be, const Tensor& logits, const Tensor& targets, float cap, float grad_scale,
                         Tensor& losses, Tensor& dlogits, const Tensor* amax) {
  if (!amax) return be.softcap_xent(logits, targets, cap, grad_scale, losses, dlogits);
  const AmaxSink s = whole(*amax);
  be.softcap_xent(logits, targets, cap, grad_scale, losses, dlogits, &s);
}

inline void relu2_fwd(Backend& be, const Tensor& h, Tensor& a, const Tensor* amax, const Tensor* offsets) {
  if (!amax) return be.relu2_fwd(h, a);
  const AmaxSink e = per_expert(*amax, *offsets);
  be.relu2_fwd(h, a, &e);
}
inline void relu2_bwd(Backend& be, const Tensor& h, const Tensor& da, Tensor& dh, const Tensor* amax,
                      const Tensor* offsets) {
  if (!amax) return be.relu2_bwd(h, da, dh);
  const AmaxSink e = per_expert(*amax, *offsets);
  be.relu2_bwd(h, da, dh, &e);
}
inline void moe_permute(Backend& be, const Tensor& x, const Tensor& row_token, const Tensor& offsets, Tensor& xp,
                        const Tensor* amax) {
  if (!amax) return be.moe_permute(x, row_token, offsets, xp);
  const AmaxSink e = per_expert(*amax, offsets);
  be.moe_permute(x, row_token, offsets, xp, &e);
}
inline void moe_combine_bwd(Backend& be, const Tensor& dy, const Tensor& yp, const Tensor& slot, const Tensor& gates,
                            Tensor& dyp, Tensor& dgates, const Tensor* amax, const Tensor* offsets) {
  if (!amax) return be.moe_combine_bwd(dy, yp, slot, gates, dyp, dgates);
  const AmaxSink e = per_expert(*amax, *offsets);
  be.moe_combine_bwd(dy, yp, slot, gates, dyp, dgates, &e);
}

// The optimizer's: G equal consecutive parts of the updated param.
inline void adamw_update(Backend& be, Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWStep& s,
                         const Tensor* parts_amax) {
  if (!parts_amax) return be.adamw_update(p, g, m, v, s);
  const AmaxSink e = whole(*parts_amax);
  be.adamw_update(p, g, m, v, s, &e);
}

}  // namespace moelab::ops::amax
