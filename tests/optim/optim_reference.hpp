// Host references for the optimizer tests, in double precision and written independently of the
// engine (plain loops, the wide orientation for Newton-Schulz, a Jacobi eigen-solver for singular
// values), plus a Backend decorator that counts host transfers so tests can prove a step never
// reads device data.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "backend/backend.hpp"
#include "core/rng.hpp"

namespace moelab::testref {

// A generator seeded from the OS, so every run draws fresh inputs.
inline Rng fresh_rng() {
  std::random_device rd;
  return Rng((uint64_t(rd()) << 32) ^ rd());
}

// Row-major m x n matrix in double.
struct Mat {
  int64_t m = 0, n = 0;
  std::vector<double> a;
  Mat() = default;
  Mat(int64_t rows, int64_t cols) : m(rows), n(cols), a(size_t(rows * cols), 0.0) {}
  double& at(int64_t i, int64_t j) { return a[size_t(i * n + j)]; }
  double at(int64_t i, int64_t j) const { return a[size_t(i * n + j)]; }
};

inline Mat mul(const Mat& x, const Mat& y) {
  Mat z(x.m, y.n);
  for (int64_t i = 0; i < x.m; ++i)
    for (int64_t k = 0; k < x.n; ++k) {
      const double v = x.at(i, k);
      for (int64_t j = 0; j < y.n; ++j) z.at(i, j) += v * y.at(k, j);
    }
  return z;
}

inline Mat transpose(const Mat& x) {
  Mat t(x.n, x.m);
  for (int64_t i = 0; i < x.m; ++i)
    for (int64_t j = 0; j < x.n; ++j) t.at(j, i) = x.at(i, j);
  return t;
}

// Fresh normal entries, rounded to f32 so the engine (fed through floats) sees the same matrix.
inline Mat random_mat(Rng& rng, int64_t m, int64_t n, double scale = 1.0) {
  Mat x(m, n);
  for (auto& v : x.a) v = double(float(scale * rng.normal()));
  return x;
}

inline std::vector<float> to_floats(const Mat& x) { return {x.a.begin(), x.a.end()}; }

struct QuinticCoefficients {
  double a, b, c;
};

// Newton-Schulz on the wide orientation of g (a tall g is transposed and back): g / (|g|_F + eps),
// then `steps` iterations g <- a g + (b A + c A^2) g with A = g g^T and {a, b, c} = coef(step).
template <class Coef>
Mat newton_schulz_iterations(Mat g, int64_t steps, double eps, Coef coef) {
  const bool tall = g.m > g.n;
  if (tall) g = transpose(g);
  double norm = 0;
  for (double v : g.a) norm += v * v;
  norm = std::sqrt(norm) + eps;
  for (double& v : g.a) v /= norm;
  for (int64_t s = 0; s < steps; ++s) {
    const QuinticCoefficients k = coef(s);
    const double a = k.a, b = k.b, c = k.c;
    Mat A = mul(g, transpose(g));
    Mat AA = mul(A, A);
    Mat B(A.m, A.n);
    for (size_t i = 0; i < B.a.size(); ++i) B.a[i] = b * A.a[i] + c * AA.a[i];
    Mat BX = mul(B, g);
    for (size_t i = 0; i < g.a.size(); ++i) g.a[i] = a * g.a[i] + BX.a[i];
  }
  return tall ? transpose(g) : g;
}

// Muon's quintic Newton-Schulz, always in the wide orientation (transposing tall inputs), which is
// a different path from the engine's X^T X form for tall matrices.
// The coefficients are the f32 values the Backend API carries (its scalars are floats), so an f64
// engine can be held to f64 accuracy.
inline Mat newton_schulz(Mat g, int64_t steps) {
  return newton_schulz_iterations(g, steps, double(1e-7f), [](int64_t) {
    return QuinticCoefficients{double(3.4445f), double(-4.7750f), double(2.0315f)};
  });
}

// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations.
inline std::vector<double> symmetric_eigenvalues(Mat s) {
  const int64_t n = s.m;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0, total = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) (i == j ? total : off) += s.at(i, j) * s.at(i, j);
    if (off <= 1e-30 * (total + off)) break;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        if (std::abs(s.at(p, q)) < 1e-300) continue;
        const double theta = (s.at(q, q) - s.at(p, p)) / (2 * s.at(p, q));
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), sn = t * c;
        for (int64_t k = 0; k < n; ++k) {  // rotate columns p, q
          const double kp = s.at(k, p), kq = s.at(k, q);
          s.at(k, p) = c * kp - sn * kq;
          s.at(k, q) = sn * kp + c * kq;
        }
        for (int64_t k = 0; k < n; ++k) {  // rotate rows p, q
          const double pk = s.at(p, k), qk = s.at(q, k);
          s.at(p, k) = c * pk - sn * qk;
          s.at(q, k) = sn * pk + c * qk;
        }
      }
  }
  std::vector<double> ev(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ev[size_t(i)] = s.at(i, i);
  return ev;
}

// Singular values (min(m, n) of them), ascending.
inline std::vector<double> singular_values(const Mat& x) {
  const Mat gram = x.m >= x.n ? mul(transpose(x), x) : mul(x, transpose(x));
  std::vector<double> ev = symmetric_eigenvalues(gram);
  for (double& v : ev) v = std::sqrt(std::max(v, 0.0));
  std::sort(ev.begin(), ev.end());
  return ev;
}

// ||out - ref|| / ||ref||; NaN anywhere gives +inf so it never passes a bound.
template <class A, class B>
double rel_err(const A& out, const B& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = double(out[i]), r = double(ref[i]);
    if (std::isnan(o) || std::isnan(r)) return INFINITY;
    num += (o - r) * (o - r);
    den += r * r;
  }
  return out.size() == ref.size() ? std::sqrt(num / den) : INFINITY;
}

// Backend::read returns floats; an f64 CPU tensor is read from memory so f64 results keep their bits.
inline std::vector<double> read_exact(Backend& b, const Tensor& t) {
  if (t.device == Device::cpu && t.dtype == DType::f64) return {t.as<double>(), t.as<double>() + t.numel()};
  const std::vector<float> v = b.read(t);
  return {v.begin(), v.end()};
}

// Forwards every op to an inner backend and counts host transfers.
class CountingBackend : public Backend {
 public:
  explicit CountingBackend(Backend& inner) : in_(inner) {}
  int64_t reads = 0, writes = 0;

  Device device() const override { return in_.device(); }
  std::string name() const override { return in_.name(); }
  bool supports(const Capability& c) const override { return in_.supports(c); }
  DType act_dtype() const override { return in_.act_dtype(); }
  DType master_dtype() const override { return in_.master_dtype(); }
  Tensor alloc(const Shape& s, DType t) override { return in_.alloc(s, t); }
  size_t peak_memory_bytes() const override { return in_.peak_memory_bytes(); }
  void reset_peak_memory() override { in_.reset_peak_memory(); }
  void synchronize() override { in_.synchronize(); }
  void write(Tensor& d, const std::vector<float>& v) override { ++writes; in_.write(d, v); }
  void write_i32(Tensor& d, const std::vector<int32_t>& v) override { ++writes; in_.write_i32(d, v); }
  std::vector<float> read(const Tensor& s) override { ++reads; return in_.read(s); }
  std::vector<int32_t> read_i32(const Tensor& s) override { ++reads; return in_.read_i32(s); }
  void fill(Tensor& t, float v) override { in_.fill(t, v); }
  void copy(const Tensor& s, Tensor& d) override { in_.copy(s, d); }
  void axpby(float a, const Tensor& x, float b, Tensor& y) override { in_.axpby(a, x, b, y); }
  void sum(const Tensor& x, Tensor& o, bool acc) override { in_.sum(x, o, acc); }
  void matmul(const Tensor& A, bool ta, const Tensor& B, bool tb, Tensor& C, float al, float be) override {
    in_.matmul(A, ta, B, tb, C, al, be);
  }
  void quantize_fp8(const Tensor& x, bool t, QuantizedOperand& out) override { in_.quantize_fp8(x, t, out); }
  void matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float al, float be, bool fast) override {
    in_.matmul_fp8(A, B, C, al, be, fast);
  }
  void grouped_matmul_fp8(const Tensor& A, DType af, Fp8Granularity ag, const Tensor& W, bool tw, Fp8Granularity wg,
                          Tensor& C, const Tensor& o) override {
    in_.grouped_matmul_fp8(A, af, ag, W, tw, wg, C, o);
  }
  void grouped_matmul_fp8(const Tensor& A, DType af, Fp8Granularity ag, const QuantizedExperts& W, Tensor& C,
                          const Tensor& o) override {
    in_.grouped_matmul_fp8(A, af, ag, W, C, o);
  }
  void grouped_matmul_wgrad_fp8(const Tensor& dY, DType f, const Tensor& X, Fp8Granularity g, Tensor& dW,
                                const Tensor& o) override {
    in_.grouped_matmul_wgrad_fp8(dY, f, X, g, dW, o);
  }
  void embedding_fwd(const Tensor& t, const Tensor& w, Tensor& o) override { in_.embedding_fwd(t, w, o); }
  void embedding_bwd(const Tensor& t, const Tensor& d, Tensor& w) override { in_.embedding_bwd(t, d, w); }
  void rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& r, const AmaxSink* m) override { in_.rmsnorm_fwd(x, y, r, m); }
  void rmsnorm_bwd(const Tensor& x, const Tensor& r, const Tensor& dy, Tensor& dx, bool acc,
                   const AmaxSink* m) override {
    in_.rmsnorm_bwd(x, r, dy, dx, acc, m);
  }
  void rope_norm_fwd(const Tensor& x, const Tensor& c, const Tensor& s, Tensor& y, Tensor& r) override {
    in_.rope_norm_fwd(x, c, s, y, r);
  }
  void rope_norm_bwd(const Tensor& x, const Tensor& c, const Tensor& s, const Tensor& r, const Tensor& dy,
                     Tensor& dx, const AmaxSink* m) override {
    in_.rope_norm_bwd(x, c, s, r, dy, dx, m);
  }
  void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& o, Tensor& l, int window) override {
    in_.attention_fwd(q, k, v, o, l, window);
  }
  void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& l,
                     const Tensor& d, Tensor& dq, Tensor& dk, Tensor& dv, int window) override {
    in_.attention_bwd(q, k, v, o, l, d, dq, dk, dv, window);
  }
  void relu2_fwd(const Tensor& h, Tensor& a, const AmaxSink* m) override { in_.relu2_fwd(h, a, m); }
  void relu2_bwd(const Tensor& h, const Tensor& da, Tensor& dh, const AmaxSink* m) override {
    in_.relu2_bwd(h, da, dh, m);
  }
  void softcap_xent(const Tensor& lg, const Tensor& t, float cap, float gs, Tensor& l, Tensor& d,
                    const AmaxSink* m) override {
    in_.softcap_xent(lg, t, cap, gs, l, d, m);
  }
  using Backend::router_topk;
  using Backend::balance_loss;
  using Backend::router_bwd;
  void router_topk(const Tensor& lg, const RouterSpec& sp, const Tensor* b, Tensor& p, Tensor& i, Tensor& g) override {
    in_.router_topk(lg, sp, b, p, i, g);
  }
  void moe_plan(const Tensor& ti, int e, int cap, Tensor& r, Tensor& c, Tensor& o, Tensor& s, Tensor& rt,
                DropOrder order = DropOrder::rank) override {
    in_.moe_plan(ti, e, cap, r, c, o, s, rt, order);
  }
  void balance_loss(const Tensor& p, const Tensor& ti, const Tensor& r, const BalanceSpec& sp, Tensor& b) override {
    in_.balance_loss(p, ti, r, sp, b);
  }
  void router_bwd(const Tensor& lg, const Tensor& p, const Tensor& ti, const Tensor& g, const Tensor& dg,
                  const Tensor& r, const RouterSpec& sp, const BalanceSpec& bs, Tensor& dl) override {
    in_.router_bwd(lg, p, ti, g, dg, r, sp, bs, dl);
  }
  void router_stats(const Tensor& lg, const Tensor& p, RouterScore sc, Tensor& acc) override {
    in_.router_stats(lg, p, sc, acc);
  }
  void router_bias_update(const Tensor& load, float rate, Tensor& bias) override {
    in_.router_bias_update(load, rate, bias);
  }
  void moe_permute(const Tensor& x, const Tensor& rt, const Tensor& o, Tensor& xp, const AmaxSink* m) override {
    in_.moe_permute(x, rt, o, xp, m);
  }
  void moe_permute_bwd(const Tensor& d, const Tensor& s, Tensor& dx) override { in_.moe_permute_bwd(d, s, dx); }
  void moe_combine(const Tensor& yp, const Tensor& s, const Tensor& g, Tensor& y, bool acc) override {
    in_.moe_combine(yp, s, g, y, acc);
  }
  void moe_combine_bwd(const Tensor& dy, const Tensor& yp, const Tensor& s, const Tensor& g, Tensor& dyp,
                       Tensor& dg, const AmaxSink* m) override {
    in_.moe_combine_bwd(dy, yp, s, g, dyp, dg, m);
  }
  void grouped_matmul(const Tensor& A, const Tensor& W, bool tw, Tensor& C, const Tensor& o, float alpha = 1.0f,
                      float beta = 0.0f, const Tensor* addend = nullptr) override {
    in_.grouped_matmul(A, W, tw, C, o, alpha, beta, addend);
  }
  void grouped_matmul_wgrad(const Tensor& dY, const Tensor& X, Tensor& dW, const Tensor& o, float beta,
                            const Tensor* addend = nullptr) override {
    in_.grouped_matmul_wgrad(dY, X, dW, o, beta, addend);
  }
  void adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWStep& s,
                    const AmaxSink* amax = nullptr) override {
    in_.adamw_update(p, g, m, v, s, amax);
  }
  void frobenius_normalize(const Tensor& x, Tensor& y, float eps) override { in_.frobenius_normalize(x, y, eps); }
  void frobenius_normalize_batched(const Tensor& x, Tensor& y, float eps) override {
    in_.frobenius_normalize_batched(x, y, eps);
  }
  void muon_momentum(const Tensor& g, Tensor& m, Tensor& u, float mu, bool nesterov) override {
    in_.muon_momentum(g, m, u, mu, nesterov);
  }
  void sum_squares(const Tensor& x, Tensor& o, bool acc) override { in_.sum_squares(x, o, acc); }
  void lambda_mix_fwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0, Tensor& y) override {
    in_.lambda_mix_fwd(a, x, b, x0, y);
  }
  void lambda_mix_bwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0, const Tensor& dy, Tensor& dx,
                      Tensor& dx0, Tensor& da, Tensor& db) override {
    in_.lambda_mix_bwd(a, x, b, x0, dy, dx, dx0, da, db);
  }
  void value_gate_fwd(const Tensor& x, const Tensor& w, const Tensor& ve, Tensor& v, Tensor& g) override {
    in_.value_gate_fwd(x, w, ve, v, g);
  }
  void value_gate_bwd(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& g, const Tensor& dv, Tensor& dve,
                      Tensor& dw, Tensor& dx) override {
    in_.value_gate_bwd(x, w, ve, g, dv, dve, dw, dx);
  }
  void normuon_update(const Tensor& x, Tensor& v2, Tensor& p, const NorMuonStep& s) override {
    in_.normuon_update(x, v2, p, s);
  }

 private:
  Backend& in_;
};

// Muon's orthogonalization leaves every singular value of x near 1: within [0.6, 1.3].
inline void expect_near_orthogonal(const Mat& x) {
  for (double s : singular_values(x)) {
    EXPECT_GE(s, 0.6);
    EXPECT_LE(s, 1.3);
  }
}

}  // namespace moelab::testref
