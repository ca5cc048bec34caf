// AdamW over the backend's fused update; see adamw.hpp.
#include "optim/adamw.hpp"

#include "core/error.hpp"

namespace moelab {

void AdamW::add(Param* param, double base_lr, Overrides overrides) {
  MOELAB_CHECK(param->grad.shape == param->value.shape && param->grad.dtype == param->value.dtype,
               "AdamW: gradient of '" + param->name + "' is " + param->grad.describe() + ", value " +
                   param->value.describe());
  Slot s{param, base_lr, backend_.alloc(param->value.shape, param->value.dtype),
         backend_.alloc(param->value.shape, param->value.dtype), overrides};
  backend_.fill(s.m, 0.0f);
  backend_.fill(s.v, 0.0f);
  slots_.push_back(s);
}

void AdamW::step(int64_t step, double lr_multiplier) {
  for (Slot& s : slots_) {
    AdamWStep a;
    a.lr = float(s.base_lr * lr_multiplier);
    a.beta1 = float(s.overrides.beta1 >= 0 ? s.overrides.beta1 : cfg_.adam_beta1);
    a.beta2 = float(cfg_.adam_beta2);
    a.eps = float(cfg_.adam_eps);
    const double wd = cfg_.adamw_weight_decay >= 0 ? cfg_.adamw_weight_decay : cfg_.weight_decay;
    a.weight_decay = float(s.overrides.weight_decay >= 0 ? s.overrides.weight_decay : wd);
    a.step = step + 1;
    Param& p = *s.param;
    const AmaxSink amax{p.value_amax, {}};  // one part per matrix of the param (FP8 tensor scaling)
    backend_.adamw_update(p.value, p.grad, s.m, s.v, a, p.value_amax.data ? &amax : nullptr);
    p.value_amax_raised = p.value_amax.data != nullptr;
  }
}

void AdamW::append_state(std::vector<NamedTensor>& out) const {
  for (const Slot& s : slots_) {
    out.push_back({"optim/" + s.param->name + "/exp_avg", s.m});
    out.push_back({"optim/" + s.param->name + "/exp_avg_sq", s.v});
  }
}

}  // namespace moelab
