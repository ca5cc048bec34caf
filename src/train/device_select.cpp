// Backend selection and the per-card peak used for MFU.
#include "train/device_select.hpp"

#include "backend/devices.hpp"
#include "core/error.hpp"

namespace moelab {

std::unique_ptr<Backend> make_backend(const Config& cfg) {
  bool want_cuda = cfg.device == "cuda";
#ifdef MOELAB_HAVE_CUDA
  if (cfg.device == "auto") want_cuda = cuda_device_available();
  if (want_cuda) {
    if (!cuda_device_available())
      throw Error("device = cuda but no CUDA GPU is visible; use device = cpu (or auto) on this machine");
    if (cfg.precision != "auto" && cfg.precision != "bf16" && cfg.precision != "fp8")
      throw Error("precision = " + cfg.precision + " is not supported on device cuda; use precision = bf16, fp8 (or auto)");
    std::unique_ptr<Backend> backend = make_cuda_backend();
    // Fast at every shape, or refused.
    if (!backend->supports(Capability::attention_head_dim(cfg.model.head_dim)))
      throw Error("model.head_dim = " + std::to_string(cfg.model.head_dim) +
                  " has no fast attention kernel on the GPU; use 64 or 128 (or device = cpu)");
    return backend;
  }
#else
  if (want_cuda)
    throw Error("device = cuda but this moelab was built without the CUDA backend; rebuild with nvcc present "
                "(cmake -DMOELAB_CUDA=ON) or use device = cpu");
#endif
  // precision = fp8 on the CPU: f32 everywhere except the recipe's GEMMs, whose FP8 rounding is
  // emulated exactly (the reference the GPU's FP8 kernels are checked against).
  if (cfg.precision != "auto" && cfg.precision != "f32" && cfg.precision != "fp8")
    throw Error("precision = " + cfg.precision + " needs device = cuda; the CPU backend computes in f32 "
                "(precision = auto, f32, or fp8 for FP8-emulated GEMMs)");
  return make_cpu_backend(DType::f32, int(cfg.train.threads));
}

std::optional<double> peak_flops(const Config& cfg, const Backend& backend) {
  if (cfg.train.peak_flops > 0) return cfg.train.peak_flops;
  if (backend.device() != Device::cuda) return std::nullopt;
  const std::string n = backend.name();
  if (n.find("H100") != std::string::npos || n.find("H200") != std::string::npos) return 989e12;
  if (n.find("H800") != std::string::npos) return 756e12;
  if (n.find("A100") != std::string::npos) return 312e12;
  return std::nullopt;
}

}  // namespace moelab
