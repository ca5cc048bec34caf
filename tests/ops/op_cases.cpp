// The op table: each row below is one op on given shapes, dtypes and options, with its bound and
// the directions it checks. Adding an op (or a shape a kernel path needs) is adding a row.
// Shapes of the "gpu path" rows pick CUDA kernel paths (vector widths, tiles, clusters); the small
// rows are sized for finite differences. Rows tagged "cpu" use shapes only the CPU promises to
// take (a zero-depth GEMM, head dims below the GPU kernels'); the CUDA run skips them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "ops/amax_adapter.hpp"
#include "ops/fp8_recipes.hpp"
#include "ops/op_harness.hpp"

namespace moelab::ops {
namespace {

std::string dims(std::initializer_list<std::pair<const char*, int64_t>> d) {
  std::string s;
  for (auto& [k, v] : d) s += (s.empty() ? "" : " ") + std::string(k) + std::to_string(v);
  return s;
}
const char* rn(Role r) { return r == Role::act ? "act" : r == Role::bf16 ? "bf16" : "f32"; }
int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// --- elementwise -----------------------------------------------------------------------------------
void elementwise(std::vector<OpCase>& t) {
  // 37 x 129 takes CUDA's scalar kernels; 64 x 136 (a multiple of 8) its 16-byte vector ones.
  for (const Shape& s : {Shape{37, 129}, Shape{64, 136}}) {
    const std::string sh = dims({{"rows", s[0]}, {"cols", s[1]}});
    t.push_back({"copy", "bf16 to f32 " + sh, {1e-7, 1e-7}, true, false, [s](OpCtx& c) {
                   auto x = c.in(s, Role::bf16), y = c.out(s, Role::f32);
                   c.run([&](Backend& be, int i) { be.copy(x[i], y[i]); });
                   c.expect(y, "copy");
                 }});
    t.push_back({"copy", "f32 to bf16 " + sh, {5e-3, 5e-3}, true, false, [s](OpCtx& c) {
                   auto x = c.in(s, Role::f32), y = c.out(s, Role::bf16);
                   c.run([&](Backend& be, int i) { be.copy(x[i], y[i]); });
                   c.expect(y, "copy");
                 }});
    t.push_back({"axpby", sh, {1e-6, 1e-4}, true, false, [s](OpCtx& c) {
                   auto x = c.in(s), y = c.in(s, Role::f32);
                   std::vector<double> want = c.values(y), xv = c.values(x);
                   for (size_t i = 0; i < want.size(); ++i) want[i] = 0.7f * xv[i] - 1.3f * want[i];
                   c.run([&](Backend& be, int i) { be.axpby(0.7f, x[i], -1.3f, y[i]); });
                   c.expect(y, "axpby");
                   c.expect_host(y, want, "axpby", 1e-14);
                 }});
    // b = 0 ignores y's old contents, NaN included (a CPU promise).
    t.push_back({"axpby", "b0 over NaN " + sh, {1e-6, 1e-4}, true, false,
                 [s](OpCtx& c) {
                   auto x = c.in(s), y = c.out(s, Role::f32);
                   c.run([&](Backend& be, int i) {
                     be.fill(y[i], NAN);
                     be.axpby(3.0f, x[i], 0.0f, y[i]);
                   });
                   std::vector<double> want = c.values(x);
                   for (auto& v : want) v *= 3.0;
                   c.expect(y, "axpby with b = 0 over NaN");
                   c.expect_host(y, want, "axpby with b = 0 over NaN", 1e-14);
                 },
                 "cpu"});
    t.push_back({"fill", sh, {1e-12, 1e-12}, true, false, [s](OpCtx& c) {
                   auto y = c.out(s, Role::bf16);
                   c.run([&](Backend& be, int i) { be.fill(y[i], 2.5f); });
                   c.expect(y, "fill");
                   c.expect_host(y, std::vector<double>(size_t(numel(s)), 2.5), "fill", 0);
                 }});
    t.push_back({"sum", sh, {1e-6, 1e-4}, true, false, [s](OpCtx& c) {
                   std::vector<double> v = c.randn(numel(s));
                   for (auto& x : v) x += 1.0;  // a mean away from zero: the sum's relative error means something
                   auto x = c.from(s, v);
                   auto o = c.out({1}, Role::f32);
                   double want = 0;
                   for (double f : c.values(x)) want += f;
                   c.run([&](Backend& be, int i) { be.sum(x[i], o[i], false); });
                   c.expect(o, "sum");
                   c.expect_host(o, {want}, "sum");
                   c.run([&](Backend& be, int i) { be.sum(x[i], o[i], true); });
                   c.expect(o, "sum accumulate");
                   c.expect_host(o, {2 * want}, "sum accumulate");
                   double sq = 0;
                   for (double f : c.values(x)) sq += f * f;
                   c.run([&](Backend& be, int i) { be.sum_squares(x[i], o[i], true); });
                   c.expect(o, "sum_squares accumulate");
                   c.expect_host(o, {2 * want + sq}, "sum_squares accumulate");
                 }});
    t.push_back({"relu2", sh, {1e-6, 1e-2}, true, true, [s](OpCtx& c) {
                   auto h = c.in(s), a = c.out(s), da = c.in(s), dh = c.out(s);
                   auto fwd = [&](Backend& be, int i) { be.relu2_fwd(h[i], a[i]); };
                   c.run(fwd);
                   c.expect(a, "relu2_fwd");
                   std::vector<double> want;
                   for (double v : c.values(h)) want.push_back(v > 0 ? v * v : 0.0);
                   c.expect_host(a, want, "relu2_fwd", 1e-15);
                   c.run([&](Backend& be, int i) { be.relu2_bwd(h[i], da[i], dh[i]); });
                   c.expect(dh, "relu2_bwd");
                   c.gradcheck(fwd, {{&a, &da}}, {{&h, &dh}});
                 }});
  }
  t.push_back({"copy", "i32 to f32 n300", {1e-12, 1e-12}, true, false, [](OpCtx& c) {
                 std::vector<int32_t> v(300);
                 for (auto& x : v) x = int32_t(c.rng().below(1 << 20)) - (1 << 19);
                 auto x = c.i32({300}, v);
                 auto y = c.out({300}, Role::f32);
                 c.run([&](Backend& be, int i) { be.copy(x[i], y[i]); });
                 c.expect(y, "copy");
                 c.expect_host(y, std::vector<double>(v.begin(), v.end()), "copy i32 to f32", 0);
               }});
}

// --- dense GEMM ------------------------------------------------------------------------------------
std::vector<double> naive_matmul(const std::vector<double>& A, bool ta, const std::vector<double>& B, bool tb,
                                 const std::vector<double>& C0, int64_t M, int64_t N, int64_t K, double alpha,
                                 double beta) {
  std::vector<double> C(size_t(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += (ta ? A[size_t(k * M + i)] : A[size_t(i * K + k)]) * (tb ? B[size_t(j * K + k)] : B[size_t(k * N + j)]);
      C[size_t(i * N + j)] = alpha * s + (beta == 0 ? 0.0 : beta * C0[size_t(i * N + j)]);
    }
  return C;
}

struct Gemm {
  int64_t M, N, K;
  bool ta, tb;
  float alpha, beta;
  Role a = Role::act, b = Role::act, out = Role::act;
  Tol tol = {1e-5, 1e-2};
  bool nan_c = false;  // C starts as NaN (beta must be 0)
  std::string tags = {};
};

void gemm(std::vector<OpCase>& t) {
  std::vector<Gemm> g;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      g.push_back({96, 136, 200, bool(ta), bool(tb), 1.f, 0.f});                                                // bf16 out
      g.push_back({96, 136, 200, bool(ta), bool(tb), 0.5f, 1.f, Role::act, Role::act, Role::f32, {1e-5, 1e-4}});  // wgrad style
      g.push_back({101, 263, 301, bool(ta), bool(tb), 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});  // block edges
      g.push_back({37, 29, 53, bool(ta), bool(tb), 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
    }
  g.push_back({96, 136, 200, false, true, 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});  // tf32 on CUDA
  g.push_back({96, 136, 200, false, true, 1.f, 0.f, Role::f32, Role::act, Role::f32, {1e-5, 1e-2}});  // mixed
  g.push_back({13, 17, 19, false, true, 0.5f, 2.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
  g.push_back({13, 17, 300, true, false, -1.5f, 1.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
  g.push_back({64, 48, 32, false, false, 1.f, -0.25f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
  g.push_back({1, 1, 1, false, false, 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
  g.push_back({1, 40, 7, true, true, 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
  g.push_back({40, 1, 7, false, true, 1.f, 1.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}});
  Gemm nan = {20, 10, 30, false, false, 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-5, 3e-3}};
  nan.nan_c = true;
  g.push_back(nan);
  g.push_back({4, 3, 0, false, false, 1.f, 0.5f, Role::f32, Role::f32, Role::f32, {1e-12, 1e-12}, false, "cpu"});
  Gemm k0 = {4, 3, 0, false, false, 1.f, 0.f, Role::f32, Role::f32, Role::f32, {1e-12, 1e-12}, true, "cpu"};
  g.push_back(k0);
  for (const Gemm& m : g) {
    const std::string sh = dims({{"M", m.M}, {"N", m.N}, {"K", m.K}, {"ta", m.ta}, {"tb", m.tb}}) + " alpha " +
                           std::to_string(m.alpha) + " beta " + std::to_string(m.beta) + " " + rn(m.a) + "x" + rn(m.b) +
                           "->" + rn(m.out) + (m.nan_c ? " C NaN" : "");
    t.push_back({"matmul", sh, m.tol, true, false,
                 [m](OpCtx& c) {
                   auto A = c.in(m.ta ? Shape{m.K, m.M} : Shape{m.M, m.K}, m.a);
                   auto B = c.in(m.tb ? Shape{m.N, m.K} : Shape{m.K, m.N}, m.b);
                   auto C = c.in({m.M, m.N}, m.out);
                   const std::vector<double> c0 = c.values(C);
                   if (m.nan_c) c.run([&](Backend& be, int i) { be.fill(C[i], NAN); });
                   c.run([&](Backend& be, int i) { be.matmul(A[i], m.ta, B[i], m.tb, C[i], m.alpha, m.beta); });
                   c.expect(C, "matmul");
                   c.expect_host(C, naive_matmul(c.values(A), m.ta, c.values(B), m.tb, c0, m.M, m.N, m.K, m.alpha, m.beta),
                                 "matmul against the naive product");
                 },
                 m.tags});
  }
}

// --- embedding -------------------------------------------------------------------------------------
void embedding(std::vector<OpCase>& t) {
  // Uniform over a few ids, then skewed (one id ~40% of the positions, its run crossing many of
  // CUDA's chunks); the small row is for finite differences.
  struct E {
    int64_t V, D, N;
    bool skewed;
  };
  for (const E e : {E{300, 72, 517, false}, E{300, 72, 4099, true}, E{11, 5, 9, false}}) {
    t.push_back({"embedding", dims({{"V", e.V}, {"D", e.D}, {"N", e.N}}) + (e.skewed ? " skewed" : ""), {1e-6, 5e-3},
                 true, true, [e](OpCtx& c) {
                   std::vector<int32_t> tok(size_t(e.N));
                   for (auto& x : tok)
                     x = e.skewed && c.rng().uniform() < 0.4 ? 7 : int32_t(c.rng().below(std::min<int64_t>(40, e.V)));
                   tok[3] = int32_t(e.V - 1);
                   auto tokens = c.i32({e.N}, tok);
                   auto wte = c.in({e.V, e.D}, Role::f32), out = c.out({e.N, e.D});
                   auto fwd = [&](Backend& be, int i) { be.embedding_fwd(tokens[i], wte[i], out[i]); };
                   c.run(fwd);
                   c.expect(out, "embedding_fwd");
                   const std::vector<double> w = c.values(wte);
                   std::vector<double> want;
                   for (int32_t id : tok)
                     for (int64_t d = 0; d < e.D; ++d) want.push_back(w[size_t(id * e.D + d)]);
                   c.expect_host(out, want, "embedding_fwd gathers", 0);
                   auto dout = c.in({e.N, e.D}), dwte = c.in({e.V, e.D}, Role::f32);
                   const std::vector<double> base = c.values(dwte);
                   c.run([&](Backend& be, int i) { be.embedding_bwd(tokens[i], dout[i], dwte[i]); });
                   c.expect(dwte, "embedding_bwd", c.tol_of({1e-6, 1e-5}));
                   c.gradcheck(fwd, {{&out, &dout}}, {{&wte, &dwte, base}});
                 }});
  }
}

// --- norms -----------------------------------------------------------------------------------------
void norms(std::vector<OpCase>& t) {
  // D: 192..2048 keep CUDA's rows in registers, 2064 takes the streamed kernels, 100 the scalar
  // ones; 10 is for finite differences.
  for (const int64_t D : {192, 768, 1032, 1280, 2048, 2064, 100, 10}) {
    const int64_t B = 2, T = D == 10 ? 3 : 45;
    t.push_back({"rmsnorm", dims({{"B", B}, {"T", T}, {"D", D}}), {1e-5, 1e-2}, true, true, [=](OpCtx& c) {
                   auto x = c.in({B, T, D}, Role::act, 3.0);
                   auto y = c.out({B, T, D}), r = c.out({B, T}, Role::f32);
                   auto fwd = [&](Backend& be, int i) { be.rmsnorm_fwd(x[i], y[i], r[i]); };
                   c.run(fwd);
                   c.expect(y, "rmsnorm_fwd y");
                   c.expect(r, "rmsnorm_fwd rstd", c.tol_of({1e-6, 1e-5}));
                   const std::vector<double> xv = c.values(x);
                   std::vector<double> wy, wr;
                   for (int64_t row = 0; row < B * T; ++row) {
                     double ss = 0;
                     for (int64_t i = 0; i < D; ++i) ss += xv[size_t(row * D + i)] * xv[size_t(row * D + i)];
                     wr.push_back(1.0 / std::sqrt(ss / double(D) + double(Backend::kNormEps)));
                     for (int64_t i = 0; i < D; ++i) wy.push_back(xv[size_t(row * D + i)] * wr.back());
                   }
                   c.expect_host(y, wy, "rmsnorm_fwd y against the naive norm", 1e-9);
                   c.expect_host(r, wr, "rmsnorm_fwd rstd against the naive norm", 1e-9);
                   c.expect_amax([&](Backend& be, int i, const Tensor* a, const Tensor*) { amax::rmsnorm_fwd(be, x[i], y[i], r[i], a); },
                                 y, "rmsnorm_fwd amax");
                   auto dy = c.in({B, T, D});
                   for (bool acc : {false, true})
                     for (Role dxr : {Role::f32, Role::act}) {
                       auto dx = c.in({B, T, D}, dxr);
                       const std::vector<double> base = c.values(dx);
                       const std::string what = std::string("rmsnorm_bwd ") + rn(dxr) + (acc ? " accumulate" : "");
                       c.run([&](Backend& be, int i) { be.rmsnorm_bwd(x[i], r[i], dy[i], dx[i], acc); });
                       c.expect(dx, what, c.tol_of({1e-5, dxr == Role::f32 ? 1e-4 : 1e-2}));
                       c.gradcheck(fwd, {{&y, &dy}}, {{&x, &dx, acc ? base : std::vector<double>{}}});
                       auto start = c.again(dx, dxr);  // each amax run starts from the same dx
                       c.expect_amax(
                           [&](Backend& be, int i, const Tensor* a, const Tensor*) {
                             be.copy(start[i], dx[i]);
                             amax::rmsnorm_bwd(be, x[i], r[i], dy[i], dx[i], acc, a);
                           },
                           dx, what + " amax");
                     }
                 }});
  }
  // RoPE then QK-norm: head_dim 64 and 128 take CUDA's lane-group kernels, 48 its one-warp-a-row
  // ones; 8 and 6 are for the naive reference and finite differences.
  for (const int64_t hd : {64, 128, 48, 8, 6}) {
    const bool small = hd < 16;
    const int64_t B = 2, T = small ? 4 : 45, H = small ? 2 : 3, S = small ? 8 : 64;
    t.push_back({"rope_norm", dims({{"B", B}, {"T", T}, {"H", H}, {"hd", hd}}), {1e-5, 1e-2}, true, true,
                 [=](OpCtx& c) {
                   const int64_t half = hd / 2;
                   std::vector<double> cs, sn;
                   for (int64_t p = 0; p < S; ++p)
                     for (int64_t i = 0; i < half; ++i) {
                       const double f = double(p) / std::pow(10000.0, 2.0 * double(i) / double(hd));
                       cs.push_back(std::cos(f));
                       sn.push_back(std::sin(f));
                     }
                   auto co = c.from({S, half}, cs, Role::table), si = c.from({S, half}, sn, Role::table);
                   auto x = c.in({B, T, H, hd}, Role::act, 2.0);
                   auto y = c.out({B, T, H, hd}), r = c.out({B, T, H}, Role::f32);
                   auto fwd = [&](Backend& be, int i) { be.rope_norm_fwd(x[i], co[i], si[i], y[i], r[i]); };
                   c.run(fwd);
                   c.expect(y, "rope_norm_fwd y");
                   c.expect(r, "rope_norm_fwd rstd", c.tol_of({1e-6, 1e-5}));
                   const std::vector<double> xv = c.values(x), cv = c.values(co), sv = c.values(si);
                   std::vector<double> wy(xv.size()), wr;
                   for (int64_t b = 0; b < B; ++b)
                     for (int64_t p = 0; p < T; ++p)
                       for (int64_t h = 0; h < H; ++h) {
                         const size_t o = size_t(((b * T + p) * H + h) * hd);
                         double ss = 0;
                         for (int64_t i = 0; i < half; ++i) {
                           const double x1 = xv[o + size_t(i)], x2 = xv[o + size_t(i + half)];
                           const double cc = cv[size_t(p * half + i)], s = sv[size_t(p * half + i)];
                           wy[o + size_t(i)] = x1 * cc + x2 * s;
                           wy[o + size_t(i + half)] = -x1 * s + x2 * cc;
                           ss += wy[o + size_t(i)] * wy[o + size_t(i)] + wy[o + size_t(i + half)] * wy[o + size_t(i + half)];
                         }
                         wr.push_back(1.0 / std::sqrt(ss / double(hd) + double(Backend::kNormEps)));
                         for (int64_t i = 0; i < hd; ++i) wy[o + size_t(i)] *= wr.back();
                       }
                   c.expect_host(y, wy, "rope_norm_fwd y against the naive rotation and norm", 1e-9);
                   c.expect_host(r, wr, "rope_norm_fwd rstd against the naive norm", 1e-9);
                   auto dy = c.in({B, T, H, hd}), dx = c.out({B, T, H, hd});
                   c.run([&](Backend& be, int i) { be.rope_norm_bwd(x[i], co[i], si[i], r[i], dy[i], dx[i]); });
                   c.expect(dx, "rope_norm_bwd");
                   c.gradcheck(fwd, {{&y, &dy}}, {{&x, &dx}});
                   c.expect_amax([&](Backend& be, int i, const Tensor* a,
                                     const Tensor*) { amax::rope_norm_bwd(be, x[i], co[i], si[i], r[i], dy[i], dx[i], a); },
                                 dx, "rope_norm_bwd amax");
                 },
                 small ? "cpu" : ""});
  }
}

// --- attention -------------------------------------------------------------------------------------
void naive_attention(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, int window, const std::vector<double>& q,
                     const std::vector<double>& k, const std::vector<double>& v, std::vector<double>& out,
                     std::vector<double>& lse) {
  out.assign(size_t(B * T * Hq * hd), 0.0);
  lse.assign(size_t(B * Hq * T), 0.0);
  const double scale = 1.0 / std::sqrt(double(hd));
  std::vector<double> s(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t p = 0; p < T; ++p) {
        const int64_t hk = h / (Hq / Hkv), j0 = window > 0 ? std::max<int64_t>(0, p - window) : 0;
        double m = -INFINITY, z = 0;
        for (int64_t j = j0; j <= p; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < hd; ++i)
            acc += q[size_t(((b * T + p) * Hq + h) * hd + i)] * k[size_t(((b * T + j) * Hkv + hk) * hd + i)];
          s[size_t(j)] = acc * scale;
          m = std::max(m, s[size_t(j)]);
        }
        for (int64_t j = j0; j <= p; ++j) z += std::exp(s[size_t(j)] - m);
        lse[size_t((b * Hq + h) * T + p)] = m + std::log(z);
        for (int64_t j = j0; j <= p; ++j)
          for (int64_t i = 0; i < hd; ++i)
            out[size_t(((b * T + p) * Hq + h) * hd + i)] +=
                std::exp(s[size_t(j)] - m) / z * v[size_t(((b * T + j) * Hkv + hk) * hd + i)];
      }
}

void attention(std::vector<OpCase>& t) {
  struct A {
    int64_t B, T, Hq, Hkv, hd;
    Role grad;
    int window;
  };
  // The first 13 are CUDA's paths (hd 64/128 cuDNN or the own tensor-core kernels, the others the
  // generic ones; T off the tiles, one head, one kv head, windows inside a tile, across tiles and
  // past T); then the naive-reference and finite-difference shapes.
  const A cases[] = {
      {2, 77, 4, 4, 64, Role::act, 0},   {1, 200, 6, 2, 64, Role::f32, 0},   {1, 130, 6, 2, 32, Role::act, 0},
      {1, 40, 2, 1, 128, Role::act, 0},  {2, 333, 4, 2, 128, Role::act, 0},  {1, 257, 1, 1, 128, Role::f32, 0},
      {1, 300, 4, 1, 64, Role::act, 100}, {2, 333, 4, 2, 128, Role::act, 150}, {1, 200, 2, 2, 128, Role::act, 7},
      {1, 190, 3, 1, 64, Role::f32, 64},  {1, 100, 2, 1, 128, Role::act, 500}, {1, 96, 2, 2, 96, Role::act, 30},
      {1, 70, 2, 1, 256, Role::act, 20},  {1, 33, 4, 1, 16, Role::f32, 0},     {1, 70, 4, 2, 128, Role::f32, 35},
      {1, 19, 2, 1, 32, Role::f32, 0},    {1, 19, 2, 1, 96, Role::f32, 0},     {1, 19, 2, 1, 256, Role::f32, 0},
      {1, 19, 2, 1, 64, Role::f32, 0},    {1, 19, 2, 1, 128, Role::f32, 0},
      {2, 7, 3, 3, 8, Role::f32, 0},      {2, 9, 6, 2, 4, Role::f32, 0},       {2, 11, 4, 2, 8, Role::f32, 3},
      {1, 9, 2, 1, 4, Role::f32, 1},      {1, 6, 2, 2, 4, Role::f32, 100},     {2, 5, 4, 2, 4, Role::f32, 0},
      {2, 8, 4, 2, 4, Role::f32, 2},      {1, 7, 2, 1, 8, Role::f32, 1},
  };
  for (const A a : cases) {
    const bool small = a.hd < 16;
    t.push_back(
        {"attention",
         dims({{"B", a.B}, {"T", a.T}, {"Hq", a.Hq}, {"Hkv", a.Hkv}, {"hd", a.hd}, {"window", a.window}}) + " grad " + rn(a.grad),
         {1e-5, 1e-2}, true, true,
         [a](OpCtx& c) {
           auto q = c.in({a.B, a.T, a.Hq, a.hd}), k = c.in({a.B, a.T, a.Hkv, a.hd}), v = c.in({a.B, a.T, a.Hkv, a.hd});
           auto o = c.out({a.B, a.T, a.Hq, a.hd}), lse = c.out({a.B, a.Hq, a.T}, Role::f32);
           auto fwd = [&](Backend& be, int i) { be.attention_fwd(q[i], k[i], v[i], o[i], lse[i], a.window); };
           c.run(fwd);
           c.expect(o, "attention_fwd out");
           c.expect(lse, "attention_fwd lse", c.tol_of({1e-6, 1e-4}));
           std::vector<double> wo, wl;
           naive_attention(a.B, a.T, a.Hq, a.Hkv, a.hd, a.window, c.values(q), c.values(k), c.values(v), wo, wl);
           c.expect_host(o, wo, "attention_fwd out against the naive softmax", 1e-11);
           c.expect_host(lse, wl, "attention_fwd lse against the naive softmax", 1e-11);
           // The backward from the reference's forward outputs, as the test side stores them.
           auto ob = c.again(o, Role::act), lb = c.again(lse, Role::f32);
           auto dout = c.in(o.shape());
           auto dq = c.out(q.shape(), a.grad), dk = c.out(k.shape(), a.grad), dv = c.out(v.shape(), a.grad);
           c.run([&](Backend& be, int i) {
             be.fill(dk[i], NAN);  // the backward overwrites, never accumulates
             be.attention_bwd(q[i], k[i], v[i], ob[i], lb[i], dout[i], dq[i], dk[i], dv[i], a.window);
           });
           c.expect(dq, "attention_bwd dq");
           c.expect(dk, "attention_bwd dk");
           c.expect(dv, "attention_bwd dv");
           if (a.T <= 12) {  // the oracle's backward from the unrounded forward outputs
             c.be(1).attention_bwd(q[1], k[1], v[1], o[1], lse[1], dout[1], dq[1], dk[1], dv[1], a.window);
             c.gradcheck(fwd, {{&o, &dout}}, {{&q, &dq}, {&k, &dk}, {&v, &dv}});
           }
         },
         small ? "cpu attention" : "attention"});
  }
  // Decoding: Tq new queries (the last Tq of S positions) against a cache. Tq = 1 a decode step,
  // Tq > 1 a prompt, S == Tq the whole sequence; windows inside, equal to and past the span.
  struct K {
    int64_t B, Tq, S, Hq, Hkv, hd;
    int window;
    Role dt;
  };
  const K kv[] = {
      {1, 1, 1, 6, 6, 128, 0, Role::act},    {1, 1, 37, 6, 6, 128, 0, Role::act},  {1, 1, 1000, 6, 2, 128, 0, Role::act},
      {1, 1, 1000, 6, 2, 128, 255, Role::act}, {1, 1, 300, 4, 1, 64, 7, Role::act}, {1, 17, 17, 4, 2, 64, 0, Role::act},
      {1, 40, 290, 4, 4, 64, 33, Role::act}, {2, 3, 129, 8, 2, 32, 0, Role::act},  {1, 5, 70, 2, 1, 96, 4000, Role::act},
      {1, 2, 90, 2, 2, 256, 20, Role::act},  {1, 1, 64, 2, 1, 16, 0, Role::act},   {2, 4, 200, 4, 2, 64, 50, Role::f32},
  };
  for (const K a : kv)
    t.push_back({"attention_cached",
                 dims({{"B", a.B}, {"Tq", a.Tq}, {"S", a.S}, {"Hq", a.Hq}, {"Hkv", a.Hkv}, {"hd", a.hd}, {"window", a.window}}) +
                     " " + rn(a.dt),
                 {1e-5, a.dt == Role::f32 ? 1e-4 : 1e-2}, true, false, [a](OpCtx& c) {
                   auto q = c.in({a.B, a.Tq, a.Hq, a.hd}, a.dt), k = c.in({a.B, a.S, a.Hkv, a.hd}, a.dt);
                   auto v = c.in({a.B, a.S, a.Hkv, a.hd}, a.dt), o = c.out({a.B, a.Tq, a.Hq, a.hd}, a.dt);
                   c.run([&](Backend& be, int i) { be.attention_cached_fwd(q[i], k[i], v[i], o[i], a.window); });
                   c.expect(o, "attention_cached_fwd");
                 }});
  // Sharp scores: one key dominates each row, which an unshifted softmax would overflow on.
  t.push_back({"attention_cached", "sharp scores B1 Tq2 S500 Hq4 Hkv2 hd64", {1e-5, 1e-2}, true, false, [](OpCtx& c) {
                 auto q = c.in({1, 2, 4, 64}, Role::act, 40.0), k = c.in({1, 500, 2, 64}, Role::act, 4.0);
                 auto v = c.in({1, 500, 2, 64}), o = c.out({1, 2, 4, 64});
                 c.run([&](Backend& be, int i) { be.attention_cached_fwd(q[i], k[i], v[i], o[i], 0); });
                 c.expect(o, "attention_cached_fwd with large scores");
               }});
  // The first S rows of a longer cache (a view), S == Tq: the reference runs attention_fwd.
  t.push_back({"attention_cached", "cache view against attention_fwd S100 of 256 Hq4 Hkv2 hd128 window30", {1e-5, 1e-2},
               true, false, [](OpCtx& c) {
                 const int64_t cap = 256, S = 100, Hkv = 2, hd = 128;
                 auto kc = c.in({1, cap, Hkv, hd}), vc = c.in({1, cap, Hkv, hd});
                 auto upto = [&](const Tensor& x) { return x.view({cap, Hkv * hd}).rows_slice(0, S).view({1, S, Hkv, hd}); };
                 auto q = c.in({1, S, 4, hd}), o = c.out({1, S, 4, hd}), lse = c.out({1, 4, S}, Role::f32);
                 c.run([&](Backend& be, int i) {
                   if (i == 0) be.attention_cached_fwd(q[i], upto(kc[i]), upto(vc[i]), o[i], 30);
                   else be.attention_fwd(q[i], upto(kc[i]), upto(vc[i]), o[i], lse[i], 30);
                 });
                 c.expect(o, "attention_cached_fwd on a cache view against attention_fwd");
               }});
}

// --- loss ------------------------------------------------------------------------------------------
void loss(std::vector<OpCase>& t) {
  // V: 1000 one CUDA block, 32768 a cluster of 4, 50304 of 7 (the last part-filled), 65536 of 8,
  // 100000 of 7 at 8 chunks a thread; 1001 the scalar kernel; 40 for finite differences. cap 15
  // shifts the log-sum-exp by cap; 0 (no cap) and 50 trade the row's maximum.
  for (const int64_t V : {1000, 1001, 32768, 50304, 65536, 100000, 40})
    for (const float cap : {15.f, 0.f, 50.f})
      for (const Role dt : {Role::f32, Role::act}) {
        if (V == 40 && dt == Role::act) continue;
        const int64_t N = V == 40 ? 6 : 29;
        t.push_back(
            {"softcap_xent", dims({{"N", N}, {"V", V}}) + " cap " + std::to_string(int(cap)) + " " + rn(dt),
             {1e-5, dt == Role::f32 ? 1e-4 : 1e-2}, true, true, [=](OpCtx& c) {
               std::vector<int32_t> tg(static_cast<size_t>(N));
               for (auto& x : tg) x = int32_t(c.rng().below(uint64_t(V)));
               tg[1] = -1;  // ignored rows
               tg[4] = -1;
               tg[2] = int32_t(V - 1);
               auto targets = c.i32({N}, tg);
               auto logits = c.in({N, V}, dt, V == 40 ? 5.0 : 8.0);
               auto losses = c.out({N}, Role::f32), dl = c.out({N, V}, dt);
               auto fwd = [&](Backend& be, int i) { be.softcap_xent(logits[i], targets[i], cap, 0.25f, losses[i], dl[i]); };
               c.run(fwd);
               c.expect(losses, "softcap_xent losses", c.tol_of({1e-6, 1e-4}));
               c.expect(dl, "softcap_xent dlogits");
               const std::vector<double> lv = c.values(logits);
               std::vector<double> want(size_t(N), 0.0);
               for (int64_t n = 0; n < N; ++n) {
                 if (tg[size_t(n)] < 0) continue;
                 double m = -INFINITY, z = 0;
                 std::vector<double> zc(static_cast<size_t>(V));
                 for (int64_t j = 0; j < V; ++j) {
                   const double x = lv[size_t(n * V + j)];
                   zc[size_t(j)] = cap > 0 ? cap * std::tanh(x / cap) : x;
                   m = std::max(m, zc[size_t(j)]);
                 }
                 for (double x : zc) z += std::exp(x - m);
                 want[size_t(n)] = m + std::log(z) - zc[size_t(tg[size_t(n)])];
               }
               c.expect_host(losses, want, "softcap_xent losses against the naive formula", 1e-11);
               // dlogits = grad_scale dL/dlogits: L = 0.25 sum(losses), i.e. w = 0.25 on every loss.
               auto w = c.from({N}, std::vector<double>(size_t(N), 0.25), Role::f32);
               if (V == 40) c.gradcheck(fwd, {{&losses, &w}}, {{&logits, &dl}}, 1e-6);
               c.expect_amax([&](Backend& be, int i, const Tensor* a,
                                 const Tensor*) { amax::softcap_xent(be, logits[i], targets[i], cap, 0.25f, losses[i], dl[i], a); },
                             dl, "softcap_xent amax");
               // In place: dlogits aliases logits, the same values as a separate dlogits.
               const std::vector<double> separate = c.values(dl, 0), separate_ref = c.values(dl, 1);
               auto l2 = c.out({N}, Role::f32);
               c.run([&](Backend& be, int i) { be.softcap_xent(logits[i], targets[i], cap, 0.25f, l2[i], logits[i]); });
               c.expect(logits, "softcap_xent with dlogits aliasing logits");
               c.expect(l2, "softcap_xent losses, aliased", c.tol_of({1e-6, 1e-4}));
               if (c.values(logits, 1) != separate_ref)
                 c.fail("softcap_xent: the reference's aliased dlogits differ from its separate ones (" + c.where(logits) + ")");
               if (nerr(c.values(logits, 0), separate) > c.tol())
                 c.fail("softcap_xent: aliased dlogits differ from separate ones (" + c.where(logits) + ")");
             }});
      }
}

// --- MoE routing and dispatch ------------------------------------------------------------------------
// Routing drawn on both sides: logits on a grid of 1/4 (exact ties, which go to the lower expert,
// and otherwise gaps no precision flips), or continuous for finite differences; top-k, then the
// plan. Index outputs must match exactly.
struct Moe {
  Two logits, probs, idx, gates, routed, counts, offsets, slot, row_token;
  int64_t T, E, k, kept;
};
Moe route(OpCtx& c, int64_t T, int64_t E, int64_t k, int capacity, DropOrder order, bool starved, bool grid,
          bool check = false) {
  Moe m;
  m.T = T, m.E = E, m.k = k;
  std::vector<double> lv = c.randn(T * E, 2.0);
  if (grid)
    for (auto& x : lv) x = std::round(x * 4) / 4;
  if (starved)
    for (int64_t i = 0; i < T; ++i) lv[size_t(i * E + 2)] = -30;  // expert 2 gets no rows
  m.logits = c.from({T, E}, lv, Role::f32);
  m.probs = c.out({T, E}, Role::f32), m.gates = c.out({T, k}, Role::f32), m.idx = c.out({T, k}, Role::i32);
  c.run([&](Backend& be, int i) { be.router_topk(m.logits[i], int(k), m.probs[i], m.idx[i], m.gates[i]); });
  m.routed = c.out({E}, Role::i32), m.counts = c.out({E}, Role::i32), m.offsets = c.out({E + 1}, Role::i32);
  m.slot = c.out({T * k}, Role::i32), m.row_token = c.out({T * k}, Role::i32);
  c.run([&](Backend& be, int i) {
    be.moe_plan(m.idx[i], int(E), capacity, m.routed[i], m.counts[i], m.offsets[i], m.slot[i], m.row_token[i], order);
  });
  m.kept = c.ints(m.offsets)[size_t(E)];
  if (check) {
    c.expect(m.probs, "router_topk probs", c.tol_of({1e-6, 1e-5}));
    c.expect_i32(m.idx, "router_topk indices");
    c.expect(m.gates, "router_topk gates", c.tol_of({1e-6, 1e-5}));
    if (c.oracle()) {  // softmax, top-k by descending probability (ties: lower expert), renormalized gates
      const std::vector<double> l = c.values(m.logits);
      const std::vector<int32_t> got = c.ints(m.idx);
      std::vector<double> wp, wg;
      size_t wrong = 0;
      for (int64_t i = 0; i < T; ++i) {
        double mx = -INFINITY, z = 0, sum = 0;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[size_t(i * E + e)]);
        for (int64_t e = 0; e < E; ++e) z += std::exp(l[size_t(i * E + e)] - mx);
        std::vector<std::pair<double, int64_t>> order;
        for (int64_t e = 0; e < E; ++e) {
          wp.push_back(std::exp(l[size_t(i * E + e)] - mx) / z);
          order.push_back({-wp.back(), e});
        }
        std::sort(order.begin(), order.end());
        for (int64_t j = 0; j < k; ++j) {
          sum -= order[size_t(j)].first;
          wrong += got[size_t(i * k + j)] != order[size_t(j)].second;
        }
        for (int64_t j = 0; j < k; ++j) wg.push_back(-order[size_t(j)].first / sum);
      }
      if (wrong) c.fail("router_topk: " + std::to_string(wrong) + " choices differ from the naive top-k (" + c.where(m.idx) + ")");
      c.expect_host(m.probs, wp, "router_topk probs against the naive softmax");
      c.expect_host(m.gates, wg, "router_topk gates against the naive renormalization");
    }
    for (const Two* x : {&m.routed, &m.counts, &m.offsets, &m.slot}) c.expect_i32(*x, "moe_plan");
    c.expect_i32(m.row_token, "moe_plan row_token", m.kept);
  }
  return m;
}

struct MoeShape {
  int64_t T, E, k;
  int capacity;
  bool starved;
  DropOrder order = DropOrder::rank;
  std::string tags = {};
  std::string str() const {
    return dims({{"T", T}, {"E", E}, {"k", k}, {"capacity", capacity}}) + (starved ? " expert 2 starved" : "") +
           (order == DropOrder::token ? " token order" : "");
  }
};

void moe(std::vector<OpCase>& t) {
  std::vector<MoeShape> shapes;
  // 3000 tokens: more assignments than CUDA's combine-backward amax grid has warps.
  for (bool starved : {false, true})
    for (int64_t T : {300, 3000})
      for (int cap : {0, 70}) shapes.push_back({T, 6, 2, cap, starved});
  shapes.push_back({300, 6, 2, 70, false, DropOrder::token});
  // 10,000 assignments: ten of CUDA's plan chunks; 40 experts: two balance-loss column blocks.
  for (int cap : {0, 200})
    for (DropOrder o : {DropOrder::rank, DropOrder::token}) shapes.push_back({2500, 40, 4, cap, false, o});
  shapes.push_back({12, 4, 2, 0, false});  // finite differences
  shapes.push_back({12, 4, 2, 5, false});

  for (const MoeShape& s : shapes) {
    // small: finite-difference shapes, widths below CUDA's vector loads and GEMM tiles (CPU only)
    const bool small = s.T <= 12, big = s.E == 40;
    t.push_back({"router_topk moe_plan balance_loss", s.str(), {1e-6, 1e-5}, true, false, [s](OpCtx& c) {
                   Moe m = route(c, s.T, s.E, s.k, s.capacity, s.order, s.starved, true, true);
                   if (s.starved && c.ints(m.counts)[2] != 0) c.fail("expert 2 must receive no rows (" + c.where(m.counts) + ")");
                   if (s.capacity && m.kept >= s.T * s.k && s.T > 12)
                     c.fail("the capacity must drop something to test the rule (" + c.where(m.counts) + ")");
                   auto bal = c.out({1}, Role::f32);
                   c.run([&](Backend& be, int i) { be.balance_loss(m.probs[i], m.routed[i], 0.01f, bal[i]); });
                   c.expect(bal, "balance_loss");
                   // balance loss = coef E sum_e f_e mean_t probs[t, e]
                   const std::vector<int32_t> r = c.ints(m.routed);
                   const std::vector<double> p = c.values(m.probs);
                   double want = 0, total = 0;
                   for (int32_t x : r) total += x;
                   for (int64_t e = 0; e < s.E; ++e) {
                     double mean = 0;
                     for (int64_t i = 0; i < s.T; ++i) mean += p[size_t(i * s.E + e)] / double(s.T);
                     want += double(r[size_t(e)]) / total * mean;
                   }
                   c.expect_host(bal, {double(0.01f) * double(s.E) * want}, "balance_loss against the formula", 1e-12);
                   if (s.order == DropOrder::token && s.E == 6) {  // the order reaches the plan
                     Moe rank = route(c, s.T, s.E, s.k, s.capacity, DropOrder::rank, false, true);
                     c.run([&](Backend& be, int i) {
                       be.moe_plan(m.idx[i], int(s.E), s.capacity, rank.routed[i], rank.counts[i], rank.offsets[i], rank.slot[i],
                                   rank.row_token[i], DropOrder::rank);
                     });
                     if (c.ints(rank.slot) == c.ints(m.slot)) c.fail("token-major order must differ from rank order here");
                   }
                 },
                 small ? "cpu" : ""});
    if (big) continue;
    const int64_t D = small ? 3 : 64, Hd = small ? 5 : 96;
    t.push_back({"moe_permute moe_permute_bwd", s.str() + dims({{" D", D}}), {1e-7, 1e-7}, true, true, [=](OpCtx& c) {
                   Moe m = route(c, s.T, s.E, s.k, s.capacity, s.order, s.starved, !small);
                   auto x = c.in({s.T, D}), xp = c.out({s.T * s.k, D});
                   auto fwd = [&](Backend& be, int i) { be.moe_permute(x[i], m.row_token[i], m.offsets[i], xp[i]); };
                   c.run(fwd);
                   c.expect(xp, "moe_permute", m.kept);
                   c.expect_amax([&](Backend& be, int i, const Tensor* a,
                                     const Tensor*) { amax::moe_permute(be, x[i], m.row_token[i], m.offsets[i], xp[i], a); },
                                 xp, "moe_permute amax", &m.offsets);
                   auto dxp = c.in({s.T * s.k, D}), dx = c.in({s.T, D}, Role::f32);
                   const std::vector<double> base = c.values(dx);
                   c.run([&](Backend& be, int i) { be.moe_permute_bwd(dxp[i], m.slot[i], dx[i]); });
                   c.expect(dx, "moe_permute_bwd", c.tol_of({1e-6, 1e-5}));
                   // Rows past offsets[E] are left alone: L over the kept rows only.
                   std::vector<double> w = c.values(dxp);
                   std::fill(w.begin() + m.kept * D, w.end(), 0.0);
                   auto wk = c.from(dxp.shape(), w);
                   if (small) c.gradcheck(fwd, {{&xp, &wk}}, {{&x, &dx, base}});
                 },
                 small ? "cpu" : ""});
    t.push_back({"moe_combine moe_combine_bwd", s.str() + dims({{" D", D}}), {1e-5, 1e-2}, true, true, [=](OpCtx& c) {
                   Moe m = route(c, s.T, s.E, s.k, s.capacity, s.order, s.starved, !small);
                   auto yp = c.in({s.T * s.k, D}), gates = c.again(m.gates, Role::f32);
                   for (bool acc : {false, true}) {
                     auto y = c.in({s.T, D});
                     c.run([&](Backend& be, int i) { be.moe_combine(yp[i], m.slot[i], gates[i], y[i], acc); });
                     c.expect(y, std::string("moe_combine") + (acc ? " accumulate" : ""));
                   }
                   auto y = c.out({s.T, D});
                   auto fwd = [&](Backend& be, int i) { be.moe_combine(yp[i], m.slot[i], gates[i], y[i], false); };
                   c.run(fwd);
                   auto dy = c.in({s.T, D}), dyp = c.out({s.T * s.k, D}), dg = c.out({s.T, s.k}, Role::f32);
                   c.run([&](Backend& be, int i) { be.moe_combine_bwd(dy[i], yp[i], m.slot[i], gates[i], dyp[i], dg[i]); });
                   c.expect(dg, "moe_combine_bwd dgates", c.tol_of({1e-6, 1e-3}));
                   c.expect(dyp, "moe_combine_bwd dyp", m.kept);
                   c.expect_amax([&](Backend& be, int i, const Tensor* a, const Tensor* o) {
                     amax::moe_combine_bwd(be, dy[i], yp[i], m.slot[i], gates[i], dyp[i], dg[i], a, o);
                   }, dyp, "moe_combine_bwd amax", &m.offsets);
                   c.expect(dg, "moe_combine_bwd dgates from the runs with an amax", c.tol_of({1e-6, 1e-3}));
                   if (small) {
                     c.gradcheck(fwd, {{&y, &dy}}, {{&gates, &dg}});
                     c.gradcheck(fwd, {{&y, &dy}}, {{&yp, &dyp}});
                   }
                 },
                 small ? "cpu" : ""});
    t.push_back({"grouped_matmul grouped_matmul_wgrad relu2", s.str() + dims({{" D", D}, {"H", Hd}}), {1e-5, 1e-2}, true,
                 true, [=](OpCtx& c) {
                   Moe m = route(c, s.T, s.E, s.k, s.capacity, s.order, s.starved, !small);
                   const int64_t R = s.T * s.k;
                   auto xp = c.in({R, D}), w1 = c.in({s.E, Hd, D}, Role::act, 0.2), w2 = c.in({s.E, Hd, D}, Role::act, 0.2);
                   auto h = c.out({R, Hd});
                   c.run([&](Backend& be, int i) { be.fill(h[i], 0.f); });
                   auto up = [&](Backend& be, int i) { be.grouped_matmul(xp[i], w1[i], true, h[i], m.offsets[i]); };
                   c.run(up);
                   c.expect(h, "grouped_matmul trans_w", m.kept);
                   auto hb = c.again(h, Role::act);
                   auto yp = c.out({R, D}, Role::f32);
                   c.run([&](Backend& be, int i) {
                     be.fill(yp[i], 0.f);
                     be.grouped_matmul(hb[i], w2[i], false, yp[i], m.offsets[i]);
                   });
                   c.expect(yp, "grouped_matmul no trans, f32 out", m.kept);
                   // ReLU² over the experts' rows with each expert's amax.
                   auto act = c.out({R, Hd}), dact = c.in({R, Hd}), dhh = c.out({R, Hd});
                   c.run([&](Backend& be, int i) { be.relu2_fwd(hb[i], act[i]); });
                   c.expect(act, "relu2_fwd over experts' rows");
                   c.expect_amax([&](Backend& be, int i, const Tensor* a, const Tensor* o) { amax::relu2_fwd(be, hb[i], act[i], a, o); },
                                 act, "relu2_fwd amax", &m.offsets);
                   c.run([&](Backend& be, int i) { be.relu2_bwd(hb[i], dact[i], dhh[i]); });
                   c.expect(dhh, "relu2_bwd over experts' rows");
                   c.expect_amax([&](Backend& be, int i, const Tensor* a,
                                     const Tensor* o) { amax::relu2_bwd(be, hb[i], dact[i], dhh[i], a, o); },
                                 dhh, "relu2_bwd amax", &m.offsets);
                   // Weight gradients dW [E, N, K] = dY^T X per expert: f32 with beta 0 and 1, and act.
                   auto dh = c.in({R, Hd});
                   for (float beta : {0.f, 1.f}) {
                     auto dw = c.in({s.E, Hd, D}, Role::f32);
                     c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad(dh[i], xp[i], dw[i], m.offsets[i], beta); });
                     c.expect(dw, "grouped_matmul_wgrad f32 beta " + std::to_string(int(beta)), c.tol_of({1e-5, 1e-4}));
                   }
                   auto dwb = c.out({s.E, Hd, D});
                   c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad(dh[i], xp[i], dwb[i], m.offsets[i], 0.f); });
                   c.expect(dwb, "grouped_matmul_wgrad act");
                   if (small) {  // gradients of the up projection: dX = dH W (no trans) and dW
                     std::vector<double> w = c.values(dh);
                     std::fill(w.begin() + m.kept * Hd, w.end(), 0.0);
                     auto dk = c.from(dh.shape(), w);
                     auto dx = c.out({R, D}, Role::f32), dw = c.out({s.E, Hd, D}, Role::f32);
                     c.run([&](Backend& be, int i) {
                       be.fill(dx[i], 0.f);
                       be.grouped_matmul(dk[i], w1[i], false, dx[i], m.offsets[i]);
                       be.fill(dw[i], 0.f);
                       be.grouped_matmul_wgrad(dk[i], xp[i], dw[i], m.offsets[i], 0.f);
                     });
                     c.gradcheck(up, {{&h, &dk}}, {{&xp, &dx}, {&w1, &dw}});
                   }
                 },
                 small ? "cpu" : ""});
    t.push_back({"router_bwd", s.str(), {1e-5, 1e-4}, true, true, [=](OpCtx& c) {
                   Moe m = route(c, s.T, s.E, s.k, s.capacity, s.order, s.starved, !small);
                   auto dg = c.in({s.T, s.k}, Role::f32), dl = c.out({s.T, s.E}, Role::f32);
                   auto probs = c.again(m.probs, Role::f32), gates = c.again(m.gates, Role::f32);
                   c.run([&](Backend& be, int i) {
                     be.router_bwd(probs[i], m.idx[i], gates[i], dg[i], m.routed[i], 0.01f, 2.f, dl[i]);
                   });
                   c.expect(dl, "router_bwd");
                   if (!small) return;
                   // L = <gates, dgates> + 2 x balance loss; top-k and routed held fixed (continuous logits
                   // keep the choice stable under the small steps).
                   auto bal = c.out({1}, Role::f32), two = c.from({1}, {2.0}, Role::f32);
                   auto idx2 = c.out({s.T, s.k}, Role::i32);
                   auto fwd = [&](Backend& be, int i) {
                     be.router_topk(m.logits[i], int(s.k), m.probs[i], idx2[i], m.gates[i]);
                     be.balance_loss(m.probs[i], m.routed[i], 0.01f, bal[i]);
                   };
                   c.run([&](Backend& be, int i) {
                     be.router_bwd(m.probs[i], m.idx[i], m.gates[i], dg[i], m.routed[i], 0.01f, 2.f, dl[i]);
                   });
                   c.gradcheck(fwd, {{&m.gates, &dg}, {&bal, &two}}, {{&m.logits, &dl}}, 1e-6);
                   if (c.ints(idx2) != c.ints(m.idx)) c.fail("top-k flipped under the finite-difference step");
                 },
                 small ? "cpu" : ""});
  }
}

// --- expert GEMM edge shapes -------------------------------------------------------------------------
// Rows [off[e], off[e+1]) of A [R, K] times W[e] ([E, N, K] when trans_w, else [E, K, N]), in
// double; the rows past off[E] zero, as the reference's output starts.
std::vector<double> naive_grouped(const std::vector<double>& A, const std::vector<double>& W, bool trans_w,
                                  const std::vector<int32_t>& off, int64_t R, int64_t N, int64_t K) {
  std::vector<double> C(size_t(R * N), 0.0);
  for (size_t e = 0; e + 1 < off.size(); ++e)
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += A[size_t(r * K + k)] *
               (trans_w ? W[size_t((int64_t(e) * N + n) * K + k)] : W[size_t((int64_t(e) * K + k) * N + n)]);
        C[size_t(r * N + n)] = s;
      }
  return C;
}

void grouped(std::vector<OpCase>& t) {
  // An empty expert, a one-row expert and spare rows past offsets[E]; N = 136 leaves a partial
  // tile; the data gradient's K 256 reads W in place on CUDA, 264 transposes it first.
  const std::vector<int32_t> off = {0, 0, 1, 250, 251, 640};
  t.push_back({"grouped_matmul", "uneven, empty expert E5 R700 N264 K136", {1e-5, 1e-2}, true, false, [off](OpCtx& c) {
                 auto o = c.i32({6}, off);
                 auto A = c.in({700, 136}), W = c.in({5, 264, 136}, Role::act, 0.1), C = c.out({700, 264});
                 c.run([&](Backend& be, int i) { be.grouped_matmul(A[i], W[i], true, C[i], o[i]); });
                 c.expect(C, "grouped_matmul uneven", c.tol(), 640);
                 // Empty experts skipped, rows past the last expert untouched.
                 c.expect_host(C, naive_grouped(c.values(A), c.values(W), true, off, 700, 264, 136),
                               "grouped_matmul against the per-expert product", 1e-12);
                 auto dW = c.in({5, 264, 136}, Role::f32), dY = c.in({700, 264});
                 c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad(dY[i], A[i], dW[i], o[i], 1.f); });
                 c.expect(dW, "grouped_matmul_wgrad uneven", c.tol_of({1e-5, 1e-4}));
               }});
  for (int64_t Kd : {256, 264})
    t.push_back({"grouped_matmul", "uneven, W not transposed E5 R700 K" + std::to_string(Kd) + " N136", {1e-5, 1e-4}, true,
                 false, [off, Kd](OpCtx& c) {
                   auto o = c.i32({6}, off);
                   auto A = c.in({700, Kd}), W = c.in({5, Kd, 136}, Role::act, 0.1), C = c.out({700, 136}, Role::f32);
                   c.run([&](Backend& be, int i) {
                     be.fill(C[i], 0.f);
                     be.grouped_matmul(A[i], W[i], false, C[i], o[i]);
                   });
                   c.expect(C, "grouped_matmul no trans", c.tol(), 640);
                   c.expect_host(C, naive_grouped(c.values(A), c.values(W), false, off, 700, 136, Kd),
                                 "grouped_matmul no trans against the per-expert product", 1e-12);
                 }});
  // ReLU² folded into the grouped GEMM's store: the up projection's forward storing h and relu²(h),
  // the down projection's data gradient storing relu2_bwd(h, dA) with W read in place (K 256) and
  // transposed first (264). Each side's folded result must be its unfolded ops' bits; the FP8
  // fold fields are refused.
  for (const int64_t Kd : {0, 256, 264})
    t.push_back({"grouped_matmul_relu2",
                 (Kd ? "data gradient E5 R700 K" + std::to_string(Kd) : std::string("forward E5 R700 K192")) + " N136",
                 {1e-5, 1e-2}, true, Kd != 0, [off, Kd](OpCtx& c) {
                   const int64_t R = 700, N = 136, K = Kd ? Kd : 192;
                   auto o = c.i32({6}, off);
                   auto A = c.in({R, K}), W = c.in(Kd ? Shape{5, K, N} : Shape{5, N, K}, Role::act, 0.1);
                   auto h = c.in({R, N}), out = c.out({R, N}), side = c.out({R, N}), ref = c.out({R, N}), ref2 = c.out({R, N});
                   c.run([&](Backend& be, int i) {
                     ExpertRelu2Fold fold;
                     if (Kd) fold.relu2_input = &h[i];
                     else fold.relu2_output = &side[i];
                     be.grouped_matmul_relu2(A[i], W[i], !Kd, out[i], o[i], fold);
                     be.grouped_matmul(A[i], W[i], !Kd, ref[i], o[i]);
                     if (Kd) be.relu2_bwd(h[i], ref[i], ref2[i]);
                     else be.relu2_fwd(ref[i], ref2[i]);
                   });
                   const Two& folded = Kd ? out : side;
                   c.expect(folded, Kd ? "dh" : "relu2(h)", c.tol(), 640);
                   if (!Kd) c.expect(out, "h", c.tol(), 640);
                   for (int s = 0; s < 2; ++s) {
                     const size_t n = size_t(640 * N);
                     std::vector<double> a = c.values(folded, s), b = c.values(ref2, s), x = c.values(out, s), y = c.values(ref, s);
                     a.resize(n), b.resize(n), x.resize(n), y.resize(n);
                     if (std::memcmp(a.data(), b.data(), n * sizeof(double)) != 0 || (!Kd && x != y))
                       c.fail("grouped_matmul_relu2 differs from the unfolded ops on side " + std::to_string(s) + " (" +
                              c.where(out) + ")");
                     ExpertRelu2Fold fp8_only;
                     fp8_only.relu2_operand = true;
                     bool threw = false;
                     try {
                       c.be(s).grouped_matmul_relu2(A[s], W[s], !Kd, out[s], o[s], fp8_only);
                     } catch (const Error&) {
                       threw = true;
                     }
                     if (!threw) c.fail("grouped_matmul_relu2 must refuse the FP8 fold fields (side " + std::to_string(s) + ")");
                   }
                 }});
  // Newton-Schulz's fused sums: C = alpha A W^T + beta addend, separate and in place; dW with an addend.
  t.push_back({"grouped_matmul", "alpha beta addend E3 R150 N64 K96", {1e-5, 1e-2}, true, false, [](OpCtx& c) {
                 auto o = c.i32({4}, {0, 40, 40, 150});
                 auto a = c.in({150, 96}), w = c.in({3, 64, 96}), addend = c.in({150, 64}), C = c.out({150, 64});
                 const std::vector<int32_t> off3 = {0, 40, 40, 150};
                 const std::vector<double> prod = naive_grouped(c.values(a), c.values(w), true, off3, 150, 64, 96);
                 std::vector<double> add0 = c.values(addend), want(prod.size());
                 c.run([&](Backend& be, int i) { be.grouped_matmul(a[i], w[i], true, C[i], o[i], 0.5f, -2.0f, &addend[i]); });
                 c.expect(C, "grouped_matmul alpha, beta, addend");
                 for (size_t i = 0; i < want.size(); ++i) want[i] = 0.5f * prod[i] - 2.0 * add0[i];
                 c.expect_host(C, want, "alpha A W^T + beta addend", 1e-12);
                 c.run([&](Backend& be, int i) { be.grouped_matmul(a[i], w[i], true, addend[i], o[i], 1.0f, 3.4445f, &addend[i]); });
                 c.expect(addend, "grouped_matmul addend in place");
                 for (size_t i = 0; i < want.size(); ++i) want[i] = prod[i] + double(3.4445f) * add0[i];
                 c.expect_host(addend, want, "A W^T + beta C in place", 1e-12);
                 auto dy = c.in({150, 64}), x = c.in({150, 96}), base = c.in({3, 64, 96}), dw = c.out({3, 64, 96});
                 c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad(dy[i], x[i], dw[i], o[i], 3.4445f, &base[i]); });
                 c.expect(dw, "grouped_matmul_wgrad addend");
                 // dW[e] = dY_e^T X_e + beta base[e], by the host
                 const std::vector<double> dyv = c.values(dy), xv = c.values(x), bv = c.values(base);
                 std::vector<double> wd(bv.size());
                 for (int64_t e = 0; e < 3; ++e)
                   for (int64_t n = 0; n < 64; ++n)
                     for (int64_t k = 0; k < 96; ++k) {
                       double sum = 0;
                       for (int64_t r = off3[size_t(e)]; r < off3[size_t(e) + 1]; ++r) sum += dyv[size_t(r * 64 + n)] * xv[size_t(r * 96 + k)];
                       const size_t at = size_t((e * 64 + n) * 96 + k);
                       wd[at] = sum + double(3.4445f) * bv[at];
                     }
                 c.expect_host(dw, wd, "dY^T X + beta addend", 1e-12);
               }});
  // A weight gradient over no rows (a rank that received no tokens): beta dW, or the addend.
  for (Role dt : {Role::f32, Role::act})
    for (float beta : {0.f, 0.5f, 1.f})
      t.push_back({"grouped_matmul_wgrad", std::string("no rows E3 N64 K96 ") + rn(dt) + " beta " + std::to_string(beta),
                   {1e-7, 1e-7}, true, false, [dt, beta](OpCtx& c) {
                     auto o = c.i32({4}, {0, 0, 0, 0});
                     auto dy = c.in({0, 64}), x = c.in({0, 96}), dw = c.in({3, 64, 96}, dt);
                     std::vector<double> want = c.values(dw);
                     for (auto& v : want) v *= beta;
                     c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad(dy[i], x[i], dw[i], o[i], beta); });
                     c.expect(dw, "grouped_matmul_wgrad over no rows");
                     c.expect_host(dw, want, "beta times the old dW", 0);
                     auto dw2 = c.in({3, 64, 96}, Role::f32), addend = c.in({3, 64, 96}, Role::f32);
                     c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad(dy[i], x[i], dw2[i], o[i], 1.f, &addend[i]); });
                     if (c.values(dw2, 0) != c.values(addend, 0)) c.fail("no rows with an addend: dW must be the addend");
                   }});
}

// --- residual mixing and value embeddings ------------------------------------------------------------
void residual(std::vector<OpCase>& t) {
  struct S {
    int64_t N, D, H, hd, C;
  };
  for (const S s : {S{203, 96, 3, 32, 32}, S{5, 6, 2, 3, 4}}) {
    const bool small = s.N < 10;  // finite differences; widths below CUDA's vector loads (CPU only)
    t.push_back({"lambda_mix", dims({{"N", s.N}, {"D", s.D}}), {1e-6, 1e-2}, true, true, [s, small](OpCtx& c) {
                   std::vector<double> av = c.randn(1), bv = c.randn(1);
                   // |a|, |b| >= 0.5: a scalar near zero would leave the differences' rounding a large share.
                   av[0] = std::copysign(0.5 + std::fabs(av[0]), av[0]);
                   bv[0] = std::copysign(0.5 + std::fabs(bv[0]), bv[0]);
                   auto a = c.from({1}, av, Role::f32), b = c.from({1}, bv, Role::f32);
                   auto x = c.in({s.N, s.D}), x0 = c.in({s.N, s.D}), y = c.out({s.N, s.D});
                   auto fwd = [&](Backend& be, int i) { be.lambda_mix_fwd(a[i], x[i], b[i], x0[i], y[i]); };
                   c.run(fwd);
                   c.expect(y, "lambda_mix_fwd");
                   auto dy = c.in({s.N, s.D}), dx = c.out({s.N, s.D}), dx0 = c.in({s.N, s.D});
                   auto da = c.in({1}, Role::f32), db = c.in({1}, Role::f32);
                   const std::vector<double> b0 = c.values(dx0), ba = c.values(da), bb = c.values(db);
                   c.run([&](Backend& be, int i) {
                     be.lambda_mix_bwd(a[i], x[i], b[i], x0[i], dy[i], dx[i], dx0[i], da[i], db[i]);
                   });
                   c.expect(dx, "lambda_mix_bwd dx");
                   c.expect(dx0, "lambda_mix_bwd dx0");
                   c.expect(da, "lambda_mix_bwd da", c.tol_of({1e-6, 1e-4}));
                   c.expect(db, "lambda_mix_bwd db", c.tol_of({1e-6, 1e-4}));
                   if (small) c.gradcheck(fwd, {{&y, &dy}}, {{&x, &dx}, {&x0, &dx0, b0}, {&a, &da, ba}, {&b, &db, bb}});
                   // dx aliasing dy, as the model calls it.
                   c.run([&](Backend& be, int i) {
                     be.lambda_mix_bwd(a[i], x[i], b[i], x0[i], dy[i], dy[i], dx0[i], da[i], db[i]);
                   });
                   c.expect(dy, "lambda_mix_bwd dx aliasing dy");
                 },
                 small ? "cpu" : ""});
    t.push_back({"value_gate", dims({{"N", s.N}, {"D", s.D}, {"H", s.H}, {"hd", s.hd}, {"C", s.C}}), {1e-6, 1e-2}, true,
                 true, [s, small](OpCtx& c) {
                   auto x = c.in({s.N, s.D}), w = c.in({s.H, s.C}, Role::act, 0.3), ve = c.in({s.N, s.H * s.hd});
                   auto v = c.in({s.N, s.H * s.hd}), gate = c.out({s.N, s.H}, Role::f32);
                   auto v0 = c.again(v, Role::act);
                   auto fwd = [&](Backend& be, int i) {
                     be.copy(v0[i], v[i]);
                     be.value_gate_fwd(x[i], w[i], ve[i], v[i], gate[i]);
                   };
                   c.run(fwd);
                   c.expect(gate, "value_gate_fwd gate", c.tol_of({1e-6, 1e-4}));
                   c.expect(v, "value_gate_fwd v");
                   auto dv = c.in({s.N, s.H * s.hd}), dve = c.out({s.N, s.H * s.hd});
                   auto dw = c.in({s.H, s.C}, Role::f32), dx = c.in({s.N, s.D});
                   const std::vector<double> bw = c.values(dw), bx = c.values(dx);
                   c.run([&](Backend& be, int i) { be.value_gate_bwd(x[i], w[i], ve[i], gate[i], dv[i], dve[i], dw[i], dx[i]); });
                   c.expect(dve, "value_gate_bwd dve");
                   c.expect(dw, "value_gate_bwd dw", c.tol_of({1e-6, 1e-3}));
                   c.expect(dx, "value_gate_bwd dx");
                   if (small) c.gradcheck(fwd, {{&v, &dv}}, {{&ve, &dve}, {&w, &dw, bw}, {&x, &dx, bx}});
                 },
                 small ? "cpu" : ""});
  }
}

// --- optimizers ----------------------------------------------------------------------------------------
void optim(std::vector<OpCase>& t) {
  AdamWStep st;
  st.lr = 0.01f, st.beta1 = 0.8f, st.weight_decay = 0.1f, st.eps = 1e-10f, st.step = 3;
  // 123 x 77 takes CUDA's one-element kernels, 64 x 136 the 8-wide ones.
  for (const Shape& s : {Shape{123, 77}, Shape{64, 136}}) {
    const std::string sh = dims({{"rows", s[0]}, {"cols", s[1]}});
    t.push_back({"adamw_update", sh + " 3 steps", {1e-6, 2e-6}, true, false, [s, st](OpCtx& c) {
                   auto p = c.in(s, Role::f32), g = c.in(s, Role::f32), m = c.in(s, Role::f32, 0.1);
                   std::vector<double> vv = c.randn(numel(s), 0.1);
                   for (auto& x : vv) x *= x;
                   auto v = c.from(s, vv, Role::f32);
                   std::vector<double> wp = c.values(p), wm = c.values(m), wv = c.values(v);
                   const std::vector<double> g0 = c.values(g);
                   const double b1 = st.beta1, b2 = st.beta2;
                   // Three steps (counters 3, 4, 5: the bias corrections change) on the same gradient.
                   for (int64_t step = st.step; step < st.step + 3; ++step) {
                     const double c1 = 1 - std::pow(b1, double(step)), c2 = 1 - std::pow(b2, double(step));
                     for (size_t i = 0; i < wp.size(); ++i) {
                       wm[i] = b1 * wm[i] + (1 - b1) * g0[i];
                       wv[i] = b2 * wv[i] + (1 - b2) * g0[i] * g0[i];
                       wp[i] = wp[i] * (1 - double(st.lr) * double(st.weight_decay)) -
                               double(st.lr) * (wm[i] / c1) / (std::sqrt(wv[i] / c2) + double(st.eps));
                     }
                   }
                   c.run([&](Backend& be, int i) {
                     AdamWStep s2 = st;
                     for (int k = 0; k < 3; ++k, ++s2.step) be.adamw_update(p[i], g[i], m[i], v[i], s2);
                   });
                   c.expect(p, "adamw param");
                   c.expect(m, "adamw m");
                   c.expect(v, "adamw v");
                   c.expect_host(p, wp, "adamw param against the formula", 1e-9);
                   c.expect_host(m, wm, "adamw m against the formula", 1e-9);
                   c.expect_host(v, wv, "adamw v against the formula", 1e-9);
                 }});
    for (bool nesterov : {true, false})
      t.push_back({"muon_momentum", sh + (nesterov ? " nesterov" : ""), {1e-6, 1e-2}, true, false, [s, nesterov](OpCtx& c) {
                     auto g = c.in(s, Role::f32), buf = c.in(s, Role::f32), u = c.out(s);
                     c.run([&](Backend& be, int i) { be.muon_momentum(g[i], buf[i], u[i], 0.9f, nesterov); });
                     c.expect(buf, "muon_momentum buffer", c.tol_of({1e-6, 1e-6}));
                     c.expect(u, "muon_momentum update");
                   }});
  }
  // group_amax: 3 parts (one holding a large weight), 300 (past CUDA's shared array), 5 of 77
  // (its fallback).
  for (auto [parts, per] : {std::pair<int64_t, int64_t>{3, 120}, {300, 120}, {5, 77}})
    t.push_back({"adamw_update", dims({{"parts", parts}, {"per", per}}) + " group amax", {1e-6, 1e-6}, true, false,
                 [parts = parts, per = per, st](OpCtx& c) {
                   std::vector<double> pv = c.randn(parts * per);
                   pv[size_t(per + 5)] = 30.0;
                   auto p0 = c.from({parts, per}, pv, Role::f32), p = c.again(p0, Role::f32);
                   auto g = c.in({parts, per}, Role::f32), m0 = c.in({parts, per}, Role::f32, 0.1);
                   auto v0 = c.from({parts, per}, std::vector<double>(size_t(parts * per), 0.01), Role::f32);
                   auto m = c.again(m0, Role::f32), v = c.again(v0, Role::f32);
                   std::vector<int32_t> off;
                   for (int32_t e = 0; e <= parts; ++e) off.push_back(e);
                   auto o = c.i32({parts + 1}, off);
                   c.expect_amax(
                       [&](Backend& be, int i, const Tensor* a, const Tensor*) {
                         be.copy(p0[i], p[i]);
                         be.copy(m0[i], m[i]);
                         be.copy(v0[i], v[i]);
                         amax::adamw_update(be, p[i], g[i], m[i], v[i], st, a);
                       },
                       p, "adamw_update group amax", &o);
                   c.expect(p, "adamw param with a group amax");
                 }});
  t.push_back({"frobenius_normalize", "rows123 cols77", {1e-6, 1e-2}, true, false, [](OpCtx& c) {
                 auto x = c.in({123, 77}), y = c.out({123, 77});
                 c.run([&](Backend& be, int i) { be.frobenius_normalize(x[i], y[i], 1e-7f); });
                 c.expect(y, "frobenius_normalize");
                 double n = 0;
                 for (double v : c.values(y)) n += v * v;
                 c.expect_host(c.from({1}, {1.0}, Role::f32), {std::sqrt(n)}, "unit norm", 1e-6);
               }});
  // Batched: each slice by its own norm; slice scales differ by 10^4, so a joint norm would fail.
  t.push_back({"frobenius_normalize_batched", "G5 rows24 cols40", {1e-6, 1e-2}, true, false, [](OpCtx& c) {
                 std::vector<double> v = c.randn(5 * 24 * 40);
                 for (size_t i = 0; i < v.size(); ++i) v[i] *= std::pow(10.0, double(i / (24 * 40)) - 2.0);
                 auto x = c.from({5, 24, 40}, v), y = c.out({5, 24, 40});
                 c.run([&](Backend& be, int i) { be.frobenius_normalize_batched(x[i], y[i], 1e-7f); });
                 for (int64_t e = 0; e < 5; ++e) {
                   Two slice;
                   slice[0] = y[0].index(e), slice[1] = y[1].index(e);
                   c.expect(slice, "frobenius_normalize_batched slice " + std::to_string(e));
                 }
               }});
  // NorMuon's tail on a tall and a wide stack (per-row and per-column statistics), two steps.
  for (const Shape& s : {Shape{3, 48, 24}, Shape{2, 16, 40}})
    for (bool cautious : {true, false})
      t.push_back({"normuon_update", dims({{"G", s[0]}, {"m", s[1]}, {"n", s[2]}}) + (cautious ? " cautious" : ""),
                   {1e-6, 1e-4}, true, false, [s, cautious](OpCtx& c) {
                     auto x = c.in(s, Role::act, 0.1), p = c.in(s, Role::f32);
                     const int64_t kept = s[1] >= s[2] ? s[1] : s[2];
                     std::vector<double> v0 = c.randn(s[0] * kept);
                     for (auto& e : v0) e = std::fabs(e) * 1e-2;
                     auto v2 = c.from({s[0] * kept}, v0, Role::f32);
                     NorMuonStep st;
                     st.lr = 0.05f, st.weight_decay = 0.3f, st.cautious = cautious;
                     c.run([&](Backend& be, int i) {
                       for (int step = 0; step < 2; ++step) be.normuon_update(x[i], v2[i], p[i], st);
                     });
                     c.expect(v2, "normuon second moment");
                     c.expect(p, "normuon params");
                   }});
}

// --- FP8 -----------------------------------------------------------------------------------------------
const Fp8Granularity kAllGran[] = {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128,
                                   Fp8Granularity::block_128x128};

// bf16-representable values with row magnitudes spread over 1e-3..1e3.
std::vector<double> spread(OpCtx& c, int64_t rows, int64_t cols) {
  std::vector<double> v(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      v[size_t(r * cols + k)] = round_to_bf16(float(c.rng().normal() * std::pow(10.0, double((r * 7 + k / 37) % 7) - 3)));
  return v;
}

struct Q {
  Two data, scale;
  Fp8Granularity g;
  QuantizedOperand at(int s) const { return {data[s], scale[s], g}; }
};
Q operand(OpCtx& c, int64_t rows, int64_t k, Fp8Granularity g, DType fmt) {
  Q q;
  q.g = g;
  for (int s = 0; s < 2; ++s) {
    q.data[s] = c.be(s).alloc({rows, k}, fmt);
    q.scale[s] = c.be(s).alloc(fp8_scale_shape(g, rows, k), DType::f32);
    c.be(s).fill(q.scale[s], NAN);
  }
  return q;
}
// x quantized on both sides; the codes and scales must be the same bits.
Q quantize(OpCtx& c, const Two& x, bool tr, Fp8Granularity g, DType fmt, const std::string& what, bool check = true) {
  const int64_t rows = tr ? x.shape()[1] : x.shape()[0], k = tr ? x.shape()[0] : x.shape()[1];
  Q q = operand(c, rows, k, g, fmt);
  c.run([&](Backend& be, int i) {
    QuantizedOperand o = q.at(i);
    be.quantize_fp8(x[i], tr, o);
  });
  if (!check) return q;
  Two codes, scales;
  for (int s = 0; s < 2; ++s) codes[s] = q.data[s], scales[s] = q.scale[s];
  const std::vector<uint8_t> a = c.bytes(codes, 0), b = c.bytes(codes, 1);
  const std::vector<double> sa = c.values(scales, 0), sb = c.values(scales, 1);
  size_t diff = a.size() == b.size() ? 0 : 1, sdiff = 0, bad = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) diff += a[i] != b[i];
  for (size_t i = 0; i < sa.size(); ++i) {
    sdiff += sa[i] != sb[i];
    bad += !(std::isfinite(sa[i]) && sa[i] > 0);
  }
  if (diff || sdiff || bad)
    c.fail(what + ": " + std::to_string(diff) + " codes and " + std::to_string(sdiff) + " scales differ, " +
           std::to_string(bad) + " scales not finite and positive (" + c.where(codes) + ")");
  return q;
}

void fp8(std::vector<OpCase>& t) {
  // Every granularity, format and orientation, partial 128-tiles both ways, bit for bit; then
  // the edge cases (all zero, one huge value, an infinity, denormals) give finite scales.
  for (const char* kind : {"spread", "all zero", "one huge value", "one infinity", "denormals"}) {
    const std::string k = kind;
    const int64_t xr = k == "spread" ? 272 : 144, xc = k == "spread" ? 400 : 160;
    for (Fp8Granularity g : kAllGran)
      for (DType fmt : {DType::e4m3, DType::e5m2})
        for (bool tr : {false, true})
          t.push_back({"quantize_fp8",
                       k + " " + dims({{"rows", xr}, {"cols", xc}}) + " " + fp8_granularity_name(g) + " " + dtype_name(fmt) +
                           (tr ? " transposed" : ""),
                       {0, 0}, true, false, [=](OpCtx& c) {
                         std::vector<double> v = k == "all zero" ? std::vector<double>(size_t(xr * xc), 0.0) : spread(c, xr, xc);
                         if (k == "one huge value") v[333] = round_to_bf16(3e38f);
                         if (k == "one infinity") v[4321] = -INFINITY;
                         if (k == "denormals")
                           for (size_t i = 0; i < v.size(); ++i) v[i] = round_to_bf16(float((int(i % 5) - 2)) * 1e-39f);
                         auto x = c.from({xr, xc}, v);
                         quantize(c, x, tr, g, fmt, "quantize_fp8");
                       }});
  }
  // The dense FP8 GEMM for each supported scaling pair: forward style (act out) and weight-gradient
  // style (f32 out, beta 1); K of 4 and 6 blocks of 128 (the 128x128 scales' row stride is
  // padded to 4 blocks).
  for (int64_t K : {512, 768})
    for (const Fp8GemmPair p : kFp8GemmPairs)
      for (bool f32_out : {false, true})
        t.push_back({"matmul_fp8",
                     dims({{"M", 256}, {"N", 384}, {"K", K}}) + " " + fp8_granularity_name(p.ga) + " x " +
                         fp8_granularity_name(p.gb) + " " + dtype_name(p.fa) + (f32_out ? " f32 out beta 1" : " act out"),
                     {1e-5, f32_out ? 2e-3 : 1e-2}, true, false, [=](OpCtx& c) {
                       const int64_t M = 256, N = 384;
                       auto a = c.from({M, K}, spread(c, M, K)), w = c.in({N, K}, Role::act, 0.03);
                       Q qa = quantize(c, a, false, p.ga, p.fa, "quantize_fp8 A");
                       Q qb = quantize(c, w, false, p.gb, DType::e4m3, "quantize_fp8 B");
                       auto C = f32_out ? c.in({M, N}, Role::f32) : c.out({M, N});
                       if (!f32_out) c.run([&](Backend& be, int i) { be.fill(C[i], 0.f); });
                       c.run([&](Backend& be, int i) { be.matmul_fp8(qa.at(i), qb.at(i), C[i], 0.75f, f32_out ? 1.f : 0.f, !f32_out); });
                       c.expect(C, "matmul_fp8");
                     }});
  // The backward products through transposed copies, as the dense linears run them: dgrad
  // dx = dy W, wgrad dW = dy^T x (accumulating onto 0.5).
  for (Fp8Granularity act : {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128})
    t.push_back({"matmul_fp8", std::string("backward products T512 out256 in384 ") + fp8_granularity_name(act),
                 {1e-5, 1e-2}, true, true, [act](OpCtx& c) {
                   const int64_t T = 512, O = 256, I = 384;
                   const Fp8Granularity w = act == Fp8Granularity::block_1x128 ? Fp8Granularity::block_128x128 : act;
                   auto dy = c.from({T, O}, spread(c, T, O)), x = c.from({T, I}, spread(c, T, I));
                   auto wt = c.in({O, I}, Role::act, 0.05);
                   Q qa = quantize(c, dy, false, act, DType::e5m2, "dy"), qb = quantize(c, wt, true, w, DType::e4m3, "W^T");
                   auto dx = c.out({T, I});
                   c.run([&](Backend& be, int i) { be.matmul_fp8(qa.at(i), qb.at(i), dx[i]); });
                   c.expect(dx, "dgrad");
                   Q wa = quantize(c, dy, true, act, DType::e5m2, "dy^T"), wb = quantize(c, x, true, act, DType::e4m3, "x^T");
                   auto dw = c.out({O, I}, Role::f32);
                   c.run([&](Backend& be, int i) {
                     be.fill(dw[i], 0.5f);
                     be.matmul_fp8(wa.at(i), wb.at(i), dw[i], 1.f, 1.f);
                   });
                   c.expect(dw, "wgrad", c.tol_of({1e-5, 2e-3}));
                 }});
  // The experts' FP8 GEMMs for each recipe and format, uneven experts (an empty one, one under a
  // tile, partial tiles) and 48 unused tail rows of huge values that must reach no expert's scales.
  const std::vector<int32_t> off = {0, 200, 200, 329, 600, 640};
  for (const Fp8GroupedRecipe r : kFp8GroupedRecipes)
    for (DType fmt : {DType::e4m3, DType::e5m2}) {
      for (bool trans_w : {true, false})
        for (bool f32_out : {false, true}) {
          const bool block = r.weight == Fp8Granularity::block_128x128;
          const int64_t K = trans_w ? 384 : 256, N = trans_w ? (block ? 256 : 272) : (block ? 384 : 400);
          t.push_back({"grouped_matmul_fp8",
                       dims({{"E", 5}, {"R", 688}, {"N", N}, {"K", K}}) + " " + fp8_granularity_name(r.act) + " x " +
                           fp8_granularity_name(r.weight) + " " + dtype_name(fmt) + (trans_w ? " forward" : " dgrad") +
                           (f32_out ? " f32 out" : " act out"),
                       {1e-5, f32_out ? 2e-3 : 1e-2}, true, false, [=](OpCtx& c) {
                         const int64_t R = 688, used = 640;
                         std::vector<double> av = spread(c, R, K);
                         for (int64_t i = used * K; i < R * K; ++i) av[size_t(i)] = round_to_bf16(1e38f);
                         auto a = c.from({R, K}, av), o = c.i32({6}, off);
                         auto w = c.in(trans_w ? Shape{5, N, K} : Shape{5, K, N}, Role::act, 0.05);
                         auto C = c.out({R, N}, f32_out ? Role::f32 : Role::act);
                         c.run([&](Backend& be, int i) { be.grouped_matmul_fp8(a[i], fmt, r.act, w[i], trans_w, r.weight, C[i], o[i]); });
                         c.expect(C, "grouped_matmul_fp8", used);
                       }});
        }
    }
  for (Fp8Granularity g : {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128})
    for (DType fmt : {DType::e5m2, DType::e4m3})
      t.push_back({"grouped_matmul_wgrad_fp8",
                   dims({{"E", 5}, {"R", 640}, {"N", 256}, {"K", 384}}) + " " + fp8_granularity_name(g) + " " + dtype_name(fmt),
                   {1e-5, 2e-3}, false, true, [=](OpCtx& c) {
                     auto o = c.i32({6}, off);
                     auto dy = c.from({640, 256}, spread(c, 640, 256)), x = c.in({640, 384});
                     auto dw = c.in({5, 256, 384}, Role::f32);
                     c.run([&](Backend& be, int i) { be.grouped_matmul_wgrad_fp8(dy[i], fmt, x[i], g, dw[i], o[i]); });
                     c.expect(dw, "grouped_matmul_wgrad_fp8");
                   }});
  // The expert weight forms (quantize_experts_fp8, both orientations) from f32 masters and from
  // act copies, with one large value in expert 0 and expert 2 all zero: the same bits.
  for (Role wr : {Role::f32, Role::act})
    for (const Fp8GroupedRecipe r : kFp8GroupedRecipes)
      t.push_back({"quantize_experts_fp8", std::string("E5 N256 K384 ") + rn(wr) + " " + fp8_granularity_name(r.weight),
                   {0, 0}, true, false, [=](OpCtx& c) {
                     const int64_t E = 5, N = 256, K = 384;
                     std::vector<double> wv = c.randn(E * N * K, 0.05);
                     wv[7] = 3.0;
                     std::fill(wv.begin() + 2 * N * K, wv.begin() + 3 * N * K, 0.0);
                     auto w = c.from({E, N, K}, wv, wr);
                     for (bool tr : {false, true}) {
                       const int64_t rows = tr ? K : N, k = tr ? N : K;
                       int64_t n = 1;
                       for (int64_t d : fp8_scale_shape(r.weight, rows, k)) n *= d;
                       Two data, scale;
                       c.run([&](Backend& be, int i) {
                         QuantizedExperts q;
                         q.granularity = r.weight;
                         q.data = data[i] = be.alloc({E, rows, k}, DType::e4m3);
                         q.scale = scale[i] = be.alloc({E, n}, DType::f32);
                         be.fill(q.scale, 1.f);
                         be.quantize_experts_fp8(w[i], tr, q);
                       });
                       const bool same = c.bytes(data, 0) == c.bytes(data, 1) && c.values(scale, 0) == c.values(scale, 1);
                       if (!same) c.fail(std::string("quantize_experts_fp8") + (tr ? " transposed" : "") + ": codes or scales differ (" +
                                         c.where(data) + ")");
                     }
                   }});
}

std::vector<OpCase> build() {
  std::vector<OpCase> t;
  elementwise(t);
  gemm(t);
  embedding(t);
  norms(t);
  attention(t);
  loss(t);
  moe(t);
  grouped(t);
  residual(t);
  optim(t);
  fp8(t);
  return t;
}

}  // namespace

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> table = build();
  return table;
}

}  // namespace moelab::ops
