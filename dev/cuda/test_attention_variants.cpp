// Kernel lab: every flash-attention variant (attention_variants_hd64.cuh: forward, dq, dk/dv) against the CPU
// backend's f32 attention on small shapes chosen for their edges: T not a multiple of 64 or 128,
// grouped-query heads, bf16 and f32 gradients. The benchmark (bench_attention_variants.cu) checks
// the same variants at the seed's shape; this catches what only odd shapes exercise.
// Skips cleanly when there is no GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <string>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "attention_variants_hd64.cuh"
#include "core/rng.hpp"
#include "gpu_fixture.hpp"

namespace moelab {
namespace {

constexpr double kTol = 1e-2;  // bf16 operands and outputs against f32

TEST(FlashVariants, MatchCpuReference) {
  if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
  CudaBackend gpu;
  CpuBackend cpu(DType::f32, 2);
  const uint64_t seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  Rng rng(seed);
  struct Case {
    int64_t B, T, Hq, Hkv;
  };
  for (Case cs : {Case{2, 77, 4, 4}, Case{1, 200, 6, 2}, Case{1, 300, 4, 1}, Case{1, 128, 2, 2}}) {
    const std::string tag = "T=" + std::to_string(cs.T) + " Hq=" + std::to_string(cs.Hq) +
                            " Hkv=" + std::to_string(cs.Hkv) + " seed " + std::to_string(seed);
    const Shape qs{cs.B, cs.T, cs.Hq, 64}, ks{cs.B, cs.T, cs.Hkv, 64}, ls{cs.B, cs.Hq, cs.T};
    auto randn_bf16 = [&](const Shape& s) {
      int64_t n = 1;
      for (auto d : s) n *= d;
      std::vector<float> v(static_cast<size_t>(n));
      for (auto& x : v) x = round_to_bf16(float(rng.normal()));
      return v;
    };
    const auto hq = randn_bf16(qs), hk = randn_bf16(ks), hv = randn_bf16(ks), hdo = randn_bf16(qs);
    Tensor cq = cpu.alloc(qs, DType::f32), ck = cpu.alloc(ks, DType::f32), cv = cpu.alloc(ks, DType::f32),
           cdo = cpu.alloc(qs, DType::f32), co = cpu.alloc(qs, DType::f32), cl = cpu.alloc(ls, DType::f32);
    cpu.write(cq, hq);
    cpu.write(ck, hk);
    cpu.write(cv, hv);
    cpu.write(cdo, hdo);
    cpu.attention_fwd(cq, ck, cv, co, cl);
    // The backward reference starts from the forward output rounded to bf16, as the GPU stores it.
    auto ho = cpu.read(co);
    for (auto& x : ho) x = round_to_bf16(x);
    cpu.write(co, ho);
    Tensor cdq = cpu.alloc(qs, DType::f32), cdk = cpu.alloc(ks, DType::f32), cdv = cpu.alloc(ks, DType::f32);
    cpu.attention_bwd(cq, ck, cv, co, cl, cdo, cdq, cdk, cdv);
    const auto ref_o = cpu.read(co), ref_l = cpu.read(cl), ref_dq = cpu.read(cdq), ref_dk = cpu.read(cdk),
               ref_dv = cpu.read(cdv);

    Tensor q = gpu.alloc(qs, DType::bf16), k = gpu.alloc(ks, DType::bf16), v = gpu.alloc(ks, DType::bf16),
           dout = gpu.alloc(qs, DType::bf16), ob = gpu.alloc(qs, DType::bf16), lref = gpu.alloc(ls, DType::f32),
           D = gpu.alloc(ls, DType::f32);
    gpu.write(q, hq);
    gpu.write(k, hk);
    gpu.write(v, hv);
    gpu.write(dout, hdo);
    gpu.write(ob, ho);
    gpu.write(lref, ref_l);
    const int B = int(cs.B), T = int(cs.T), Hq = int(cs.Hq), Hkv = int(cs.Hkv);
    const float scale = 0.125f;
    flash_lab::row_dot(ob.as<__nv_bfloat16>(), dout.as<__nv_bfloat16>(), D.as<float>(), B, T, Hq, gpu.stream());
    using BF = __nv_bfloat16;
    for (auto fk : {flash_lab::FwdKernel::base, flash_lab::FwdKernel::lean64, flash_lab::FwdKernel::m128}) {
      Tensor o = gpu.alloc(qs, DType::bf16), l = gpu.alloc(ls, DType::f32);
      gpu.fill(o, NAN);
      gpu.fill(l, NAN);
      flash_lab::forward_with(fk, q.as<BF>(), k.as<BF>(), v.as<BF>(), o.as<BF>(), l.as<float>(), B, T, Hq, Hkv, scale,
                          gpu.stream());
      EXPECT_LT(nerr(gpu.read(o), ref_o), kTol) << flash_lab::name(fk) << " out " << tag;
      EXPECT_LT(nerr(gpu.read(l), ref_l), 1e-4) << flash_lab::name(fk) << " lse " << tag;
    }
    for (DType gt : {DType::bf16, DType::f32}) {
      const std::string gtag = tag + " grad " + dtype_name(gt);
      for (auto qk : {flash_lab::DqKernel::base, flash_lab::DqKernel::lean64, flash_lab::DqKernel::m128}) {
        Tensor dq = gpu.alloc(qs, gt);
        gpu.fill(dq, NAN);
        flash_lab::dq_with(qk, q.as<BF>(), k.as<BF>(), v.as<BF>(), dout.as<BF>(), lref.as<float>(), D.as<float>(),
                       dq.data, gt, B, T, Hq, Hkv, scale, gpu.stream());
        EXPECT_LT(nerr(gpu.read(dq), ref_dq), kTol) << flash_lab::name(qk) << " dq " << gtag;
      }
      for (auto kk : {flash_lab::DkvKernel::base, flash_lab::DkvKernel::lean64, flash_lab::DkvKernel::n128}) {
        Tensor dk = gpu.alloc(ks, gt), dv = gpu.alloc(ks, gt);
        gpu.fill(dk, NAN);
        gpu.fill(dv, NAN);
        flash_lab::dkv_with(kk, q.as<BF>(), k.as<BF>(), v.as<BF>(), dout.as<BF>(), lref.as<float>(), D.as<float>(),
                        dk.data, dv.data, gt, B, T, Hq, Hkv, scale, gpu.stream());
        EXPECT_LT(nerr(gpu.read(dk), ref_dk), kTol) << flash_lab::name(kk) << " dk " << gtag;
        EXPECT_LT(nerr(gpu.read(dv), ref_dv), kTol) << flash_lab::name(kk) << " dv " << gtag;
      }
    }
  }
}

}  // namespace
}  // namespace moelab
